"""What a checkpoint is: variant, sizes, visual-token counts per frame budget; keys checked strictly."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ppllava.alignment_config import resolve_alignment_config
from ppllava.checkpoint import checkpoint_shapes
from ppllava.config import PPLLaVAConfig

FRAME_BUDGETS = (8, 16, 32)
COMPONENTS = (
    ("vision tower", "vision_tower."),
    ("alignment text tower", "multi_modal_projector.clip_text_model."),
    ("projector + alignment heads", "multi_modal_projector."),
    ("language model", "language_model."),
    ("other", ""),
)


@dataclass
class CheckpointInfo:
    path: str
    variant: str
    llm: str
    vision: str
    alignment: str
    parameters: dict[str, int] = field(default_factory=dict)
    dtypes: list[str] = field(default_factory=list)
    tokens: dict[str, int | str] = field(default_factory=dict)
    keys_checked: bool = False

    def lines(self) -> list[str]:
        total = sum(self.parameters.values())
        out = [
            f"checkpoint   {self.path}",
            f"variant      {self.variant}",
            f"LLM          {self.llm}",
            f"vision       {self.vision}",
            f"alignment    {self.alignment}",
            f"weights      {total:,} parameters ({', '.join(self.dtypes)})"
            + ("" if self.keys_checked else "  [keys not checked: torch/transformers not installed]"),
        ]
        out += [f"  {name:<28} {count:>14,}" for name, count in self.parameters.items() if count]
        out.append("visual tokens per question")
        out += [f"  {budget:<28} {count:>14}" for budget, count in self.tokens.items()]
        return out


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def checkpoint_info(path: str | Path, alignment_config: str | Path | None = None) -> CheckpointInfo:
    path = Path(path)
    config = PPLLaVAConfig.from_file(path)
    alignment = resolve_alignment_config(path, config.clip_weight, config.variant, alignment_config)
    shapes = checkpoint_shapes(path)
    keys_checked = False
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        from ppllava.model import PPLLaVA

        PPLLaVA.build_empty(config, alignment).check_weights(shapes)
        keys_checked = True

    params = {name: 0 for name, _ in COMPONENTS}
    for key, (shape, _) in shapes.items():
        for name, prefix in COMPONENTS:
            if key.startswith(prefix):
                params[name] += _count(shape)
                break

    v, t = config.vision, config.text
    grid = config.grid
    vision = (
        f"{'CLIP' if config.variant == 'vicuna' else 'SigLIP'} {v['num_hidden_layers']} layers, width "
        f"{v['hidden_size']}, {v['image_size']} px / {v['patch_size']} px patches -> {grid[0]}x{grid[1]} grid"
        + (f", BT-Adapter depth {config.btadapter_depth} (max_T {config.max_T})" if config.btadapter else "")
        + f", feature layer {config.vision_feature_layer}"
    )
    llm = (
        f"{t['model_type']} {t['num_hidden_layers']} layers, width {t['hidden_size']}, vocab {t['vocab_size']}, "
        f"context {t.get('max_position_embeddings', '?')}, image token {config.image_token_index}"
    )
    align = (
        f"{alignment.kind} text tower {alignment.text['num_hidden_layers']} layers, width "
        f"{alignment.text['hidden_size']}, {alignment.positions} positions (from {alignment.source})"
    )
    tokens: dict[str, int | str] = {}
    for label, frames, media in [(f"{f} frames", f, "video") for f in FRAME_BUDGETS] + [("image", 1, "image")]:
        if config.btadapter and frames > config.max_T:
            tokens[label] = f"n/a (> max_T {config.max_T})"
            continue
        try:
            tokens[label] = config.visual_token_count(frames, media)
        except ValueError as exc:
            tokens[label] = f"n/a ({exc})"
    return CheckpointInfo(
        path=str(path), variant=config.variant, llm=llm, vision=vision, alignment=align, parameters=params,
        dtypes=sorted({d for _, d in shapes.values()}), tokens=tokens, keys_checked=keys_checked,
    )
