"""The backend seam: one protocol, one registry, one file per backend.

A backend reads the manifest artifact it runs for each stage and precision, opens the stage
runners (named arrays in, named arrays out) and its LLM decoder (``ppllava.runtime.generation``'s
``Decoder`` contract), moves values to the host, waits for its device, and describes that device.
``Pipeline`` only orchestrates. Adding a backend is one file plus one line in ``REGISTRY``.

Each backend imports its library lazily, so a device with only onnxruntime (or only TensorRT)
needs nothing else, and importing this package imports none of them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ppllava.errors import BackendError, InputError

if TYPE_CHECKING:
    from ppllava.runtime.generation import Decoder

log = logging.getLogger(__name__)

# name -> "module:class", imported only when that backend is asked for.
REGISTRY = {
    "onnxruntime": "ppllava.runtime.backends.onnxruntime:OnnxruntimeBackend",
    "tensorrt": "ppllava.runtime.backends.tensorrt:TensorRTBackend",
    "tensorrt-llm": "ppllava.runtime.backends.tensorrt_llm:TensorRTLLMBackend",
    "torch": "ppllava.runtime.backends.pytorch:TorchBackend",
}
BACKENDS = tuple(REGISTRY)
STAGES = ("vision", "text", "pool")  # the stages a backend opens runners for (the LLM is its decoder)


class StageRunner(Protocol):
    input_names: tuple[str, ...]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...
    def close(self) -> None: ...  # release the session / engine context (Pipeline.close)


@dataclass(frozen=True)
class BackendOptions:
    """Checked here, once, for the API and the CLI alike."""

    providers: tuple[str, ...] = ("cpu",)  # onnxruntime execution providers, in order ("cuda,cpu" accepted)
    threads: int | None = None  # intra-op threads per stage; None: the library's default
    precision: str | None = None  # a quantized / built variant ("int8", "fp8", "fp16", ...)

    def __post_init__(self):
        providers = self.providers.split(",") if isinstance(self.providers, str) else self.providers
        providers = tuple(str(p).strip() for p in providers if str(p).strip())
        if not providers:
            raise InputError("providers must name at least one onnxruntime execution provider, e.g. 'cpu'")
        object.__setattr__(self, "providers", providers)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads must be an integer >= 1 (or None for the library's default), got {self.threads!r}")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu", or the GPU's name
    peak_mib: float | None = None  # peak device memory since the last reset (None: not measured)


class Backend(Protocol):
    """What ``Pipeline`` asks of a backend. Constructed as ``Backend(manifest, options)``; refuses
    (``EngineError``/``BackendError``, one line) an engine dir that lacks its artifacts."""

    name: str
    options: BackendOptions
    compute_dtype: str  # what its vision stage computes in ("fp32", "fp16", "bf16", "int8", ...)
    max_frames: int  # the most frames its vision stage accepts (a TensorRT profile may narrow the export's)
    cache_key: str  # what features from this backend depend on beyond the vision artifact's file
    torch_stages: bool  # its stages are the torch variants (`ppllava export --torch`)

    def artifact(self, stage: str) -> dict: ...  # the manifest record of the file it runs for ``stage``
    def llm_artifact(self) -> dict | None: ...  # the record of the LLM its decoder loads (None: no LLM)
    def open_stages(self) -> dict[str, StageRunner]: ...
    def open_decoder(self, embeddings: Callable[[], np.ndarray]) -> "Decoder | None": ...
    def host(self, value) -> np.ndarray: ...  # a stage output as a host numpy array
    def concat(self, tokens, row: np.ndarray): ...  # (K, D) tokens + one (D,) row, where the tokens live
    def sync(self) -> None: ...  # wait for queued device work, so that timings are real
    def device(self) -> DeviceInfo: ...
    def reset_peak_memory(self) -> None: ...


def get_backend(name: str) -> type:
    """The backend class registered as ``name`` (its module is imported now, its library later)."""
    if name not in REGISTRY:
        raise BackendError(f"backend {name!r} is unknown (known: {', '.join(BACKENDS)})")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


class HostBackend:
    """Shared behaviour of backends whose stage outputs are host numpy arrays."""

    torch_stages = False

    def host(self, value) -> np.ndarray:
        return value

    def concat(self, tokens, row: np.ndarray):
        return np.concatenate([tokens, np.asarray(row)[None].astype(tokens.dtype)], axis=0)

    def sync(self) -> None:
        pass

    def device(self) -> DeviceInfo:
        return DeviceInfo("cpu")

    def reset_peak_memory(self) -> None:
        pass


def check_identity(variant: dict, current: dict, fields: tuple[tuple[str, str], ...], verb: str, remedy: str) -> None:
    """Refuse an artifact compiled for another machine: every (key, label) in ``fields`` recorded in
    ``variant`` must equal this machine's ``current`` value."""
    for key, label in fields:
        if variant.get(key) != current.get(key):
            raise BackendError(f"{variant.get('file') or variant.get('dir')} was {verb} for {label} {variant.get(key)!r}, this machine has "
                               f"{current.get(key)!r}: {remedy}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
