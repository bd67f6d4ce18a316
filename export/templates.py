"""Prompt templates, recorded in the manifest so the runtime builds prompts exactly as upstream does.

A template is the upstream ``Conversation`` reduced to strings: a turn is
``user + [image on the first turn] + question + user_end + assistant``, and a finished answer is
followed by ``assistant_end``.
"""

from __future__ import annotations

from ppllava.errors import PPLLaVAError

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


def render(template: dict, turns: list[tuple[str, str | None]]) -> str:
    """Prompt text for [(question, answer or None)], the image placeholder in the first turn."""
    text = template["system"]
    for i, (question, answer) in enumerate(turns):
        text += template["user"] + (template["image"] if i == 0 else "") + question + template["user_end"] + template["assistant"]
        if answer is not None:
            text += answer + template["assistant_end"]
    return text
