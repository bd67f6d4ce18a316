"""The ``tensorrt-llm`` backend: TensorRT plans for vision / text / pool (as ``tensorrt``) and the
LLM as a TensorRT-LLM engine run by its ``ModelRunner``, the visual tokens passed as a prompt table
(rows addressed by ids from the vocabulary size upward).

``ModelRunner`` generates whole sequences itself, so ``TrtLLMDecoder`` implements the ``Decoder``
contract natively: it always asks for ``streaming=True``, which yields the growing output after
every step; the first yield ends the prefill (time to first token), each later one is streamed to
``on_token`` as it arrives, and the timings carry ``prefill`` and ``decode`` like every decoder.
Never run on hardware by this project: exercised by contract tests against a stub of the
documented ``tensorrt_llm.runtime.ModelRunner`` API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ppllava.errors import BackendError, EngineError
from ppllava.runtime.backends import BackendOptions, check_identity
from ppllava.runtime.backends.tensorrt import TensorRTBackend, current_identity
from ppllava.runtime.generation import DECODE, PREFILL, Prompt, check_cancel
from ppllava.runtime.manifest import Manifest


class TensorRTLLMBackend(TensorRTBackend):
    name = "tensorrt-llm"

    def __init__(self, manifest: Manifest, options: BackendOptions = BackendOptions()):
        super().__init__(manifest, options)
        built = list(manifest.variants("llm", self.name).values())  # build-engines keeps one
        if not built or not manifest.path(built[0]).is_dir():
            raise EngineError(f"no TensorRT-LLM engine recorded in {manifest.root}: run `ppllava build-engines "
                              f"{manifest.root} --llm-scheme SCHEME` on this GPU")
        self.llm = built[0]
        self.engine_dir = manifest.path(self.llm)

    def llm_artifact(self) -> dict:
        return self.llm

    def open_decoder(self, embeddings):
        # TensorRT-LLM holds the LLM itself: no ONNX copy is opened; only the vocabulary size is read.
        check_identity(self.llm, current_identity(), (("tensorrt", "TensorRT version"), ("gpu", "GPU")),
                       "built", "rebuild it here with `ppllava build-engines --llm-scheme`")
        return TrtLLMDecoder(self.engine_dir, vocab_size=int(embeddings().shape[0]),
                             pad_id=int(self.manifest.data["llm"].get("pad_token_id") or 0))


def stop_words(tokens: list[int]) -> np.ndarray:
    """Single-token stop words in TensorRT-LLM's word-list format, what ``to_word_list_format``
    produces: int32 (1, 2, n), row 0 the flat ids, row 1 each word's end offset."""
    return np.array([[tokens, list(range(1, len(tokens) + 1))]], dtype=np.int32)


def embed_with_prompt_table(ids: np.ndarray, table: np.ndarray, embed_tokens: np.ndarray) -> np.ndarray:
    """What TensorRT-LLM's embedding layer computes with a prompt table (for checking the ids)."""
    vocab = embed_tokens.shape[0]
    flat = ids.reshape(-1)
    out = np.where((flat >= vocab)[:, None], table[np.clip(flat - vocab, 0, len(table) - 1)],
                   np.asarray(embed_tokens)[np.clip(flat, 0, vocab - 1)])
    return out[None].astype(np.float32)


class TrtLLMDecoder:
    """The LLM as a TensorRT-LLM engine (``ModelRunner``), visual tokens passed as a prompt table."""

    teacher_forcing = False  # ModelRunner generates whole sequences

    def __init__(self, engine_dir: Path, vocab_size: int, pad_id: int = 0):
        try:
            from tensorrt_llm.runtime import ModelRunner
        except ImportError:
            raise BackendError("TensorRT-LLM is not installed here (backend 'tensorrt-llm')") from None
        self.runner = ModelRunner.from_dir(engine_dir=str(engine_dir))
        self.vocab_size = vocab_size
        self.pad_id = pad_id

    def generate(self, prompt: Prompt, max_new_tokens: int, sampler, eos: set[int], ignore_eos: bool = False,
                 on_token=None, timings=None, cancel=None) -> list[int]:
        """Tokens as the runner streams them; other end-of-sequence ids act as stop words."""
        import torch  # TensorRT-LLM's runtime is torch-based; only this backend imports it

        if max_new_tokens < 1:
            return []
        ids, table = prompt.prompt_table(self.vocab_size)
        table = torch.from_numpy(table).half()[None]
        if ignore_eos or not eos:
            end_id, stops = -1, None  # -1: no end id, generate max_new_tokens
        else:
            end_id = min(eos)
            stops = stop_words(sorted(eos - {end_id})) if len(eos) > 1 else None
        sampling = sampler.sampling
        options = {"top_k": 1} if sampling.temperature == 0 else {
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            # like TokenSampler: a given seed repeats, no seed draws a fresh one
            "random_seed": sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")}
        start = ids.shape[1]
        tokens: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        stream = self.runner.generate(
            batch_input_ids=[torch.from_numpy(ids[0]).int()], prompt_table=table, prompt_tasks="0",
            max_new_tokens=max_new_tokens, end_id=end_id, pad_id=self.pad_id,
            stop_words_list=stops, streaming=True, return_dict=True, output_sequence_lengths=True, **options,
        )
        for output in stream:
            if cancel is not None and cancel.is_set():
                stream.close()  # stops the runner's generation loop
                check_cancel(cancel)
            length = int(output["sequence_lengths"][0, 0])
            new = output["output_ids"][0, 0, start:length].tolist()
            if t_first is None and new:
                t_first = time.perf_counter()
            for token in new[len(tokens):]:
                tokens.append(int(token))
                if on_token is not None:
                    on_token(int(token))
        if (end_id >= 0 and len(tokens) < max_new_tokens and (not tokens or tokens[-1] not in eos)):
            # the runner stopped at the end id without counting it in sequence_lengths: keep it, as
            # every other decoder does
            tokens.append(end_id)
            if on_token is not None:
                on_token(end_id)
        t_end = time.perf_counter()
        if timings is not None:
            timings.add(PREFILL, (t_first or t_end) - t0)
            timings.add(DECODE, t_end - (t_first or t_end))
        return tokens[:max_new_tokens]

    def forced_choices(self, prompt: Prompt, forced: list[int]) -> list[int]:
        raise EngineError("teacher forcing needs a step decoder (onnxruntime or torch); ModelRunner generates whole "
                          "sequences")
