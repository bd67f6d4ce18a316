"""The engine directory's contract: ``manifest.json`` read, validated and checked against its files.

Torch-free. The runtime never guesses: every shape, id, preprocessing constant and pooling plan it
uses comes from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppllava.errors import EngineError
from ppllava.paths import cache_root

log = logging.getLogger(__name__)
from ppllava.plan import WindowPlan

FORMAT = "ppllava-engine"
# 2: every artifact alternative of a stage (the LLM's included: ONNX variants, TensorRT-LLM
# checkpoints and engines) is one record in ``stages.<stage>.variants`` under ``variant_key``.
# Format-1 dirs are upgraded in memory on load (``upgrade``) and written as format 2 by the next
# command that records an artifact.
FORMAT_VERSION = 2
READS = (1, 2)
MANIFEST = "manifest.json"
VERIFY = "verify.json"
CHECKSUM_BYTES = 64 * 2**20
# Files up to this size are hashed at every load; larger ones (LLM weights) once per file version
# (device, inode, size, mtime), remembered in the user's cache dir, and always by `ppllava check`.


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(root: Path, paths) -> dict[str, dict]:
    """relative path -> {bytes, sha256} for the manifest's integrity checks."""
    return {str(Path(p).relative_to(root)): {"bytes": Path(p).stat().st_size, "sha256": sha256_file(Path(p))}
            for p in paths if Path(p).is_file()}


def variant_key(backend: str, precision: str, kind: str | None = None) -> str:
    """The one key scheme of ``stages.<stage>.variants``: the backend that runs the artifact and its
    precision ("onnxruntime:int8", "tensorrt:fp16", "torch:bf16", "tensorrt-llm:fp8"), and a kind
    for artifacts that are inputs of a later build rather than run ("tensorrt-llm:fp8:checkpoint")."""
    return ":".join([backend, precision] + ([kind] if kind else []))


def upgrade(data: dict) -> dict:
    """A format-1 manifest as format 2 (in memory): variant keys from their records' backend and
    precision, the TensorRT-LLM checkpoints (``llm.quantized``) and engine (``llm.tensorrt_llm_engine``)
    moved into ``stages.llm.variants``."""
    if data.get("format_version") != 1:
        return data
    for stage in data.get("stages", {}).values():
        old = stage.pop("variants", None) or {}
        for key, record in old.items():
            if key == "torch":
                backend, precision = "torch", record.get("precision", "fp32")
            elif key.startswith("tensorrt-"):
                backend, precision = "tensorrt", key.removeprefix("tensorrt-")
            else:
                backend, precision = record.get("backend", "onnxruntime"), record.get("precision", key)
            stage.setdefault("variants", {})[variant_key(backend, precision)] = {
                **record, "backend": backend, "precision": precision}
    llm = data.get("llm", {})
    variants = {}
    for scheme, record in (llm.pop("quantized", None) or {}).items():
        variants[variant_key("tensorrt-llm", scheme, "checkpoint")] = {
            **record, "backend": "tensorrt-llm", "precision": scheme, "kind": "checkpoint"}
    built = llm.pop("tensorrt_llm_engine", None)
    if built and not built.get("files"):
        # format 1 recorded no checksums for it, and format 2 refuses an unchecked artifact
        log.warning("the TensorRT-LLM engine %s has no checksum records (format 1): not used; rebuild it with "
                    "`ppllava build-engines --llm-scheme %s`", built.get("dir"), built.get("scheme"))
    elif built:
        scheme = built.get("scheme") or "fp16"
        variants[variant_key("tensorrt-llm", scheme)] = {
            **built, "backend": "tensorrt-llm", "precision": scheme, "files": built.get("files", {})}
    if variants:
        data.setdefault("stages", {}).setdefault("llm", {}).setdefault("variants", {}).update(variants)
    data["format_version"] = 2
    return data


def variant_record(root: Path, path: Path, backend: str, precision: str, **extra) -> dict:
    """The one record shape of an artifact alternative of a stage (``stages.<stage>.variants.<key>``):
    its file or directory relative to the engine dir, the backend that runs it, its precision, what
    the writer adds (identity of the machine it was built for, accuracy numbers, ...), and the size
    and SHA-256 of every file it consists of."""
    path = Path(path)
    where = {"dir": str(path.relative_to(root))} if path.is_dir() else {"file": str(path.relative_to(root))}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {**where, "backend": backend, "precision": precision, **extra, "files": file_records(root, files)}


def record_key(record: dict) -> str:
    """The key a ``variant_record`` is filed under: ``variant_key`` of its backend, precision and kind."""
    return variant_key(record["backend"], record["precision"], record.get("kind"))


