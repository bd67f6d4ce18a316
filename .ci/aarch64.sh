#!/usr/bin/env bash
# The torch-free runtime on linux-aarch64 (Jetson's CPU), under qemu user-mode emulation.
#
# Called by .ci/run after the x86 venv (.venv) is installed, from the repo root: bash .ci/aarch64.sh
#   1. qemu-user-static: the machine's, or Debian's package unpacked into the cache (not installed);
#   2. an arm64 Python 3.11 sysroot: python3.11-minimal, libpython3.11-stdlib and libstdc++6 (which
#      the manylinux wheels expect from the system) with the dependency closure that apt itself
#      resolves, unpacked with dpkg -x. apt runs on a private state directory (own lists, own empty
#      dpkg status, APT::Architecture arm64): the machine's dpkg architecture list and apt lists are
#      never touched, so there is nothing to restore, even after a kill -9 (checked at the end);
#   3. aarch64 wheels of the [runtime] extra, pinned to the versions in .venv (so the only difference
#      between the two runs is the architecture), installed with the x86 pip into a --target dir;
#   4. the project wheel, built from a copy of the working tree, used on BOTH sides (x86 too);
#   5. a tiny random vicuna engine exported on x86, lossless inputs (PNG-codec AVI + PNG image);
#   6. `ppllava ask --json` and a stage dump (.ci/aarch64_compare.py) on x86 and on emulated aarch64,
#      then the comparison: identical token ids, every stage within its bound (exit 1, one line).
# Downloads are cached in $PPLLAVA_CI_AARCH64_CACHE (default ~/.cache/ppllava-ci-aarch64).
# Knobs: PPLLAVA_CI_QEMU_CPU (default cortex-a76: the HWCAPs of Jetson Orin's Cortex-A78AE, no SVE;
# cortex-a57 = Nano/TX2, max = every feature qemu has), PPLLAVA_CI_THREADS (default 1),
# PPLLAVA_CI_REFRESH=1 (re-resolve the Debian packages and the wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-$REPO/.venv}
CACHE=${PPLLAVA_CI_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ppllava-ci-aarch64}
QEMU_MODEL=${PPLLAVA_CI_QEMU_CPU:-cortex-a76}
THREADS=${PPLLAVA_CI_THREADS:-1}
REFRESH=${PPLLAVA_CI_REFRESH:-0}
MAX_NEW_TOKENS=24
QUESTION="What is happening in this video?"
PLATFORM=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
          --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:)
DEBS=(python3.11-minimal libpython3.11-stdlib libstdc++6)

