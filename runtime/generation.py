"""The one generation loop of the runtime, split into verbs as gpt-fast does (prefill / step /
generate / forced choices), and the one prompt value every splice reads.

Every decoder implements the same contract, ``Decoder``: ``generate`` (new token ids, streaming
through ``on_token``, timings under the keys ``prefill`` and ``decode``) and ``forced_choices``
(teacher forcing). A step decoder (onnxruntime, torch) only says how to ``reset``, ``prefill`` a
prompt and ``step`` one token: ``StepDecoder`` turns that into the contract, so EOS handling,
``ignore_eos``, streaming and the timing keys are decided here once. A decoder that generates
natively (TensorRT-LLM's ModelRunner) implements ``generate`` itself with the same keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ppllava.errors import Cancelled, InputError

# The timing keys every decoder records (bench derives time to first token and ms/token from them).
PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class Prompt:
    """A prompt checked once: text ids (the image token's slot holds 0), the image token's
    position, which tokens are the pad id (they embed to zeros, as upstream), and the (K, D)
    visual tokens that replace the image token (numpy, or a device tensor of the backend)."""

    text_ids: np.ndarray
    image_pos: int
    pads: np.ndarray
    visual: object

    @classmethod
    def build(cls, input_ids, visual, image_token_id: int, vocab_size: int, pad_token_id: int | None) -> "Prompt":
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        where = np.flatnonzero(ids == image_token_id)
        if where.size != 1:
            raise InputError(f"input_ids must hold exactly one image token ({image_token_id}), found {where.size}")
        text_ids = np.where(ids == image_token_id, 0, ids)
        if text_ids.min() < 0 or text_ids.max() >= vocab_size:
            raise InputError(f"input_ids must lie in [0, {vocab_size}) apart from the image token")
        pads = ids == pad_token_id if pad_token_id is not None else np.zeros(ids.shape, bool)
        return cls(text_ids, int(where[0]), pads, visual)

    @property
    def length(self) -> int:
        """Positions after the splice: text tokens without the image token, plus K visual tokens."""
        return len(self.text_ids) - 1 + int(self.visual.shape[0])

    def embeds(self, embed_tokens: np.ndarray) -> np.ndarray:
        """(1, L - 1 + K, D) float32 on the host: the text embeddings with the visual tokens spliced in."""
        embeds = np.asarray(embed_tokens[self.text_ids], dtype=np.float32)
        embeds[self.pads] = 0.0
        visual = np.asarray(self.visual, dtype=np.float32)
        return np.concatenate([embeds[: self.image_pos], visual, embeds[self.image_pos + 1 :]])[None]

    def prompt_table(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """TensorRT-LLM's multimodal input: (1, L - 1 + K) ids and the (K + 1, D) prompt table. The
        image token becomes ids vocab_size .. vocab_size+K-1, which index the table's rows (the
        visual tokens); pad-id tokens point at its last row, zeros (as they embed everywhere else)."""
        K = int(self.visual.shape[0])
        visual = np.asarray(self.visual, dtype=np.float32)
        table = np.concatenate([visual, np.zeros((1, visual.shape[1]), np.float32)])
        ids = np.where(self.pads, vocab_size + K, self.text_ids)
        fake = np.arange(vocab_size, vocab_size + K, dtype=np.int64)
        return np.concatenate([ids[: self.image_pos], fake, ids[self.image_pos + 1 :]])[None], table


class Decoder(Protocol):
    """What ``Pipeline`` asks of an LLM, whichever backend runs it."""

    def generate(self, prompt: Prompt, max_new_tokens: int, sampler: Callable[[np.ndarray], int], eos: set[int],
                 ignore_eos: bool = False, on_token: Callable[[int], None] | None = None,
                 timings=None, cancel=None) -> list[int]: ...  # cancel: anything with is_set(); raises Cancelled

    def forced_choices(self, prompt: Prompt, forced: list[int]) -> list[int]: ...

    teacher_forcing: bool  # whether forced_choices is available


def check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation cancelled")


def _record(timings, key: str, seconds: float) -> None:
    if timings is not None:
        timings.add(key, seconds)


class StepDecoder:
    """The loop, on top of three verbs a subclass provides:

    - ``reset(capacity)``: start a new sequence of at most ``capacity`` positions;
    - ``prefill(prompt)``: append the spliced prompt; the last position's logits (V,) float32;
    - ``step(token)``: append one token by id; its logits.

    and ``sync()`` where the device runs asynchronously (so that timings are real).
    """

    teacher_forcing = True  # forced_choices works (a native decoder may not offer it)

    def reset(self, capacity: int | None = None) -> None:
        raise NotImplementedError

    def prefill(self, prompt: Prompt) -> np.ndarray:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on synchronous decoders)."""

    def generate(self, prompt: Prompt, max_new_tokens: int, sampler: Callable[[np.ndarray], int], eos: set[int],
                 ignore_eos: bool = False, on_token: Callable[[int], None] | None = None,
                 timings=None, cancel=None) -> list[int]:
        """New token ids, chosen by ``sampler(logits)`` (a ``TokenSampler``; ``.sampling`` says how), until an ``eos`` id (kept, unless
        ``ignore_eos``) or ``max_new_tokens``; each token goes to ``on_token`` as soon as it is chosen.
        ``cancel.is_set()`` is checked before every step: ``Cancelled`` is raised within one step."""
        tokens: list[int] = []
        if max_new_tokens < 1:
            return tokens
        t0 = time.perf_counter()
        self.reset(capacity=prompt.length + max_new_tokens)
        logits = self.prefill(prompt)
        self.sync()
        _record(timings, PREFILL, time.perf_counter() - t0)
        t0 = time.perf_counter()
        while True:
            token = int(sampler(logits))
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if (token in eos and not ignore_eos) or len(tokens) == max_new_tokens:
                break
            check_cancel(cancel)
            logits = self.step(token)
        self.sync()
        _record(timings, DECODE, time.perf_counter() - t0)
        return tokens

    def forced_logits(self, prompt: Prompt, forced: list[int]) -> np.ndarray:
        """Teacher forcing: feed ``forced`` one by one; (len(forced), V) logits, row i the ones
        that choose token i."""
        self.reset(capacity=prompt.length + len(forced))
        rows = [self.prefill(prompt)] if forced else []
        for token in forced[:-1]:
            rows.append(self.step(int(token)))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def forced_choices(self, prompt: Prompt, forced: list[int]) -> list[int]:
        """Teacher forcing: the greedy choice before each of ``forced``."""
        return [int(np.argmax(row)) for row in self.forced_logits(prompt, forced)]
