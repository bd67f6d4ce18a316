"""Prompts and token ids: the chat template from the manifest, the LLM tokenizer and the alignment
tokenizer, all through the ``tokenizers`` library."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ppllava.errors import InputError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
MAX_QUESTION_CHARS = 20_000


def render(template: dict, turns: list[tuple[str, str | None]]) -> str:
    """Prompt text for [(question, answer or None)], the image placeholder in the first turn, as
    upstream's Conversation.get_prompt builds it."""
    text = template["system"]
    for i, (question, answer) in enumerate(turns):
        text += template["user"] + (template["image"] if i == 0 else "") + question + template["user_end"] + template["assistant"]
        if answer is not None:
            text += answer + template["assistant_end"]
    return text


def check_question(question: str) -> str:
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the question is not valid UTF-8 text") from None
    question = question.strip()
    if not question:
        raise InputError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"the question has {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}")
    if IMAGE_PLACEHOLDER in question:
        raise InputError(f"the question must not contain {IMAGE_PLACEHOLDER!r}: the video takes that place")
    return question


def _load(root: Path, rel: str | None):
    if not rel:
        return None
    from tokenizers import Tokenizer

    from ppllava.errors import EngineError

    try:
        return Tokenizer.from_file(str(root / rel))
    except Exception as exc:  # the tokenizers library raises a bare Exception for unreadable files
        raise EngineError(f"{root / rel} is not a readable tokenizer ({str(exc).splitlines()[0]}); re-export") from None


class Tokenizers:
    def __init__(self, root: Path, manifest: dict):
        self.llm_spec, self.align_spec = manifest["llm"], manifest["alignment"]
        self.llm = _load(root, self.llm_spec.get("tokenizer"))
        self.alignment = _load(root, self.align_spec.get("tokenizer"))

    def require(self) -> None:
        missing = [name for name, tok in (("LLM", self.llm), ("alignment", self.alignment)) if tok is None]
        if missing:
            raise InputError(
                f"this engine dir has no {' or '.join(missing)} tokenizer (see manifest.json), so it cannot take text "
                "questions; re-export with the tokenizer available, or pass token ids through Pipeline.generate_ids"
            )

    def prompt_ids(self, turns: list[tuple[str, str | None]]) -> np.ndarray:
        """(1, L) LLM ids of the rendered conversation with the image token in place of <image>."""
        text = render(self.llm_spec["template"], turns)
        image = int(self.llm_spec["image_token_id"])
        if self.llm.token_to_id(IMAGE_PLACEHOLDER) == image:
            # As upstream's processor: the whole prompt in one call, special tokens (e.g. BOS) included,
            # so the tokenizer sees the same text boundaries.
            ids = self.llm.encode(text).ids
        else:  # a tokenizer without the <image> token: splice its id between the two halves
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            ids = self.llm.encode(before).ids + [image] + self.llm.encode(after, add_special_tokens=False).ids
        if ids.count(image) != 1:
            raise InputError(f"the prompt must hold exactly one image token ({image}); the tokenizer produced {ids.count(image)}")
        return np.asarray([ids], dtype=np.int64)

    def alignment_ids(self, question: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(1, max_length) ids padded as upstream (CLIP: EOT padding with a mask; SigLIP: no mask)."""
        spec = self.align_spec
        ids = self.alignment.encode(question).ids
        limit = int(spec["max_length"])
        if len(ids) > limit:
            log.warning("question truncated to the alignment tower's %d tokens (it had %d)", limit, len(ids))
            ids = ids[: limit - 1] + ids[-1:]  # keep the end-of-text token, as truncation=True does
        pad = spec.get("pad_id")
        pad = ids[-1] if pad is None else int(pad)
        mask = [1] * len(ids) + [0] * (limit - len(ids))
        ids = ids + [pad] * (limit - len(ids))
        return np.asarray([ids], np.int64), (np.asarray([mask], np.int64) if spec.get("mask") else None)

    def decode(self, ids: list[int]) -> str:
        return self.llm.decode(ids, skip_special_tokens=True) if self.llm else " ".join(map(str, ids))
