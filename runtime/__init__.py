"""Torch-free inference pipeline over an engine directory.

Import name ``ppllava.runtime``. Never imports torch or the PyTorch reference; each backend imports
its own library lazily, so a device with only onnxruntime (or only TensorRT) needs nothing else.

The embedding API::

    from ppllava.runtime import Pipeline, Sampling, Cancelled

    with Pipeline.open("engine") as pipe:
        answer = pipe.ask("clip.mp4", "What happens?")
"""

from __future__ import annotations

from ppllava.errors import BackendError, Cancelled, EngineError, InputError, PPLLaVAError

__all__ = ["Answer", "BackendError", "Cancelled", "EngineError", "InputError", "PPLLaVAError", "Pipeline",
           "Sampling", "Timings"]

_LAZY = {"Pipeline": "ppllava.runtime.pipeline", "Answer": "ppllava.runtime.pipeline",
         "Timings": "ppllava.runtime.pipeline", "Sampling": "ppllava.runtime.sampling"}


def __getattr__(name: str):
    # Imported on first use, so that ``import ppllava.runtime.manifest`` (or the CLI's --help)
    # does not load onnxruntime-facing modules it does not need.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppllava.runtime' has no attribute {name!r}")