def add_variants(engine_dir: Path, records: list[tuple[str, dict]], drop=lambda stage, record: False) -> list[Path]:
    """Record artifacts in the manifest, one atomic rewrite: each (stage, ``variant_record``) is filed
    under its ``record_key``, replacing the record there; ``drop(stage, record)`` removes other
    existing records (an artifact that allows one alternative at a time). Returns the files or
    directories of the records replaced or dropped (the caller removes them once the new manifest is
    in place; nothing is deleted here). A format-1 manifest is written back as format 2."""
    root = Path(engine_dir)
    path = root / MANIFEST
    data = upgrade(json.loads(path.read_text()))
    keep = {(stage, record_key(record)): record for stage, record in records}
    superseded = []
    for (stage, key), record in keep.items():
        variants = data["stages"].setdefault(stage, {}).setdefault("variants", {})
        for old_key, old in list(variants.items()):
            if old_key != key and not drop(stage, old):
                continue
            previous = old.get("file") or old.get("dir")
            if previous and previous != (record.get("file") or record.get("dir")):
                superseded.append(root / previous)
            del variants[old_key]
        variants[key] = record
    write_json_atomic(path, data)
    return superseded


def write_json_atomic(path: Path, data: dict, default=None) -> None:
    """Write JSON beside ``path`` and rename over it: readers see the old or the new file, never half.
    ``default``: json.dumps's, for values JSON has no type for."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=default) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------ schema
# Every key the runtime reads, with its type and range: checked once at load, so that a damaged or
# hand-edited manifest is one line naming the key, never a TypeError deep inside a stage.
def _int(lo=0):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}"


def _num(positive=False):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or not positive),
            "a positive number" if positive else "a number")


def _list(n, check):
    return lambda v: isinstance(v, list) and len(v) == n and all(check[0](x) for x in v), f"a list of {n} ({check[1]})"


def _optional(check):
    return lambda v: v is None or check[0](v), check[1] + " or null"


_STR = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_TEXT = (lambda v: isinstance(v, str), "a string")
_DICT = (lambda v: isinstance(v, dict), "an object")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_IDS = (lambda v: isinstance(v, list) and all(_int()[0](x) for x in v), "a list of token ids")
SCHEMA = {
    "source": _DICT, "source.fingerprint": _STR, "variant": _STR,
    "dims": _DICT, "dims.max_frames": _int(1), "dims.llm_context": _int(2), "dims.num_patches": _int(1),
    "dims.vision_hidden": _int(1),
    "preprocessing": _DICT, "preprocessing.size": _int(1), "preprocessing.default_frames": _int(1),
    "preprocessing.rescale": _num(True), "preprocessing.mean": _list(3, _num()), "preprocessing.std": _list(3, _num(True)),
    "pooling": _DICT, "pooling.frame_grid": _list(2, _int(1)), "pooling.temperature": _num(True),
    "pooling.video": _DICT, "pooling.image": _DICT,
    "alignment": _DICT, "alignment.max_length": _int(2), "alignment.mask": _BOOL, "alignment.pad_id": _optional(_int()),
    "alignment.tokenizer": _optional(_STR),
    "llm": _DICT, "llm.image_token_id": _int(), "llm.pad_token_id": _optional(_int()), "llm.eos_token_ids": _IDS,
    "llm.template": _DICT, **{f"llm.template.{k}": _TEXT for k in ("system", "user", "image", "user_end", "assistant",
                                                                   "assistant_end")},
    "llm.tokenizer": _optional(_STR), "llm.embeddings": _STR, "llm.hf_dir": _optional(_STR),
    "stages": _DICT, **{f"stages.{n}": _DICT for n in ("vision", "text", "pool")},
    **{f"stages.{n}.file": _STR for n in ("vision", "text", "pool")}, "files": _DICT,
}
OPTIONAL = {"alignment.pad_id", "alignment.tokenizer", "llm.pad_token_id", "llm.tokenizer", "llm.hf_dir"}


def validate(data: dict, where: Path) -> None:
    """Check ``data`` against ``SCHEMA``; one ``EngineError`` line naming the first bad key."""
    for key, (check, what) in SCHEMA.items():
        value: Any = data
        for part in key.split("."):
            value = value.get(part, KeyError) if isinstance(value, dict) else KeyError
        if value is KeyError:
            if key in OPTIONAL:
                continue
            raise EngineError(f"{where} lacks {key}: damaged or hand-edited; re-export")
        if not check(value):
            raise EngineError(f"{where}: {key} must be {what}, got {json.dumps(value)[:60]}: damaged or hand-edited; re-export")
    if data["preprocessing"]["default_frames"] > data["dims"]["max_frames"]:
        raise EngineError(f"{where}: preprocessing.default_frames exceeds dims.max_frames; re-export")
    for name, stage in data["stages"].items():
        records = [(name, stage)] if stage.get("file") or stage.get("dir") else []
        if not isinstance(stage.get("variants", {}), dict):
            raise EngineError(f"{where}: stages.{name}.variants must be an object; re-export")
        records += [(f"{name} ({key})", v) for key, v in stage.get("variants", {}).items()]
        for label, record in records:
            if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not record["files"]:
                raise EngineError(f"{where}: the {label} artifact has no checksum records (files): refused; re-export "
                                  "or rebuild it")
            for rel, entry in record["files"].items():
                if not (isinstance(entry, dict) and _int()[0](entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
                    raise EngineError(f"{where}: the checksum record of {rel} is damaged; re-export")


def inside(root: Path, rel: str, where: Path) -> Path:
    """``root / rel``, refused unless it resolves inside ``root`` (no ``..``, absolute paths or
    symlinks that leave the engine dir)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise EngineError(f"{where} names {rel!r} as a file: refused (paths are relative to the engine dir)")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise EngineError(f"{where} names {rel!r}, outside the engine dir: refused")
    return path


