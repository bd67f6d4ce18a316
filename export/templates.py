"""Prompt templates, recorded in the manifest so the runtime builds prompts exactly as upstream does.

A template is the upstream ``Conversation`` reduced to strings: a turn is
``user + [image on the first turn] + question + user_end + assistant``, and a finished answer is
followed by ``assistant_end``.
"""

from __future__ import annotations

from ppllava.errors import PPLLaVAError
from ppllava.runtime.prompt import render  # noqa: F401  (re-exported: the runtime owns prompt rendering)

TEMPLATES = {
    # upstream conv_plain_v1: roles ("USER: ", "ASSISTANT: "), sep (" ", "</s>"), mm_token "<image>\n"
    "plain_v1": {"system": "", "user": "USER: ", "user_end": " ", "assistant": "ASSISTANT: ", "assistant_end": "</s>",
                 "image": "<image>\n"},
    # upstream conv_plain_qwen: chatml roles, "<|im_end|>\n" after both
    "plain_qwen": {"system": "", "user": "<|im_start|>user\n", "user_end": "<|im_end|>\n",
                   "assistant": "<|im_start|>assistant\n", "assistant_end": "<|im_end|>\n", "image": "<image>\n"},
}


def choose_template(requested: str, variant: str, chat_template: str | None) -> dict:
    """``auto``: the variant's upstream template, or the chatml one when the LLM's own chat template
    is chatml (e.g. a Llama-architecture chatml model in the Vicuna layout)."""
    if requested == "auto":
        if variant == "qwen" or (chat_template and "<|im_start|>" in chat_template):
            requested = "plain_qwen"
        else:
            requested = "plain_v1"
    if requested not in TEMPLATES:
        raise PPLLaVAError(f"--template must be auto or one of {', '.join(TEMPLATES)}, got {requested!r}")
    return {"name": requested, **TEMPLATES[requested]}
