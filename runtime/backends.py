"""Stage backends behind one small interface: named numpy arrays in, named numpy arrays out.

Each backend imports its library lazily, so a device with only onnxruntime (or only TensorRT)
needs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from ppllava.errors import PPLLaVAError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class BackendError(PPLLaVAError):
    """A backend cannot be used here (library or provider missing) or failed to load a stage."""


class StageRunner(Protocol):
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...


def make_session(path: Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
    """An onnxruntime session with the requested providers (each must exist here), quiet logging,
    and no busy-waiting between runs."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed: pip install 'ppllava[runtime]'") from None
    available = set(ort.get_available_providers())
    chosen = []
    for name in providers:
        provider = PROVIDERS.get(name, name)
        if provider not in available:
            raise BackendError(
                f"onnxruntime provider {provider} is not available here (available: {', '.join(sorted(available))})"
            )
        chosen.append(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Spinning intra-op threads would steal the cores that video decoding, the next stage (or a
    # baseline measured in the same process) need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise BackendError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


class OrtStage:
    """One ONNX stage in an onnxruntime InferenceSession."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
        self.session = make_session(path, providers, threads)
        self.path = path
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise BackendError(f"{self.path.name} needs inputs {sorted(missing)}")
        feed = {}
        for name in self.input_names:
            value = inputs[name]
            want = self._input_types[name]
            if want == "tensor(float16)" and value.dtype != np.float16:
                value = value.astype(np.float16)
            elif want == "tensor(float)" and value.dtype != np.float32:
                value = value.astype(np.float32)
            elif want == "tensor(int64)" and value.dtype != np.int64:
                value = value.astype(np.int64)
            feed[name] = np.ascontiguousarray(value)
        try:
            outputs = self.session.run(list(self.output_names), feed)
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"{self.path.name} failed in onnxruntime: {first_line(exc)}") from None
        return dict(zip(self.output_names, outputs))


def check_identity(variant: dict, current: dict, fields: tuple[tuple[str, str], ...], verb: str, remedy: str) -> None:
    """Refuse an artifact compiled for another machine: every (key, label) in ``fields`` recorded in
    ``variant`` must equal this machine's ``current`` value."""
    for key, label in fields:
        if variant.get(key) != current.get(key):
            raise BackendError(f"{variant.get('file')} was {verb} for {label} {variant.get(key)!r}, this machine has "
                               f"{current.get(key)!r}: {remedy}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
