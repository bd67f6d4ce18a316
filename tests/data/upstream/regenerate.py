"""Recompute the upstream parity fixtures with the ORIGINAL PPLLaVA code (see README.md here).

Not part of the test suite and not importable by it: run it by hand, in a separate environment that
has torch 2.13.0 (CPU), transformers==4.45.2, einops, safetensors and omegaconf, and NOT this
project (the upstream package is also called ``ppllava``)::

    python tests/data/upstream/regenerate.py --upstream /tmp/ppllava-upstream --checkpoints /tmp/ck

``--upstream`` is a checkout of github farewellthree/PPLLaVA (the directory holding its
``ppllava/`` package); ``--checkpoints`` holds ``vicuna/`` and ``qwen/`` as written by
``ppllava.tiny.make_tiny(dir, variant, seed=0)`` of this project. The inputs of every case are
read from the existing ``.npz`` files (``--inputs``, default: this directory) and kept bit for bit;
only upstream's outputs are recomputed, and the files are rewritten in ``--out`` (default: this
directory) with the same keys, key order, dtypes and shapes.

What is done to upstream, and nothing else (no upstream file is edited or copied):
  * the package ``__init__`` files of ``ppllava`` and ``ppllava.models`` are not executed (they
    import the training stack: datasets, processors, tasks, BLIP-2, ST-LLM); the packages are
    registered with their real ``__path__`` so every model module loads from the checkout as is;
  * training/download-only third-party imports are stubbed: mmengine (``constant_init`` is given
    its real behaviour; the rest raises if called), peft, timm.models.hub, iopath, pandas,
    torchvision.datasets.utils;
  * while ``from_pretrained`` runs, ``CLIPModel/SiglipModel.from_pretrained`` build a random model
    from the directory's config.json (the tiny checkpoints ship no alignment weights; they are
    overwritten by the strict ``load_state_dict`` below).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("vicuna", "qwen")
OUTPUT_KEYS = ("visual_tokens", "logits", "vision_hidden_selected", "clip_text_pooled", "generated_new_tokens")
INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "clip_ids", "clip_mask", "media_type")


def _module(name: str, path: str | None = None, package: bool = False, **attrs) -> types.ModuleType:
    """Register a module object under ``name``: a stub, or (``path``) a package whose ``__init__``
    is skipped but whose submodules load from ``path``."""
    mod = types.ModuleType(name)
    package = package or path is not None
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = [] if path is None else [path]
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what} is stubbed by regenerate.py (training/download only)")

    return fail


def install_stubs(upstream: Path) -> None:
    import torch.nn as nn
    import transformers  # noqa: F401  (its availability checks run before any stub exists)

    def constant_init(module, val, bias=0):  # mmengine.model.constant_init, same semantics
        if hasattr(module, "weight") and module.weight is not None:
            nn.init.constant_(module.weight, val)
        if hasattr(module, "bias") and module.bias is not None:
            nn.init.constant_(module.bias, bias)

    _module("mmengine", package=True)
    _module("mmengine.model", constant_init=constant_init)
    _module("mmengine.runner", package=True)
    _module("mmengine.runner.checkpoint", _load_checkpoint=_unavailable("mmengine _load_checkpoint"))
    _module("mmengine.dist", all_gather=_unavailable("mmengine.dist.all_gather"), get_rank=lambda: 0)
    _module("peft", LoraConfig=_unavailable("peft.LoraConfig"), get_peft_model=_unavailable("peft.get_peft_model"))
    _module("timm", package=True)
    _module("timm.models", package=True)
    _module("timm.models.hub")
    _module("iopath", package=True)
    _module("iopath.common", package=True)
    _module("iopath.common.download", download=_unavailable("iopath download"))
    _module("iopath.common.file_io", file_lock=_unavailable("iopath file_lock"), g_pathmgr=None)
    _module("pandas")
    _module("torchvision", package=True)
    _module("torchvision.datasets", package=True)
    _module("torchvision.datasets.utils", check_integrity=_unavailable("check_integrity"),
            download_file_from_google_drive=_unavailable("download_file_from_google_drive"),
            extract_archive=_unavailable("extract_archive"))
    pkg = upstream / "ppllava"
    if not (pkg / "models" / "llava_interleave.py").is_file():
        raise SystemExit(f"{upstream} is not a PPLLaVA checkout (no ppllava/models/llava_interleave.py)")
    _module("ppllava", path=str(pkg))
    models = _module("ppllava.models", path=str(pkg / "models"))
    from ppllava.models.base_model import BaseModel  # the one name of ppllava.models' __init__ that the
    models.BaseModel = BaseModel                      # registry's @register_model looks up


@contextlib.contextmanager
def random_alignment_towers():
    """CLIPModel/SiglipModel.from_pretrained(dir) -> a random model built from dir/config.json."""
    from transformers import CLIPModel, SiglipModel

    saved = {cls: cls.__dict__["from_pretrained"] for cls in (CLIPModel, SiglipModel) if "from_pretrained" in cls.__dict__}

    def from_config_dir(cls, path, *args, **kwargs):
        return cls(cls.config_class.from_pretrained(path))

    for cls in (CLIPModel, SiglipModel):
        cls.from_pretrained = classmethod(from_config_dir)
    try:
        yield
    finally:
        for cls in (CLIPModel, SiglipModel):
            if cls in saved:
                cls.from_pretrained = saved[cls]
            else:
                del cls.from_pretrained


def load_upstream(ckpt: Path):
    import torch
    from safetensors.torch import load_file

    from ppllava.models.llava_interleave import LlavaInterleaveForConditionalGeneration

    cwd = os.getcwd()
    os.chdir(ckpt)  # the config's clip_weight is relative to the checkpoint
    try:
        with random_alignment_towers():
            model = LlavaInterleaveForConditionalGeneration.from_pretrained(str(ckpt))
    finally:
        os.chdir(cwd)
    result = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    return model


def run_case(model, case: dict) -> dict:
    import torch

    media = str(case["media_type"])
    pixel_values = torch.from_numpy(case["pixel_values"]).unsqueeze(1)  # (T, patches=1, 3, S, S)
    input_ids = torch.from_numpy(case["input_ids"])
    attention_mask = torch.from_numpy(case["attention_mask"])
    clip_ids = torch.from_numpy(case["clip_ids"])
    clip_mask = torch.from_numpy(case["clip_mask"]) if "clip_mask" in case else None

    captured = {}
    projector = model.multi_modal_projector
    kwargs = dict(pixel_values=[pixel_values], attention_mask=attention_mask, clip_ids=clip_ids, clip_mask=clip_mask,
                  media_types=[media])
    with torch.no_grad():
        logits = model(input_ids, **kwargs).logits  # also sets vision_feature_layer/_select_strategy on the model

        def keep(name, pick):  # a forward hook that records, and returns None (leaves the output as is)
            def hook(module, args, output):
                captured.setdefault(name, pick(args, output).clone())
            return hook

        hooks = [  # what upstream's encode_visual feeds the projector, and its text tower's pooled output
            projector.register_forward_hook(keep("features", lambda args, output: args[0])),
            projector.clip_text_model.register_forward_hook(keep("pooled", lambda args, output: output[1])),
        ]
        tokens = model.encode_visual(pixel_values, 0, None, [media], clip_ids, clip_mask)
        for h in hooks:
            h.remove()
        out = model.generate(input_ids, do_sample=False, max_new_tokens=8, **kwargs)
    return {
        "visual_tokens": tokens.numpy(),
        "logits": logits.numpy(),
        "vision_hidden_selected": captured["features"].numpy(),
        "clip_text_pooled": captured["pooled"].numpy(),
        "generated_new_tokens": out[0, input_ids.shape[1]:].numpy(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help="checkout of farewellthree/PPLLaVA")
    parser.add_argument("--checkpoints", type=Path, required=True, help="directory with make_tiny's vicuna/ and qwen/")
    parser.add_argument("--inputs", type=Path, default=HERE, help="existing .npz files whose inputs are kept")
    parser.add_argument("--out", type=Path, default=HERE, help="where the .npz files are written")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        print("warning: ATEN_CPU_CAPABILITY=default is not set; the fixtures are made with it", file=sys.stderr)
    install_stubs(args.upstream.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    cases = sorted(args.inputs.glob("*.npz"))
    if not cases:
        raise SystemExit(f"no .npz cases in {args.inputs}")
    for variant in VARIANTS:
        model = load_upstream((args.checkpoints / variant).resolve())
        for path in (p for p in cases if p.stem.split("_")[0] == variant):
            with np.load(path) as f:
                old = {k: f[k] for k in f.files}
            unknown = set(old) - set(INPUT_KEYS) - set(OUTPUT_KEYS)
            if unknown:
                raise SystemExit(f"{path.name}: keys {sorted(unknown)} are neither inputs nor known outputs")
            new = run_case(model, old)
            written = {}
            for key, value in old.items():  # same keys in the same order
                if key in OUTPUT_KEYS:
                    value = new[key]
                    if value.dtype != old[key].dtype or value.shape != old[key].shape:
                        raise SystemExit(f"{path.name}:{key}: {value.dtype}{value.shape} != old "
                                         f"{old[key].dtype}{old[key].shape}")
                written[key] = value
            np.savez(args.out / path.name, **written)
            print(f"{path.name}: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in written.items() if k in OUTPUT_KEYS)
                  + f"; generated {written['generated_new_tokens'].tolist() if 'generated_new_tokens' in written else '-'}")


if __name__ == "__main__":
    main()
