"""Tokenizers for the engine dir, all in ``tokenizer.json`` form for the ``tokenizers`` library.

- LLM: the checkpoint's own tokenizer files (converted to tokenizer.json) and chat template.
- Alignment (CLIP, Vicuna variant): OpenAI's BPE, rebuilt from the vocabulary that ships with
  open_clip_torch (``pip install --no-deps open_clip_torch``; the package is never imported).
- Alignment (SigLIP, Qwen variant): from the alignment model's directory the user points to (or
  the checkpoint's ``clip_weight`` directory when it carries tokenizer files).
A tokenizer that cannot be found is reported, not fatal: export warns and the manifest says so.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class TokenizerResult:
    path: Path | None  # the directory holding tokenizer.json, or None when not found
    source: str
    chat_template: str | None = None
    special: dict | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def open_clip_vocabulary() -> Path | None:
    """Path of open_clip_torch's BPE vocabulary, found without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def build_clip_tokenizer(bpe_path: Path, out_dir: Path) -> Path:
    """OpenAI CLIP's tokenizer (49,408 tokens) as tokenizer.json, from open_clip's merges file."""
    from transformers import CLIPTokenizerFast

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:  # beside, not /tmp
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizerFast(
            vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt"),
            bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token=CLIP_EOS,
        )
        tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / f).is_file() for f in TOKENIZER_FILES[:5])


def save_hf_tokenizer(source: Path, out_dir: Path) -> TokenizerResult:
    """Any tokenizer transformers can load from ``source`` -> tokenizer.json (+ its config) in out_dir."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{source}: no fast tokenizer could be built")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
        if getattr(tokenizer, k, None) is not None
    }
    template = getattr(tokenizer, "chat_template", None)
    # the source's name only: an engine dir travels to other machines, the build machine's paths do not
    label = f"{Path(source).name} (Hugging Face tokenizer)"
    config = {"source": label, "chat_template": template, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return TokenizerResult(out_dir, label, template, special)


def llm_tokenizer(checkpoint: Path, out_dir: Path) -> TokenizerResult:
    if not _has_tokenizer(checkpoint):
        log.warning("no LLM tokenizer files in %s: the engine will accept token ids only", checkpoint)
        return TokenizerResult(None, "not found")
    try:
        return save_hf_tokenizer(checkpoint, out_dir)
    except Exception as exc:  # transformers raises ImportError, ValueError, OSError, ... here
        log.warning("cannot convert the LLM tokenizer in %s to tokenizer.json (%s: %s): the engine will accept "
                    "token ids only", checkpoint, type(exc).__name__, exc)
        return TokenizerResult(None, f"not convertible: {type(exc).__name__}")


def alignment_tokenizer(kind: str, checkpoint: Path, clip_weight: str | None, alignment_dir: Path | None,
                        out_dir: Path) -> TokenizerResult:
    candidates = [alignment_dir] if alignment_dir else []
    if clip_weight:
        candidates.append(checkpoint / clip_weight)
    for directory in candidates:
        if directory is not None and _has_tokenizer(directory):
            try:
                return save_hf_tokenizer(directory, out_dir)
            except Exception as exc:  # transformers raises ImportError, ValueError, OSError, ... here
                # e.g. a SigLIP directory with only spiece.model and no `sentencepiece` installed
                log.warning("cannot convert the tokenizer in %s to tokenizer.json (%s: %s); install "
                            "sentencepiece or provide a tokenizer.json", directory, type(exc).__name__, exc)
    if kind == "clip":
        bpe = open_clip_vocabulary()
        if bpe is not None:
            build_clip_tokenizer(bpe, out_dir)
            return TokenizerResult(out_dir, f"OpenAI CLIP BPE from {bpe}")
        log.warning("CLIP vocabulary not found (pip install --no-deps open_clip_torch): "
                    "the engine will accept alignment token ids only")
    else:
        log.warning("no SigLIP tokenizer (pass --alignment-dir pointing at the SigLIP model's directory): "
                    "the engine will accept alignment token ids only")
    return TokenizerResult(None, "not found")
