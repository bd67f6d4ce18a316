#!/usr/bin/env bash
# The PyTorch reference and the torch backend on transformers 5.x, in a second venv (.venv-tf5)
# pinned to the lent GPU image's versions where this machine allows: transformers 5.17, onnxruntime
# 1.30, onnx 1.23.1 / onnx-ir 1.0.0 / onnxscript 0.7.2, tokenizers 0.23.2. Not its Python 3.12 and
# torch 2.11: no CPU build of torch 2.11 for Python 3.12 can be had here (PyPI's is the CUDA 13 build,
# which does not import without ~3 GB of CUDA wheels), so torch is [export]'s 2.13.0 CPU build from
# this machine's disk, on Python 3.11; the code is byte-compiled by Python 3.12 as well where pyenv has it.
# Called by .ci/run, from the repo root: bash .ci/tf5.sh
#   1. .venv-tf5 from scratch: those pins, the project with --no-deps, open_clip_torch's CLIP
#      vocabulary (no deps, never imported);
#   2. pytest: the upstream-parity fixtures and the reference's own tests, then the torch backend's
#      tests that need no onnxruntime-genai (its 0.18 needs onnxruntime >= 1.31);
#   3. the GPU kit's CPU rehearsal (benchmarks/gpu_kit.py --preset small --device cpu, 16 tokens), as the
#      two calls planned for the device: --build-only (with the AOTInductor toolchain check), then the
#      measurement on the built engine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tf5
PINS=(torch==2.13.0 transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0
      onnxruntime==1.30.0 onnx==1.23.1 onnx-ir==1.0.0 onnxscript==0.7.2 numpy==2.4.6 pillow==13.0.0
      opencv-python-headless==5.0.0.93 pytest==8.4.2)
REFERENCE_TESTS=(tests/test_upstream_parity.py tests/test_model.py tests/test_vision.py tests/test_alignment.py
                 tests/test_pooling.py tests/test_formats.py tests/test_checkpoint.py)
TORCH_TESTS=(test_static_cache_decode_equals_transformers_generation test_static_cache_sizes_and_refusals
             test_grouped_sdpa_equals_repeated_kv_attention test_bf16_decoder_agrees_with_fp32_reference
             test_torch_engine_without_onnx_llm test_engine_without_torch_stages_is_refused)

SECONDS=0
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "${PINS[@]}"
"$VENV/bin/pip" install -q --no-deps open_clip_torch==3.3.0
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c 'import torch, transformers, onnxruntime, ppllava.export.engine
print("tf5: torch", torch.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__)'
PY312=""  # pyenv's (a shim on PATH may name a version it does not have)
for candidate in /usr/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if [ -x "$candidate" ] && "$candidate" -V >/dev/null 2>&1; then PY312=$candidate; fi
done
if [ -n "$PY312" ]; then  # compiled in memory: nothing is written next to the sources
  "$PY312" -c '
import pathlib, sys
bad = []
for folder in ("ppllava", "export", "runtime", "calibration", "benchmarks", ".ci"):
    for path in sorted(pathlib.Path(folder).rglob("*.py")):
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as exc:
            bad.append(f"{path}:{exc.lineno}: {exc.msg}")
print(*bad, sep="\n", file=sys.stderr)
sys.exit(1 if bad else 0)'
  echo "tf5: the sources compile under $("$PY312" -V)"
else
  echo "tf5: no python3.12 here; the compile check is skipped"
fi
echo "tf5: $VENV installed in ${SECONDS}s"

SECONDS=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${REFERENCE_TESTS[@]}" \
  "${TORCH_TESTS[@]/#/tests/test_torch_backend.py::}"
echo "tf5: reference and torch-backend tests in ${SECONDS}s"

SECONDS=0
mkdir -p .ci-cache
rm -rf .ci-cache/tf5-kit  # the two calls of the device plan: build, then measure the built engine
"$VENV/bin/python" benchmarks/gpu_kit.py --preset small --device cpu --work .ci-cache/tf5-kit --build-only \
  --toolchain-check on --out .ci-cache/tf5-gpu-kit-build.json 2>.ci-cache/tf5-gpu-kit-build.log \
  || { tail -n 30 .ci-cache/tf5-gpu-kit-build.log; exit 1; }
"$VENV/bin/python" benchmarks/gpu_kit.py --preset small --device cpu --work .ci-cache/tf5-kit --max-new-tokens 16 \
  --repeat 1 --warmup 0 --questions 1 --out .ci-cache/tf5-gpu-kit.json 2>.ci-cache/tf5-gpu-kit.log \
  || { tail -n 30 .ci-cache/tf5-gpu-kit.log; exit 1; }
rm -rf .ci-cache/tf5-kit
tail -n 1 .ci-cache/tf5-gpu-kit.log
echo "tf5: GPU kit rehearsal (small preset, CPU) in ${SECONDS}s"
