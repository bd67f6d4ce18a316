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

from ppllava.errors import PPLLaVAError
from ppllava.plan import WindowPlan

FORMAT = "ppllava-engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFY = "verify.json"
CHECKSUM_BYTES = 64 * 2**20
REQUIRED = ("source", "variant", "dims", "preprocessing", "pooling", "alignment", "llm", "stages")  # larger files (LLM weights) are checked by size at load, by hash on request


class EngineError(PPLLaVAError):
    """The engine directory is missing, incomplete, stale or from another format version."""


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


def variant_record(root: Path, path: Path, backend: str, precision: str, **extra) -> dict:
    """The one record shape of an artifact alternative of a stage (``stages.<stage>.variants.<key>``):
    its file or directory relative to the engine dir, the backend that runs it, its precision, what
    the writer adds (identity of the machine it was built for, accuracy numbers, ...), and the size
    and SHA-256 of every file it consists of."""
    path = Path(path)
    where = {"dir": str(path.relative_to(root))} if path.is_dir() else {"file": str(path.relative_to(root))}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {**where, "backend": backend, "precision": precision, **extra, "files": file_records(root, files)}


def add_variants(engine_dir: Path, records: dict[tuple[str, str], dict]) -> list[Path]:
    """Record artifacts in the manifest, one atomic rewrite: ``records`` maps (stage, variant key)
    to a ``variant_record``. Returns the files or directories of the records they replace (the
    caller removes them once the new manifest is in place; nothing is deleted here)."""
    path = Path(engine_dir) / MANIFEST
    data = json.loads(path.read_text())
    superseded = []
    for (stage, key), record in records.items():
        variants = data["stages"][stage].setdefault("variants", {})
        previous = variants.get(key)
        if previous:
            old = previous.get("file") or previous.get("dir")
            if old and old != (record.get("file") or record.get("dir")):
                superseded.append(Path(engine_dir) / old)
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
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise EngineError(
                f"{path} has format version {version}; this ppllava reads version {FORMAT_VERSION}: "
                + ("upgrade ppllava" if newer else "re-export the checkpoint with `ppllava export --force`")
            )
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

    def stage_path(self, name: str, precision: str | None = None) -> Path:
        """The stage's artifact; ``precision`` picks a quantized variant recorded by ``ppllava quantize``."""
        stage = self.stage(name)
        if precision and precision != stage.get("precision"):
            variant = stage.get("variants", {}).get(precision)
            if variant is None:
                have = sorted({stage.get("precision", "?"), *stage.get("variants", {})})
                raise EngineError(f"the {name} stage has no {precision} variant (available: {', '.join(have)}); "
                                  f"create it with `ppllava quantize --stages {name} --precision {precision}`")
            return self.root / (variant.get("file") or variant["dir"])
        return self.root / (stage.get("file") or stage["dir"])

    def check_files(self, verify_checksums: bool = False) -> None:
        """Every stage artifact exists with the size recorded at export; files up to
        ``CHECKSUM_BYTES`` (all of them with ``verify_checksums``) also match their sha256."""
        groups = {name: stage.get("files", {}) for name, stage in self.data.get("stages", {}).items()}
        for name, stage in self.data.get("stages", {}).items():
            for precision, variant in stage.get("variants", {}).items():
                groups[f"{name} ({precision})"] = variant.get("files", {})
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
