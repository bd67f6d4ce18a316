"""The engine directory's contract: ``manifest.json`` read, validated and checked against its files.

Torch-free. The runtime never guesses: every shape, id, preprocessing constant and pooling plan it
uses comes from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppllava.errors import EngineError
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
REQUIRED = ("source", "variant", "dims", "preprocessing", "pooling", "alignment", "llm", "stages")  # larger files (LLM weights) are checked by size at load, by hash on request


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
    if built:
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


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON beside ``path`` and rename over it: readers see the old or the new file, never half."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


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
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise EngineError(f"{path} lacks {', '.join(missing)}: damaged or hand-edited; re-export")
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
        rel = record.get("file") or record.get("dir")
        if not isinstance(rel, str) or not rel:
            raise EngineError(f"{self.root / MANIFEST} has an artifact record without a file: damaged; re-export")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise EngineError(f"{self.root / MANIFEST} names {rel!r}, outside the engine dir: refused")
        return self.root / rel

    def stage_path(self, name: str, key: str | None = None) -> Path:
        """The stage's exported artifact, or its variant ``key`` (``variant_key``)."""
        if key is None:
            return self.path(self.stage(name))
        variant = self.stage_variant(name, key)
        if variant is None:
            have = sorted(self.stage(name).get("variants", {}))
            raise EngineError(f"the {name} stage has no {key} variant (recorded: {', '.join(have) or 'none'})")
        return self.path(variant)

    def check_files(self, verify_checksums: bool = False) -> None:
        """Every stage artifact exists with the size recorded at export; files up to
        ``CHECKSUM_BYTES`` (all of them with ``verify_checksums``) also match their sha256."""
        groups = {name: stage.get("files", {}) for name, stage in self.data.get("stages", {}).items()}
        for name, stage in self.data.get("stages", {}).items():
            for key, variant in stage.get("variants", {}).items():
                groups[f"{name} ({key})"] = variant.get("files", {})
        groups["shared"] = self.data.get("files", {})  # embeddings, tokenizers
        for name, files in groups.items():
            for rel, recorded in files.items():
                path = self.root / rel
                if not path.is_file():
                    raise EngineError(f"{name} stage file {path} is missing; re-export or copy the whole engine dir")
                if path.stat().st_size != recorded["bytes"]:
                    raise EngineError(
                        f"{path} has {path.stat().st_size} bytes, the manifest recorded {recorded['bytes']}: "
                        "the file was modified or truncated; re-export"
                    )
                if (verify_checksums or recorded["bytes"] <= CHECKSUM_BYTES) and sha256_file(path) != recorded["sha256"]:
                    raise EngineError(f"{path} does not match the checksum in {MANIFEST}: the file was modified or corrupted")

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
