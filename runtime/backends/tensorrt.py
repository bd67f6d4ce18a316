"""The ``tensorrt`` backend: vision / text / pool as TensorRT plans from ``ppllava build-engines``
(run through Polygraphy's runner), the LLM in onnxruntime. TensorRT, Polygraphy and cuda-python
are imported lazily, only where they exist. A plan built for another TensorRT version or GPU is
refused with a message saying to rebuild. Never run on hardware by this project: exercised by
contract tests against stubs of those libraries' documented APIs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ppllava.errors import BackendError, EngineError
from ppllava.runtime.backends import STAGES, BackendOptions, DeviceInfo, HostBackend, check_identity
from ppllava.runtime.manifest import Manifest, variant_key


def check_plan(variant: dict, current: dict) -> None:
    """Refuse a plan whose TensorRT version or GPU differs from this machine's."""
    check_identity(variant, current, (("tensorrt", "TensorRT version"), ("gpu", "GPU"),
                                      ("compute_capability", "compute capability")),
                   "built", "rebuild it here with `ppllava build-engines`")


def current_identity() -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed here (backend 'tensorrt')") from None
    try:
        from cuda import cudart  # cuda-python, installed beside TensorRT
    except ImportError:
        raise BackendError("cuda-python is not installed (pip install cuda-python): it identifies the GPU") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise BackendError(f"no usable CUDA GPU (cudaGetDeviceProperties failed: {err})")
    gpu = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": f"{props.major}.{props.minor}"}


class TrtStage:
    """One TensorRT plan; named I/O and per-call input shapes through Polygraphy's runner."""

    def __init__(self, path: Path, variant: dict):
        check_plan(variant, current_identity())
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise BackendError("polygraphy is not installed (pip install polygraphy)") from None
        self.path = path
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
        self.runner.activate()
        self.input_names = tuple(self.runner.get_input_metadata().keys())

    def close(self) -> None:
        self.runner.deactivate()  # frees the execution context and device buffers

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(self.runner.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()}))


class TensorRTBackend(HostBackend):
    """The ``tensorrt-<precision>`` plan variant of every stage (fp16 by default); the ONNX LLM."""

    name = "tensorrt"

    def __init__(self, manifest: Manifest, options: BackendOptions = BackendOptions()):
        self.manifest, self.options = manifest, options
        precision = options.precision or "fp16"
        self.key = variant_key("tensorrt", precision)
        self.compute_dtype = precision
        missing = [n for n in STAGES if manifest.stage_variant(n, self.key) is None]
        if missing:
            raise EngineError(f"no {precision} TensorRT plans for {', '.join(missing)}: build them on this GPU with "
                              f"`ppllava build-engines {manifest.root} --precision {precision}`")
        self.max_frames = int(manifest.dims["max_frames"])
        # a plan's profile may cover fewer frames than the export (build-engines --max-frames)
        profile = self.artifact("vision").get("profile", {}).get("pixel_values")
        if profile:
            self.max_frames = min(self.max_frames, int(profile[2][0]))
        self.cache_key = self.artifact("vision")["file"]

    def artifact(self, stage: str) -> dict:
        return self.manifest.stage_variant(stage, self.key)

    def open_stages(self) -> dict:
        return {n: TrtStage(self.manifest.path(self.artifact(n)), self.artifact(n)) for n in STAGES}

    def llm_artifact(self) -> dict | None:
        from ppllava.runtime.backends.onnxruntime import onnx_llm_record

        return onnx_llm_record(self.manifest, self.options.precision)

    def open_decoder(self, embeddings):
        from ppllava.runtime.backends.onnxruntime import open_onnx_llm

        return open_onnx_llm(self.manifest, self.options, embeddings)

    def device(self) -> DeviceInfo:
        return DeviceInfo(current_identity()["gpu"])
