"""PPLLaVA checkpoint configuration: read upstream ``config.json``, validate, never ``eval``.

This module is torch-free (plain json) so that ``ppllava info`` and the CLI stay light. The
Hugging Face config objects for the towers and the LLM are built on demand.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppllava.errors import ConfigError

log = logging.getLogger(__name__)

VARIANTS = ("vicuna", "qwen")
SUPPORTED_LLMS = ("llama", "qwen2")
# model_type of the top-level config -> variant (upstream saves LlavaNext / LlavaOnevision configs).
_MODEL_TYPES = {"llava_next": "vicuna", "llava_onevision": "qwen"}
_VISION_TYPES = {"vicuna": "clip_vision_model", "qwen": "siglip_vision_model"}


def _int(raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: '{key}' must be an integer, got {value!r}")
    return value


def _float(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: '{key}' must be a number, got {value!r}")
    return float(value)


def _dict(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: '{key}' must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _triple(raw: dict, key: str, required: bool = False) -> tuple[int, int, int] | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"config.json: '{key}' is required")
        return None
    if isinstance(value, str):
        # Upstream yaml stores "(2,3,3)" strings and evals them; config.json holds lists. We parse
        # digits only, never eval.
        parts = value.strip().strip("()[]").split(",")
        try:
            value = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ConfigError(f"config.json: '{key}' must be three integers, got {raw[key]!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"config.json: '{key}' must be three positive integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class PoolingSpec:
    """How visual tokens are pooled: window kernel/stride per axis (T, H, W) or an output shape."""

    frame_shape: tuple[int, int]
    kernel: tuple[int, int, int] | None
    stride: tuple[int, int, int] | None
    output_shape: tuple[int, int, int] | None
    image_kernel: tuple[int, int, int] | None
    image_stride: tuple[int, int, int] | None
    temperature: float

    def video_plan(self):
        from ppllava.plan import WindowPlan

        return WindowPlan(kernel=self.kernel, stride=self.stride, output_shape=self.output_shape)

    def image_plan(self):
        from ppllava.plan import WindowPlan

        return WindowPlan(
            kernel=self.image_kernel if self.image_kernel is not None else self.kernel,
            stride=self.image_stride if self.image_stride is not None else self.stride,
            output_shape=self.output_shape,
        )


@dataclass
class PPLLaVAConfig:
    """Everything the reference needs from a checkpoint's ``config.json``."""

    variant: str
    vision: dict[str, Any]
    text: dict[str, Any]
    pooling: PoolingSpec
    image_token_index: int
    pad_token_id: int
    vision_feature_layer: int
    vision_feature_select_strategy: str
    projector_hidden_act: str
    btadapter: bool
    btadapter_depth: int
    max_T: int
    clip_weight: str | None
    valuew_plus: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # How transformers' attention runs ("sdpa" or "eager"); a loading option, not part of config.json.
    attn_implementation: str = "sdpa"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PPLLaVAConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        pooling_mode = raw.get("pooling")
        if pooling_mode != "ppllava":
            raise ConfigError(
                f"config.json: pooling={pooling_mode!r} is not supported; only PPLLaVA's prompt-guided "
                "pooling ('ppllava') is implemented"
            )
        model_type = raw.get("model_type")
        qwen_flag = raw.get("qwen")
        if model_type in _MODEL_TYPES:
            variant = _MODEL_TYPES[model_type]
            if qwen_flag is not None and bool(qwen_flag) != (variant == "qwen"):
                raise ConfigError(
                    f"config.json: model_type={model_type!r} contradicts qwen={qwen_flag!r}"
                )
        elif model_type is None and qwen_flag is not None:
            variant = "qwen" if qwen_flag else "vicuna"
        else:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not a PPLLaVA checkpoint "
                f"(expected one of {sorted(_MODEL_TYPES)})"
            )

        vision = _dict(raw, "vision_config")
        vision.setdefault("model_type", _VISION_TYPES[variant])
        if vision["model_type"] != _VISION_TYPES[variant]:
            raise ConfigError(
                f"config.json: the {variant} variant needs vision_config.model_type="
                f"{_VISION_TYPES[variant]!r}, got {vision['model_type']!r}"
            )
        text = _dict(raw, "text_config")
        text.setdefault("model_type", "llama" if variant == "vicuna" else "qwen2")
        if text["model_type"] not in SUPPORTED_LLMS:
            raise ConfigError(
                f"config.json: text_config.model_type={text['model_type']!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_LLMS)})"
            )

        frame_shape = raw.get("frame_shape")
        if isinstance(frame_shape, str):
            parts = [p.strip() for p in frame_shape.strip("()[] ").split(",") if p.strip()]
            frame_shape = [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
        if (
            not isinstance(frame_shape, (list, tuple)) or len(frame_shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in frame_shape)
        ):
            raise ConfigError(f"config.json: 'frame_shape' must be two positive integers, got {raw.get('frame_shape')!r}")
        pooling = PoolingSpec(
            frame_shape=(int(frame_shape[0]), int(frame_shape[1])),
            kernel=_triple(raw, "pooling_kernel"),
            stride=_triple(raw, "pooling_stride"),
            output_shape=_triple(raw, "pllava_pooling_shape"),
            image_kernel=_triple(raw, "image_pooling_kernel"),
            image_stride=_triple(raw, "image_pooling_stride"),
            temperature=_float(raw, "pooling_temp", 0.01),
        )
        btadapter = bool(raw.get("btadapter", False))
        config = cls(
            variant=variant,
            vision=vision,
            text=text,
            pooling=pooling,
            image_token_index=_int(raw, "image_token_index", 32000),
            pad_token_id=_int(raw, "pad_token_id", 0) if raw.get("pad_token_id") is not None else 0,
            vision_feature_layer=_int(raw, "vision_feature_layer", -2),
            vision_feature_select_strategy=str(raw.get("vision_feature_select_strategy", "default")),
            projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
            btadapter=btadapter,
            btadapter_depth=_int(raw, "btadapter_depth", 4) if btadapter else 0,
            max_T=_int(raw, "max_T", 64),
            clip_weight=raw.get("clip_weight") if isinstance(raw.get("clip_weight"), str) else None,
            valuew_plus=bool(raw.get("valuew_plus", False)),
            raw=raw,
        )
        if not raw.get("extend_clip", False):
            raise ConfigError(
                "config.json: extend_clip=false is not supported; released PPLLaVA checkpoints use the "
                "extended alignment text tower (extend_clip=true)"
            )
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "PPLLaVAConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        v = self.vision
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            if not isinstance(v.get(key), int) or v[key] <= 0:
                raise ConfigError(f"config.json: vision_config.{key} must be a positive integer, got {v.get(key)!r}")
        grid = v["image_size"] // v["patch_size"]
        if v["image_size"] % v["patch_size"]:
            raise ConfigError(
                f"config.json: vision image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}"
            )
        if tuple(self.pooling.frame_shape) != (grid, grid):
            raise ConfigError(
                f"config.json: frame_shape {list(self.pooling.frame_shape)} does not match the vision grid "
                f"{grid}x{grid} (image_size {v['image_size']} / patch_size {v['patch_size']})"
            )
        layers = v["num_hidden_layers"]
        if self.btadapter:
            if self.variant != "vicuna":
                raise ConfigError("config.json: btadapter=true is only defined for the CLIP (vicuna) variant")
            if not 1 <= self.btadapter_depth <= layers:
                raise ConfigError(
                    f"config.json: btadapter_depth={self.btadapter_depth} must be between 1 and the number of "
                    f"vision layers ({layers})"
                )
        if self.max_T < 1:
            raise ConfigError(f"config.json: max_T must be >= 1, got {self.max_T}")
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ConfigError(
                f"config.json: vision_feature_layer={self.vision_feature_layer} is outside the "
                f"{layers + 1} hidden states of a {layers}-layer vision tower"
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"config.json: vision_feature_select_strategy={self.vision_feature_select_strategy!r} "
                "is not supported (expected 'default' or 'full')"
            )
        if self.variant == "vicuna" and self.vision_feature_select_strategy != "default":
            raise ConfigError("config.json: the CLIP tower has a CLS token; vision_feature_select_strategy must be 'default'")
        if self.variant == "qwen" and self.vision_feature_select_strategy != "full":
            raise ConfigError("config.json: the SigLIP tower has no CLS token; vision_feature_select_strategy must be 'full'")
        if self.pooling.temperature <= 0:
            raise ConfigError(f"config.json: pooling_temp must be > 0, got {self.pooling.temperature}")
        if self.valuew_plus and self.variant != "qwen":
            log.warning("config.json: valuew_plus only affects the SigLIP (qwen) variant; ignored, as upstream does")
            self.valuew_plus = False
        # The video plan must be well formed; the image plan is checked when an image is encoded, as
        # upstream only fails then (e.g. an output shape combined with image kernels).
        try:
            self.pooling.video_plan().check_defined()
        except ValueError as exc:
            raise ConfigError(f"config.json: video pooling: {exc}") from None
        t = self.text
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(t.get(key), int) or t[key] <= 0:
                raise ConfigError(f"config.json: text_config.{key} must be a positive integer, got {t.get(key)!r}")
        for name, sub in (("vision_config", v), ("text_config", t)):
            if sub["hidden_size"] % sub["num_attention_heads"]:
                raise ConfigError(
                    f"config.json: {name}.hidden_size {sub['hidden_size']} is not divisible by "
                    f"num_attention_heads {sub['num_attention_heads']}"
                )

    # ----------------------------------------------------------- derived values
    @property
    def grid(self) -> tuple[int, int]:
        return self.pooling.frame_shape

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def llm_hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def feature_index(self) -> int:
        """Index into the (layers + 1) hidden states that the LLaVA side selects."""
        return self.vision_feature_layer % (self.vision["num_hidden_layers"] + 1)

    def visual_token_count(self, num_frames: int, media_type: str = "video") -> int:
        """Visual tokens the LLM sees for ``num_frames`` frames (images include the newline token)."""
        plan = self.pooling.video_plan() if media_type == "video" else self.pooling.image_plan()
        out = plan.output_grid((num_frames, *self.grid))
        count = out[0] * out[1] * out[2]
        return count + 1 if media_type == "image" else count

    # ------------------------------------------------------ Hugging Face configs
    def hf_vision_config(self):
        from transformers import CLIPVisionConfig, SiglipVisionConfig

        cls = CLIPVisionConfig if self.variant == "vicuna" else SiglipVisionConfig
        return cls(**{k: v for k, v in self.vision.items() if k != "model_type"})

    def hf_text_config(self):
        from transformers import LlamaConfig, Qwen2Config

        cls = LlamaConfig if self.text["model_type"] == "llama" else Qwen2Config
        return cls(**{k: v for k, v in self.text.items() if k != "model_type"})
