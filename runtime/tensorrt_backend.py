"""TensorRT and TensorRT-LLM behind the runtime's stage interface (imported lazily, only where the
libraries exist). A plan built for another TensorRT version or GPU is refused with a message saying
to rebuild; the prompt table of TensorRT-LLM addresses visual tokens by ids from the vocabulary
size upward."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ppllava.errors import InputError
from ppllava.runtime.backends import BackendError, check_identity


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

    def __init__(self, root: Path, variant: dict):
        check_plan(variant, current_identity())
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise BackendError("polygraphy is not installed (pip install polygraphy)") from None
        self.path = root / variant["file"]
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
        self.runner.activate()
        self.input_names = tuple(self.runner.get_input_metadata().keys())

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(self.runner.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()}))


def prompt_table_inputs(input_ids: np.ndarray, visual: np.ndarray, image_token_id: int, vocab_size: int):
    """TensorRT-LLM's multimodal input: the image token is replaced by ids vocab_size .. vocab_size+K-1,
    which index rows of the prompt table (the K visual tokens)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    where = np.flatnonzero(ids == image_token_id)
    if where.size != 1:
        raise InputError(f"input_ids must hold exactly one image token ({image_token_id}), found {where.size}")
    pos = int(where[0])
    fake = np.arange(vocab_size, vocab_size + visual.shape[0], dtype=np.int64)
    return np.concatenate([ids[:pos], fake, ids[pos + 1 :]])[None], visual


def embed_with_prompt_table(ids: np.ndarray, table: np.ndarray, embed_tokens: np.ndarray) -> np.ndarray:
    """What TensorRT-LLM's embedding layer computes with a prompt table (for checking the ids)."""
    vocab = embed_tokens.shape[0]
    flat = ids.reshape(-1)
    out = np.where((flat >= vocab)[:, None], table[np.clip(flat - vocab, 0, len(table) - 1)],
                   np.asarray(embed_tokens)[np.clip(flat, 0, vocab - 1)])
    return out[None].astype(np.float32)


class TrtLLMDecoder:
    """The LLM as a TensorRT-LLM engine (``ModelRunner``), visual tokens passed as a prompt table."""

    def __init__(self, engine_dir: Path):
        try:
            from tensorrt_llm.runtime import ModelRunner
        except ImportError:
            raise BackendError("TensorRT-LLM is not installed here (backend 'tensorrt-llm')") from None
        self.runner = ModelRunner.from_dir(engine_dir=str(engine_dir))

    def generate(self, ids: np.ndarray, table: np.ndarray, max_new_tokens: int, end_ids: set[int], pad_id: int,
                 on_token=None) -> list[int]:
        """Greedy generation (not streamed yet); the other end-of-sequence ids act as stop words."""
        import torch  # TensorRT-LLM's runtime is torch-based; only this backend imports it

        end_id = min(end_ids) if end_ids else pad_id
        stops = [[[t] for t in sorted(end_ids - {end_id})]] if len(end_ids) > 1 else None
        outputs = self.runner.generate(
            batch_input_ids=[torch.from_numpy(ids[0]).int()], prompt_table=torch.from_numpy(table).half()[None],
            prompt_tasks="0", max_new_tokens=max_new_tokens, end_id=end_id, pad_id=pad_id, stop_words_list=stops,
            streaming=False, return_dict=True, output_sequence_lengths=True,
        )
        length = int(outputs["sequence_lengths"][0, 0])
        return outputs["output_ids"][0, 0, ids.shape[1]:length].tolist()
