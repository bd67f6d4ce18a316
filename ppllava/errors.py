"""Exceptions the CLI turns into one clear line and a non-zero exit code."""


class PPLLaVAError(Exception):
    """Base class for errors caused by the user's input (checkpoint, config, arguments)."""


class ConfigError(PPLLaVAError):
    """config.json is unreadable, inconsistent or asks for something we do not support."""


class CheckpointError(PPLLaVAError):
    """Weight files are missing, truncated, or do not match the model the config describes."""


class InputError(PPLLaVAError):
    """Tensors handed to the model have the wrong shape, dtype or content."""


def require_writable(directory, what: str) -> None:
    """Refuse, before any work, a destination whose directory cannot be written."""
    import os
    from pathlib import Path

    directory = Path(directory)
    probe = directory if directory.exists() else directory.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {probe} is not writable; choose another place or fix its permissions")


# The runtime's and the tools' errors live here too, so that every package (the torch-free runtime
# included) raises from one place and the CLI catches one base class.
class EngineError(PPLLaVAError):
    """The engine directory is missing, incomplete, stale or from another format version."""


class BackendError(PPLLaVAError):
    """A backend cannot be used here (library or provider missing) or failed to load a stage."""


class Cancelled(PPLLaVAError):
    """The caller cancelled a generation (``cancel`` event set, or ``ask_stream`` closed early)."""


class ExportError(PPLLaVAError):
    """A stage could not be exported (the message carries the exporter's reason)."""


class LLMExportError(PPLLaVAError):
    """The onnxruntime-genai builder failed or is not installed."""


class TorchExportError(PPLLaVAError):
    """A stage could not be exported or compiled for the torch backend."""


class VerificationError(PPLLaVAError):
    """An exported stage disagrees with the reference beyond its tolerance."""


class BuildError(PPLLaVAError):
    """TensorRT is missing, the ONNX does not parse, or the builder fails (its messages attached)."""


class QuantizationError(PPLLaVAError):
    """Quantization failed, or the quantized stages miss their accuracy threshold."""