die() { echo "aarch64 check FAILED: $*" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || die "no x86 venv at $VENV (run .ci/run's install first)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "another aarch64 check holds $CACHE/.lock"

RUN=$CACHE/run
rm -rf "$RUN"
mkdir -p "$RUN/logs"
ARCHS_BEFORE=$(dpkg --print-foreign-architectures | sort | tr '\n' ' ')
T0=$(date +%s.%N)
TIMES=()
DL=0  # bytes downloaded by this run
STEP=""
STEP_T0=$T0

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$STEP" ]; then
    echo "aarch64 check: step '$STEP' failed (rc $rc); logs in $RUN/logs" >&2
  fi
  local after
  after=$(dpkg --print-foreign-architectures | sort | tr '\n' ' ')
  if [ "$after" != "$ARCHS_BEFORE" ]; then
    echo "aarch64 check: WARNING: dpkg foreign architectures changed during this run: '$ARCHS_BEFORE' -> '$after'" >&2
  fi
  rm -rf "$CACHE/apt/state/lists/partial"/* "$CACHE/sysroot.tmp" "$CACHE"/site-deps.tmp 2>/dev/null || true
}
trap on_exit EXIT

since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }

step() {  # step NAME: close the previous step's timing, open a new one
  [ -n "$STEP" ] && TIMES+=("$(printf '%-52s %6s s' "$STEP" "$(since "$STEP_T0")")")
  STEP=$1
  STEP_T0=$(date +%s.%N)
  [ -n "$STEP" ] && echo "== $STEP"
  return 0
}

logged() {  # logged NAME TIMEOUT CMD...: stdout+stderr to $RUN/logs/NAME.log, its tail on failure
  local name=$1 limit=$2
  shift 2
  captured "$RUN/logs/$name.log" "$name" "$limit" "$@"
}

captured() {  # captured STDOUT_FILE NAME TIMEOUT CMD...: stderr to $RUN/logs/NAME.log (or with stdout)
  local out=$1 name=$2 limit=$3 rc=0
  shift 3
  if [ "$out" = "$RUN/logs/$name.log" ]; then
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1 || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$RUN/logs/$name.log" || rc=$?
  fi
  if [ "$rc" -ne 0 ]; then
    grep -v 'is ignored: it is neither' "$RUN/logs/$name.log" | tail -n 25 >&2 || true
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && die "$name timed out after ${limit}s"
    die "$name exited with $rc (log: $RUN/logs/$name.log)"
  fi
}

fetched() {  # bytes apt says it fetched, from a log
  awk '/^Fetched /{ v=$2; u=$3; m=(u=="B")?1:(u=="kB")?1e3:(u=="MB")?1e6:(u=="GB")?1e9:0; s+=v*m } END { printf "%d", s }' "$1"
}

dir_bytes() { du -sb "$1" 2>/dev/null | cut -f1 || echo 0; }

private_apt() {  # private_apt DIR ARCH: a private apt state in DIR for ARCH (APT_CONFIG=DIR/apt.conf).
  # The machine's sources, keyrings and apt.conf.d (proxies, mirrors) are used; lists, package cache,
  # dpkg status and architecture are our own, so nothing on the machine changes. Download only.
  local dir=$1 arch=$2
  rm -rf "$dir"
  mkdir -p "$dir/state/lists/partial" "$dir/cache/archives/partial" "$dir/preferences.d"
  : >"$dir/status"
  cat >"$dir/apt.conf" <<EOF
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dir::State "$dir/state";
Dir::State::status "$dir/status";
Dir::Cache "$dir/cache";
Dir::Etc::Preferences "$dir/preferences";
Dir::Etc::PreferencesParts "$dir/preferences.d";
Acquire::Languages "none";
EOF
}

# ------------------------------------------------------------------------------------ 1. qemu
# The machine's own qemu-aarch64-static if it has one; else Debian's package for this machine's
# architecture, downloaded through a private apt state and unpacked with dpkg -x into the cache
# (a static binary: nothing is installed, no root needed, no binfmt handler registered).
step "qemu-user-static (Debian package, unpacked into the cache)"
QEMU=$(command -v qemu-aarch64-static || true)
if [ -n "${PPLLAVA_CI_OWN_QEMU:-}" ]; then QEMU=""; fi  # force the unpacked one (to test this path)
if [ -z "$QEMU" ]; then
  QROOT=$CACHE/qemu-root
  if [ "$REFRESH" = 1 ] || [ ! -x "$QROOT/usr/bin/qemu-aarch64-static" ]; then
    APTQ=$CACHE/apt-host
    rm -rf "$QROOT" "$QROOT.tmp"
    private_apt "$APTQ" "$(dpkg --print-architecture)"
    APT_CONFIG=$APTQ/apt.conf logged apt-update-host 300 apt-get -q update
    DL=$((DL + $(fetched "$RUN/logs/apt-update-host.log")))
    (cd "$APTQ/cache/archives" && APT_CONFIG=$APTQ/apt.conf logged apt-download-qemu 600 apt-get -q download qemu-user-static)
    DL=$((DL + $(dir_bytes "$APTQ/cache/archives")))
    mkdir -p "$QROOT.tmp"
    dpkg -x "$(ls "$APTQ"/cache/archives/qemu-user-static_*.deb | tail -n 1)" "$QROOT.tmp"
    mv "$QROOT.tmp" "$QROOT"
  fi
  QEMU=$QROOT/usr/bin/qemu-aarch64-static
fi
"$QEMU" --version | head -n 1

# --------------------------------------------------------------------------- 2. arm64 sysroot
step "arm64 Python 3.11 sysroot (apt-get + dpkg -x)"
APTR=$CACHE/apt
SYSROOT=$CACHE/sysroot
if [ "$REFRESH" = 1 ] || [ ! -f "$SYSROOT/.complete" ]; then
  rm -rf "$SYSROOT" "$CACHE/sysroot.tmp"
  private_apt "$APTR" arm64
  APT_CONFIG=$APTR/apt.conf logged apt-update-arm64 300 apt-get -q update
  DL=$((DL + $(fetched "$RUN/logs/apt-update-arm64.log")))
  APT_CONFIG=$APTR/apt.conf logged apt-download-arm64 600 apt-get -q -y install --download-only "${DEBS[@]}"
  DL=$((DL + $(fetched "$RUN/logs/apt-download-arm64.log")))
  mkdir -p "$CACHE/sysroot.tmp"
  for deb in "$APTR"/cache/archives/*.deb; do
    dpkg -x "$deb" "$CACHE/sysroot.tmp"
    basename "$deb" >>"$CACHE/sysroot.tmp/.complete.tmp"
  done
  mv "$CACHE/sysroot.tmp/.complete.tmp" "$CACHE/sysroot.tmp/.complete"
  mv "$CACHE/sysroot.tmp" "$SYSROOT"
fi
echo "$(wc -l <"$SYSROOT/.complete") Debian arm64 packages in $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
PY_ARM=$SYSROOT/usr/bin/python3.11
[ -x "$PY_ARM" ] || die "$PY_ARM is missing from the sysroot"
# onnxruntime (pytorch/cpuinfo) parses /proc/cpuinfo; under qemu 7.2 it reads the host's x86 text and
# crashes. qemu -L serves SYSROOT/proc/cpuinfo instead: describe ARM cores with the HWCAPs that the
# emulated CPU model really reports (probed here), one entry per host CPU (/sys is the host's).
declare -A MIDR_PART=([cortex-a35]=0xd04 [cortex-a53]=0xd03 [cortex-a55]=0xd05 [cortex-a57]=0xd07
                      [cortex-a72]=0xd08 [cortex-a76]=0xd0b [neoverse-n1]=0xd0c)
mkdir -p "$SYSROOT/proc"
FEATURES=$(env -u LD_LIBRARY_PATH -u LD_PRELOAD QEMU_CPU="$QEMU_MODEL" timeout 60 "$QEMU" -L "$SYSROOT" "$PY_ARM" -I -c '
import ctypes
libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong
h1, h2 = libc.getauxval(16), libc.getauxval(26)
n1 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg".split()
n2 = "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte".split()
print(" ".join([n for i, n in enumerate(n1) if h1 >> i & 1] + [n for i, n in enumerate(n2) if h2 >> i & 1]))
') || die "the arm64 python does not start under $QEMU (-cpu $QEMU_MODEL)"
: >"$SYSROOT/proc/cpuinfo"
for ((i = 0; i < $(getconf _NPROCESSORS_CONF); i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 0\n\n' \
    "$i" "$FEATURES" "${MIDR_PART[$QEMU_MODEL]:-0xd0b}" >>"$SYSROOT/proc/cpuinfo"
done
echo "qemu -cpu $QEMU_MODEL: $FEATURES"

# ------------------------------------------------------------------------------ 3. aarch64 wheels
step "aarch64 wheels of [runtime] (pip download)"
mapfile -t PINS < <("$VENV/bin/python" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib.metadata import PackageNotFoundError, version
reqs = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["runtime"]
for req in reqs:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    try:
        print(f"{name}=={version(name)}")  # what the x86 side runs
    except PackageNotFoundError:
        print(req)
EOF
)
echo "pins (from $VENV): ${PINS[*]}"
WHEELS=$CACHE/wheels
mkdir -p "$WHEELS"
if [ "$REFRESH" = 1 ] || ! timeout 120 "$VENV/bin/pip" download -q --no-index --find-links "$WHEELS" --dest "$WHEELS" \
      "${PLATFORM[@]}" "${PINS[@]}" >"$RUN/logs/pip-download-offline.log" 2>&1; then
  before=$(dir_bytes "$WHEELS")
  logged pip-download 600 "$VENV/bin/pip" download --progress-bar off --dest "$WHEELS" "${PLATFORM[@]}" "${PINS[@]}"
  DL=$((DL + $(dir_bytes "$WHEELS") - before))
fi
echo "$(ls "$WHEELS" | wc -l) wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"

step "install the aarch64 wheels (x86 pip --target)"
KEY=$(printf '%s\n' "${PINS[@]}" "${PLATFORM[@]}" | sha256sum | cut -c1-16)
SITE_DEPS=$CACHE/site-deps-$KEY
if [ ! -f "$SITE_DEPS/.complete" ]; then
  rm -rf "$CACHE"/site-deps-* "$CACHE/site-deps.tmp"
  logged pip-install-arm64 600 "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" --no-warn-conflicts \
    --target "$CACHE/site-deps.tmp" "${PLATFORM[@]}" "${PINS[@]}"
  touch "$CACHE/site-deps.tmp/.complete"
  mv "$CACHE/site-deps.tmp" "$SITE_DEPS"
fi

# ------------------------------------------------------------------------- 4. the project wheel
step "project wheel (working tree copy, pip wheel)"
mkdir -p "$RUN/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | (cd "$REPO" && xargs -0 cp --parents -t "$RUN/src" 2>/dev/null || true)
[ -f "$RUN/src/pyproject.toml" ] || die "could not copy the working tree to $RUN/src"
if ! timeout 300 "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w "$RUN/dist" "$RUN/src" >"$RUN/logs/pip-wheel.log" 2>&1; then
  logged pip-wheel-isolated 300 "$VENV/bin/pip" wheel -q --no-deps -w "$RUN/dist" "$RUN/src"
fi
WHEEL=$(ls "$RUN"/dist/ppllava-*.whl)
SITE_PROJ=$RUN/site-ppllava  # pure Python: the same files on x86 and aarch64
logged pip-install-project 300 "$VENV/bin/pip" install -q --no-deps --no-index --no-warn-conflicts --target "$SITE_PROJ" "$WHEEL"
echo "$(basename "$WHEEL") -> $SITE_PROJ"

X86=(env PYTHONPATH="$SITE_PROJ" PYTHONNOUSERSITE=1 "$VENV/bin/python" -P)
ARM=(env -u LD_LIBRARY_PATH -u LD_PRELOAD -u PYTHONHOME -u PYTHONSTARTUP PYTHONPATH="$SITE_PROJ:$SITE_DEPS"
     PYTHONNOUSERSITE=1 QEMU_CPU="$QEMU_MODEL" "$QEMU" -L "$SYSROOT" "$PY_ARM" -P)

step "aarch64 imports (numpy, onnxruntime, cv2, tokenizers)"
cd "$RUN"  # a neutral working directory: nothing named ppllava next to the interpreter
logged arm-imports 300 "${ARM[@]}" -c '
import platform, numpy, onnxruntime, cv2, tokenizers, safetensors, PIL, ppllava.runtime.pipeline
print(platform.machine(), "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers(), "cv2", cv2.__version__)'
cat "$RUN/logs/arm-imports.log"

# -------------------------------------------------------------------- 5. tiny engine and inputs
step "tiny engine (make-tiny + export on x86)"
# The engine is rebuilt when the project's files (the wheel's RECORD hashes) or the export tools change.
EXPORT_KEY=$("$VENV/bin/python" - "$WHEEL" <<'EOF' | sha256sum | cut -c1-16
import sys, zipfile
from importlib.metadata import version
wheel = zipfile.ZipFile(sys.argv[1])
print(wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))).decode())
for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai", "open_clip_torch"):
    print(name, version(name))
EOF
)
ENGINE=$CACHE/engine/engine
if [ "$(cat "$CACHE/engine/KEY" 2>/dev/null)" != "$EXPORT_KEY" ]; then
  rm -rf "$CACHE/engine"
  mkdir -p "$CACHE/engine"
  logged make-tiny 300 "${X86[@]}" "$SITE_PROJ/bin/ppllava" make-tiny "$CACHE/engine/ckpt" --variant vicuna --seed 0
  logged export 600 "${X86[@]}" "$SITE_PROJ/bin/ppllava" export "$CACHE/engine/ckpt" --out "$ENGINE"
  tail -n 1 "$RUN/logs/export.log"
  echo "$EXPORT_KEY" >"$CACHE/engine/KEY"
else
  echo "reusing $ENGINE (same project code and export tools)"
fi
logged make-inputs 120 "${X86[@]}" "$REPO/.ci/aarch64_compare.py" make-inputs "$RUN/inputs"
cat "$RUN/logs/make-inputs.log"
VIDEO=$RUN/inputs/clip.avi
IMAGE=$RUN/inputs/frame.png

# ----------------------------------------------------------------------- 6. run on both, compare
ASK=(ask "$ENGINE" "$VIDEO" "$QUESTION" --json --max-new-tokens "$MAX_NEW_TOKENS" --threads "$THREADS")
DUMP=(dump "$ENGINE" --video "$VIDEO" --image "$IMAGE" --question "$QUESTION" --threads "$THREADS"
      --max-new-tokens "$MAX_NEW_TOKENS")
step "x86: ppllava ask --json + stage dump"
captured "$RUN/ask-x86.json" ask-x86 300 "${X86[@]}" "$SITE_PROJ/bin/ppllava" "${ASK[@]}"
logged dump-x86 300 "${X86[@]}" "$REPO/.ci/aarch64_compare.py" "${DUMP[@]}" --out "$RUN/x86.npz"

step "aarch64 (qemu -cpu $QEMU_MODEL): ppllava ask --json"
captured "$RUN/ask-arm.json" ask-arm 300 "${ARM[@]}" "$SITE_PROJ/bin/ppllava" "${ASK[@]}"

step "aarch64 (qemu -cpu $QEMU_MODEL): stage dump"
logged dump-arm 300 "${ARM[@]}" "$REPO/.ci/aarch64_compare.py" "${DUMP[@]}" --out "$RUN/arm.npz"

step "compare"
set +e
timeout --kill-after=10 300 "${X86[@]}" "$REPO/.ci/aarch64_compare.py" compare "$ENGINE" \
  "$RUN/x86.npz" "$RUN/arm.npz" --ask-x86 "$RUN/ask-x86.json" --ask-arm "$RUN/ask-arm.json"
CMP=$?
set -e
step ""

echo "-- timings"
printf '%s\n' "${TIMES[@]}"
printf '%-52s %6s s\n' "total" "$(since "$T0")"
echo "downloaded by this run: $(awk -v b="$DL" 'BEGIN { printf "%.1f", b / 1e6 }') MB (cache $CACHE: $(du -sh "$CACHE" | cut -f1))"
echo "dpkg foreign architectures: '$(dpkg --print-foreign-architectures | tr '\n' ' ')' (before: '$ARCHS_BEFORE')"
[ "$CMP" -eq 0 ] || { [ "$CMP" -eq 124 ] && die "the comparison timed out"; exit 1; }
