"""Prompts and token ids: the chat template from the manifest, the LLM tokenizer and the alignment
tokenizer, all through the ``tokenizers`` library."""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path

import numpy as np

from ppllava.errors import InputError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
MAX_QUESTION_CHARS = 20_000


def pieces(template: dict, turns: list[tuple[str, str | None]]) -> list[tuple[str, bool]]:
    """(text, from the template) pieces of [(question, answer or None)], the image placeholder in the
    first turn, as upstream's Conversation.get_prompt orders them: only the template's pieces may
    hold control tokens."""
    out = [(template["system"], True)]
    for i, (question, answer) in enumerate(turns):
        out += [(template["user"] + (template["image"] if i == 0 else ""), True), (question, False),
                (template["user_end"] + template["assistant"], True)]
        if answer is not None:
            out += [(answer, False), (template["assistant_end"], True)]
    return out


def render(template: dict, turns: list[tuple[str, str | None]]) -> str:
    """Prompt text for [(question, answer or None)]."""
    return "".join(text for text, _ in pieces(template, turns))


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


def _plain_copies(tokenizer):
    """(at the start, elsewhere): copies with ``encode_special_tokens`` on, so added tokens are not
    split out of the text. It skips only tokens marked special, so all are marked (Qwen2.5's
    <tool_call>, for one, is not). Metaspace's prepend_scheme "first" prefixes "▁" at offset 0 of
    the whole prompt only, but every run encoded alone starts at 0: the second copy never prefixes."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    for token in spec["added_tokens"]:
        token["special"] = True
    at_start = json.dumps(spec)
    _never_prepend(spec["pre_tokenizer"])
    copies = []
    for text in dict.fromkeys((at_start, json.dumps(spec))):  # one copy when nothing changed
        copies.append(Tokenizer.from_str(text))
        copies[-1].encode_special_tokens = True
    return copies[0], copies[-1]


def _never_prepend(node) -> None:
    if isinstance(node, dict) and node.get("prepend_scheme") == "first":
        node["prepend_scheme"] = "never"
    for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        _never_prepend(child)


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
        """(1, L) LLM ids of the conversation with the image token in place of <image>.

        Only the template's pieces are parsed for control tokens; questions and answers are plain
        text, so a typed "<|im_end|>\n<|im_start|>system" cannot close the turn or forge one. The text
        is cut only where the template's control tokens stand, where one encode of the whole prompt
        cuts it too, so a normal question gets upstream's ids."""
        at_start, elsewhere = self._plain
        image = int(self.llm_spec["image_token_id"])
        ids, control, typed = [], {image, *self._frame[0], *self._frame[1]}, set()
        for segment in self._segments(turns):
            if isinstance(segment, int):
                ids.append(segment)
                control.add(segment)
            elif segment:
                text = (elsewhere if ids else at_start).encode(segment, add_special_tokens=False).ids
                ids += text
                typed.update(text)
        if typed & control:  # the tokenizer's model itself maps the text to them (e.g. BPE merges)
            raise InputError(f"this tokenizer reads the question or chat history as control tokens "
                             f"{sorted(typed & control)} even as plain text; rephrase it")
        prefix, suffix = self._frame
        if ids[: len(prefix)] == prefix:
            prefix = []  # the template renders the BOS itself (chatml's <|im_start|> in SmolLM2): not twice
        ids = prefix + ids + suffix
        if ids.count(image) != 1:
            raise InputError(f"the prompt must hold exactly one image token ({image}); the tokenizer produced {ids.count(image)}")
        return np.asarray([ids], dtype=np.int64)

    def _segments(self, turns: list[tuple[str, str | None]]) -> list[str | int]:
        """Text runs and control-token ids. The tokenizer parses the template's pieces, so its own
        matching rules apply; <image> is the image token even where the tokenizer lacks it."""
        image = int(self.llm_spec["image_token_id"])
        added = self._added
        out: list[str | int] = [""]
        for text, trusted in pieces(self.llm_spec["template"], turns):
            if not trusted:
                out[-1] += text
                continue
            for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if k:
                    out += [image, ""]
                enc, start = self.llm.encode(part, add_special_tokens=False), 0
                for token, (a, b) in zip(enc.ids, enc.offsets):
                    if token in added:
                        out[-1] += part[start:a]
                        out += [token, ""]
                        start = b
                out[-1] += part[start:]
        return out

    @cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self.llm.get_added_tokens_decoder())

    @cached_property
    def _plain(self):
        """Copies of the LLM tokenizer that read every added token as text, for the text run at the
        start of the prompt and for the others (see _plain_copies)."""
        return _plain_copies(self.llm)

    @cached_property
    def _frame(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a sequence (e.g. LLaMA's BOS)."""
        enc = self.llm.encode("a")
        body = [i for i, special in enumerate(enc.special_tokens_mask) if not special]
        return enc.ids[: body[0]], enc.ids[body[-1] + 1 :]

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
