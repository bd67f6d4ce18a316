"""Token generation over a prefilled prompt with a KV cache: greedy or sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ppllava.errors import InputError
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingOptions:
    """Decoding settings. Defaults mirror transformers' generate (top_k=50 when sampling)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k!r}")


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (V,) logits that chose each token


class TokenChooser:
    def __init__(self, options: SamplingOptions, device: torch.device):
        self.options = options
        self.warpers = LogitsProcessorList()
        self.generator = None
        if options.do_sample:
            if options.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                self.warpers.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(options.top_p))
            self.generator = torch.Generator(device=device)
            if options.seed is not None:
                self.generator.manual_seed(options.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """logits (1, V) float -> next token id."""
        if not self.options.do_sample:
            return int(logits.argmax(dim=-1))
        scores = self.warpers(history, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@torch.inference_mode()
def generate_from_embeds(
    llm,
    inputs_embeds: torch.Tensor,
    max_new_tokens: int,
    options: SamplingOptions,
    eos_token_ids: set[int],
    keep_logits: bool = False,
    on_token=None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Generation:
    """Prefill ``inputs_embeds`` (1, L, D) in one call, then decode one token per step from the cache.

    Stops after ``max_new_tokens`` or at an end-of-sequence token (which is returned, as
    transformers' generate does). ``on_token(id)`` is called as each token is chosen (streaming).
    A padded prompt passes its ``attention_mask`` and ``position_ids``; each new token then takes
    position (attended tokens - 1), as upstream does.
    """
    result = Generation()
    if max_new_tokens <= 0:
        return result
    device = inputs_embeds.device
    chooser = TokenChooser(options, device)
    cache = DynamicCache()
    # Only the last position's logits are used: ask for those alone (as transformers' own generate
    # does; Llama and Qwen2 take ``logits_to_keep`` on 4.x and 5.x), not a vocabulary-wide GEMM per position.
    logits = llm(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True, logits_to_keep=1,
    ).logits[:, -1]
    history = torch.zeros(1, 0, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = chooser(logits, history)
        result.tokens.append(token)
        if keep_logits:
            result.step_logits.append(logits[0].float().clone())
        if on_token is not None:
            on_token(token)
        if token in eos_token_ids or step == max_new_tokens - 1:
            break
        next_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        history = torch.cat([history, next_ids], dim=1)
        masking = {}
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
            masking = {"attention_mask": attention_mask, "position_ids": attention_mask.sum(-1, keepdim=True) - 1}
        logits = llm(input_ids=next_ids, past_key_values=cache, use_cache=True, **masking).logits[:, -1]
    return result