class _Verified:
    """Large files whose sha256 matched, by (device, inode, size, mtime_ns): each version of a file
    is hashed once, not at every open. Unreadable or unwritable memo: everything is re-hashed."""

    def __init__(self):
        self.path = cache_root() / "verified-files.json"
        try:
            self.seen = set(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            self.seen = set()

    @staticmethod
    def stamp(path: Path, sha256: str) -> str:
        st = path.stat()
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{sha256}"

    def add(self, stamp: str) -> None:
        self.seen.add(stamp)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, sorted(self.seen)[-10_000:])
        except OSError:
            pass  # a read-only home: the file is hashed again next time


def _plan(spec: dict[str, Any] | None) -> WindowPlan:
    spec = spec or {}
    as_tuple = lambda v: None if v is None else tuple(int(x) for x in v)  # noqa: E731
    return WindowPlan(kernel=as_tuple(spec.get("kernel")), stride=as_tuple(spec.get("stride")),
                      output_shape=as_tuple(spec.get("output_shape")))


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, engine_dir: str | Path, check_files: bool = True) -> "Manifest":
        root = Path(engine_dir)
        path = root / MANIFEST
        if not root.is_dir():
            raise EngineError(f"engine dir {root} does not exist (create it with `ppllava export`)")
        if not path.is_file():
            raise EngineError(f"{root} has no {MANIFEST}: not an engine dir, or an export that did not finish")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineError(f"{path} is not a ppllava engine manifest")
        version = data.get("format_version")
        if version not in READS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise EngineError(
                f"{path} has format version {version}; this ppllava reads versions {', '.join(map(str, READS))}: "
                + ("upgrade ppllava" if newer else "re-export the checkpoint with `ppllava export --force`")
            )
        data = upgrade(data)
        validate(data, path)
        manifest = cls(root, data)
        if check_files:
            manifest.check_files()
        return manifest

    # ------------------------------------------------------------ file checks
    def stage(self, name: str) -> dict[str, Any]:
        try:
            return self.data["stages"][name]
        except KeyError:
            raise EngineError(f"{self.root / MANIFEST} has no '{name}' stage") from None

    def exported(self, name: str) -> bool:
        """Whether the export wrote the stage's own artifact (an engine exported with ``--llm none``
        has no ONNX LLM, though its LLM stage may hold TensorRT-LLM variants)."""
        stage = self.data["stages"].get(name, {})
        return bool(stage.get("file") or stage.get("dir"))

    def stage_variant(self, name: str, key: str) -> dict[str, Any] | None:
        """The record of the stage's variant ``key`` (``variant_key``), or None."""
        return self.data["stages"].get(name, {}).get("variants", {}).get(key)

    def variants(self, name: str, backend: str, kind: str | None = None) -> dict[str, dict[str, Any]]:
        """precision -> record of the stage's variants that ``backend`` runs (or, with ``kind``,
        its build inputs of that kind)."""
        found = self.data["stages"].get(name, {}).get("variants", {}).values()
        return {v["precision"]: v for v in found if v.get("backend") == backend and v.get("kind") == kind}

    def path(self, record: dict[str, Any]) -> Path:
        """The file or directory of a stage or variant record, inside the engine dir."""
        return inside(self.root, record.get("file") or record.get("dir"), self.root / MANIFEST)

    def stage_path(self, name: str, key: str | None = None) -> Path:
        """The stage's exported artifact, or its variant ``key`` (``variant_key``)."""
        if key is None:
            return self.path(self.stage(name))
        variant = self.stage_variant(name, key)
        if variant is None:
            have = sorted(self.stage(name).get("variants", {}))
            raise EngineError(f"the {name} stage has no {key} variant (recorded: {', '.join(have) or 'none'})")
        return self.path(variant)

    def _groups(self) -> dict[str, dict]:
        """label -> {relative path: {bytes, sha256}} for every artifact, after checking that each
        artifact's files on disk are all recorded (a deleted record must not turn a checksum off)."""
        where = self.root / MANIFEST
        groups = {}
        for name, stage in self.data["stages"].items():
            records = [(name, stage)] if self.exported(name) else []
            records += [(f"{name} ({key})", v) for key, v in stage.get("variants", {}).items()]
            for label, record in records:
                path = self.path(record)
                on_disk = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
                sibling = path.with_name(path.name + ".data")  # ONNX external data beside the graph
                on_disk += [sibling] if path.is_file() and sibling.is_file() else []
                unrecorded = [str(q.relative_to(self.root)) for q in on_disk
                              if str(q.relative_to(self.root)) not in record["files"]]
                if unrecorded:
                    raise EngineError(f"{where}: {unrecorded[0]} of the {label} artifact has no checksum record: "
                                      "refused; re-export")
                groups[label] = record["files"]
        shared = self.data["files"]
        needed = [self.data["llm"]["embeddings"], self.data["llm"].get("tokenizer"), self.data["alignment"].get("tokenizer")]
        hf_dir = self.data["llm"].get("hf_dir")
        if hf_dir and (self.root / hf_dir).is_dir():
            needed += [str(q.relative_to(self.root)) for q in sorted(inside(self.root, hf_dir, where).rglob("*"))
                       if q.is_file()]
        missing = [rel for rel in needed if rel and rel not in shared]
        if missing:
            raise EngineError(f"{where}: {missing[0]} has no checksum record: refused; re-export")
        groups["shared"] = shared  # embeddings, tokenizers, llm_hf
        return groups

    def check_files(self, verify_checksums: bool = False, progress=None) -> dict:
        """Every artifact file exists with its recorded size and sha256. Files over
        ``CHECKSUM_BYTES`` are hashed once per file version (remembered in the user's cache dir) unless
        ``verify_checksums``, which hashes everything. ``progress(done_bytes, total_bytes, path)`` is
        called per file. Returns {"files": n, "bytes": total, "hashed": bytes hashed now}."""
        where = self.root / MANIFEST
        entries = [(label, rel, rec) for label, files in self._groups().items() for rel, rec in files.items()]
        total = sum(rec["bytes"] for _, _, rec in entries)
        verified = None if verify_checksums else _Verified()
        done = hashed = 0
        for label, rel, recorded in entries:
            path = inside(self.root, rel, where)
            if not path.is_file():
                kind = "file" if label == "shared" else "stage file"
                raise EngineError(f"{label} {kind} {path} is missing; re-export or copy the whole engine dir")
            if path.stat().st_size != recorded["bytes"]:
                raise EngineError(f"{path} has {path.stat().st_size} bytes, the manifest recorded {recorded['bytes']}: "
                                  "the file was modified or truncated; re-export or copy it again")
            stamp = _Verified.stamp(path, recorded["sha256"])
            if verified is None or recorded["bytes"] <= CHECKSUM_BYTES or stamp not in verified.seen:
                if progress is not None:
                    progress(done, total, path)
                if sha256_file(path) != recorded["sha256"]:
                    raise EngineError(f"{path} does not match the checksum in {MANIFEST}: the file was modified or "
                                      "corrupted (a copy over a flaky link?); copy it again or re-export")
                hashed += recorded["bytes"]
                if verified is not None and recorded["bytes"] > CHECKSUM_BYTES:
                    verified.add(stamp)
            done += recorded["bytes"]
        if progress is not None:
            progress(done, total, None)
        return {"files": len(entries), "bytes": total, "hashed": hashed}

    # --------------------------------------------------------- typed accessors
    @property
    def variant(self) -> str:
        return self.data["variant"]

    @property
    def dims(self) -> dict[str, Any]:
        return self.data["dims"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.data["pooling"]["frame_grid"])

    def plan(self, media_type: str = "video") -> WindowPlan:
        return _plan(self.data["pooling"][media_type])

    @property
    def temperature(self) -> float:
        return float(self.data["pooling"]["temperature"])
