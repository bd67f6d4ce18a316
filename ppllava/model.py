"""PPLLaVA, the PyTorch reference: the specification every exported engine is checked against.

Stages (PPLLAVA.md): vision features (per video) -> question embedding -> prompt-guided pooling ->
LLM with the visual tokens spliced at the image token.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ppllava.alignment import AlignmentConfig, resolve_alignment_config
from ppllava.checkpoint import compare_keys, load_state_dict
from ppllava.config import PPLLaVAConfig
from ppllava.errors import CheckpointError, ConfigError, InputError
from ppllava.generation import Generation, SamplingOptions, generate_from_embeds
from ppllava.plan import WindowPlan
from ppllava.projector import PromptGuidedProjector
from ppllava.vision import VisionTower

log = logging.getLogger(__name__)

MEDIA_TYPES = ("video", "image")


@contextlib.contextmanager
def parameters_on_meta():
    """Create parameters on the meta device (buffers stay real), so building a 7B model costs no
    initialisation; weights are then assigned from the checkpoint."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


# The one table of dtype names (ours and transformers'/config.json's) -> torch dtypes; export uses it too.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES = DTYPES


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def _as_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"invalid device {device!r}: {exc}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {device} is not available here")
    return device


def _generation_eos(path: Path) -> set[int] | None:
    """End-of-sequence ids from the checkpoint's generation_config.json, if it has one."""
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{file} is not a valid generation config: {exc}") from None
    if eos is None:
        return None
    return set(eos if isinstance(eos, list) else [eos])


def _as_tensor(value, name: str, integer: bool) -> torch.Tensor:
    """Tensors, numpy arrays and nested lists are accepted; anything else is a clear InputError."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} must be a tensor or array, got {type(value).__name__}: {exc}") from None
    if integer and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise InputError(f"{name} must hold integer token ids, got {tensor.dtype}")
    if not integer and not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


class PPLLaVA(nn.Module):
    def __init__(self, config: PPLLaVAConfig, alignment: AlignmentConfig):
        super().__init__()
        self.config = config
        self.alignment = alignment
        self.vision_tower = VisionTower(config)
        self.multi_modal_projector = PromptGuidedProjector(config, alignment)
        text_config = config.hf_text_config()
        text_config._attn_implementation = config.attn_implementation
        llm_cls = LlamaForCausalLM if config.text["model_type"] == "llama" else Qwen2ForCausalLM
        self.language_model = llm_cls(text_config)
        self.image_newline = nn.Parameter(torch.zeros(config.llm_hidden_size))
        eos = text_config.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    # ------------------------------------------------------------------ loading
    @classmethod
    def build_empty(cls, config: PPLLaVAConfig, alignment: AlignmentConfig) -> "PPLLaVA":
        """The model with parameters on the meta device; config problems that only transformers
        detects (unknown activation, ...) become a ConfigError."""
        try:
            with parameters_on_meta():
                return cls(config, alignment)
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"config.json describes a model that cannot be built: {exc!r}") from None

    def check_weights(self, found: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Strict check of a checkpoint's (name -> (shape, dtype)) against this model."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        tied = bool(self.language_model.config.tie_word_embeddings)
        compare_keys(expected, {k: shape for k, (shape, _) in found.items()},
                     optional={"language_model.lm_head.weight"} if tied else set())
        not_float = sorted(k for k, (_, dtype) in found.items() if "float" not in dtype)
        if not_float:
            raise CheckpointError(f"checkpoint holds {len(not_float)} non-float tensors where weights belong: {', '.join(not_float[:5])}")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        alignment_config: str | Path | None = None,
        attn_implementation: str = "sdpa",
    ) -> "PPLLaVA":
        """Load an upstream-layout checkpoint directory strictly: every weight from the checkpoint,
        missing or unexpected keys listed in the error."""
        path = Path(path)
        dtype, device = _as_dtype(dtype), _as_device(device)
        config = PPLLaVAConfig.from_file(path)
        config.attn_implementation = attn_implementation
        alignment = resolve_alignment_config(path, config.clip_weight, config.variant, alignment_config)
        model = cls.build_empty(config, alignment)
        state = load_state_dict(path)
        model.check_weights({k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()})
        for name in list(state):  # convert one tensor at a time: peak memory stays near one copy
            state[name] = state.pop(name).to(dtype)
        model.load_state_dict(state, strict=False, assign=True)
        del state
        if model.language_model.config.tie_word_embeddings:
            model.language_model.tie_weights()
        model.eos_token_ids = _generation_eos(path) or model.eos_token_ids
        model.requires_grad_(False)  # an inference reference; callers that train can re-enable
        # Only the device: buffers such as RoPE's inv_freq stay float32, as transformers keeps them.
        model.to(device=device)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    # ------------------------------------------------------------------ stages
    def vision_features(self, pixel_values: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """Stage 1: (T, 3, S, S) normalised frames -> (T, N, C) selected features."""
        return self.vision_tower(pixel_values, plain=plain)

    def text_embedding(self, clip_ids: torch.Tensor, clip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 2: (1, L) alignment token ids -> (1, P) normalised question embedding."""
        limit = self.alignment.positions
        if clip_ids.ndim != 2 or clip_ids.shape[0] != 1 or not 1 <= clip_ids.shape[1] <= limit:
            raise InputError(f"clip_ids must be (1, L) with 1 <= L <= {limit}, got {tuple(clip_ids.shape)}")
        if clip_ids.is_floating_point():
            raise InputError("clip_ids must be integer token ids")
        vocab = self.multi_modal_projector.clip_text_model.embeddings.token_embedding.num_embeddings
        if int(clip_ids.min()) < 0 or int(clip_ids.max()) >= vocab:
            raise InputError(f"clip_ids must lie in [0, {vocab}), got [{int(clip_ids.min())}, {int(clip_ids.max())}]")
        if clip_mask is not None and tuple(clip_mask.shape) != tuple(clip_ids.shape):
            raise InputError(f"clip_mask {tuple(clip_mask.shape)} must match clip_ids {tuple(clip_ids.shape)}")
        return self.multi_modal_projector.text_embedding(clip_ids.to(self.device), None if clip_mask is None else clip_mask.to(self.device))

    def pool(self, features: torch.Tensor, text: torch.Tensor, plan: WindowPlan, plain: bool = False) -> torch.Tensor:
        """Stage 3: (T, N, C) features + (1, P) question -> (K, D) visual tokens for ``plan``."""
        T = features.shape[0]
        try:
            plan.resolve((T, *self.config.grid))
        except ValueError as exc:
            raise InputError(f"cannot pool {T} frame(s): {exc}") from None
        return self.multi_modal_projector.pool(features, text, plan, plain=plain)

    def visual_tokens(
        self,
        pixel_values: torch.Tensor,
        clip_ids: torch.Tensor,
        clip_mask: torch.Tensor | None = None,
        media_type: str = "video",
        plan: WindowPlan | None = None,
        plain: bool = False,
    ) -> torch.Tensor:
        """Stages 1-3: (1, K, D) tokens the LLM sees (images end with ``image_newline``)."""
        if media_type not in MEDIA_TYPES:
            raise InputError(f"media_type must be one of {MEDIA_TYPES}, got {media_type!r}")
        if plan is not None and not isinstance(plan, WindowPlan):
            raise InputError(f"plan must be a ppllava.plan.WindowPlan, got {type(plan).__name__}")
        pixel_values = _as_tensor(pixel_values, "pixel_values", integer=False)
        clip_ids = _as_tensor(clip_ids, "clip_ids", integer=True)
        clip_mask = None if clip_mask is None else _as_tensor(clip_mask, "clip_mask", integer=True)
        if media_type == "image" and pixel_values.shape[0] != 1:
            raise InputError(f"an image is one frame: pixel_values must be (1, 3, S, S), got {tuple(pixel_values.shape)}")
        if plan is None:
            plan = self.config.pooling.video_plan() if media_type == "video" else self.config.pooling.image_plan()
        features = self.vision_features(pixel_values.to(self.device), plain=plain)
        text = self.text_embedding(clip_ids, clip_mask)
        tokens = self.pool(features, text, plan, plain=plain)
        if media_type == "image":
            tokens = torch.cat([tokens, self.image_newline[None].to(tokens.dtype)], dim=0)
        return tokens[None]

    def encode_video(self, pixel_values, clip_ids, clip_mask=None, plan: WindowPlan | None = None) -> torch.Tensor:
        """(T, 3, S, S) normalised frames -> (1, K, D) visual tokens."""
        return self.visual_tokens(pixel_values, clip_ids, clip_mask, "video", plan)

    def encode_image(self, pixel_values, clip_ids, clip_mask=None) -> torch.Tensor:
        """(1, 3, S, S) normalised image -> (1, K + 1, D) visual tokens including ``image_newline``."""
        return self.visual_tokens(pixel_values, clip_ids, clip_mask, "image")

    # ------------------------------------------------------------------ LLM
    def embed_prompt(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(1, L) ids with one image token + (1, K, D) visual tokens -> (1, L - 1 + K, D) embeddings.

        As upstream, the embedding of any prompt token equal to ``pad_token_id`` is zeroed.
        """
        input_ids = _as_tensor(input_ids, "input_ids", integer=True)
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise InputError(f"input_ids must be (1, L), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        where = (input_ids[0] == self.config.image_token_index).nonzero().flatten().tolist()
        if len(where) != 1:
            raise InputError(
                f"input_ids must hold exactly one image token ({self.config.image_token_index}), found {len(where)}"
            )
        vocab = self.language_model.config.vocab_size
        text_ids = input_ids.masked_fill(input_ids == self.config.image_token_index, 0)
        if int(text_ids.min()) < 0 or int(text_ids.max()) >= vocab:
            raise InputError(f"input_ids must lie in [0, {vocab}) apart from the image token")
        embeds = self.language_model.get_input_embeddings()(text_ids)
        embeds = embeds.masked_fill((input_ids == self.config.pad_token_id)[..., None], 0.0)
        pos = where[0]
        return torch.cat([embeds[:, :pos], visual_tokens.to(embeds.dtype), embeds[:, pos + 1 :]], dim=1)

    def prepare_inputs_embeds(self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video", plan=None):
        """(1, L - 1 + K, D) embeddings of the prompt with the visual tokens spliced in."""
        return self.prepare_llm_inputs(input_ids, pixel_values, clip_ids, clip_mask, media_type, plan=plan)[0]

    def prepare_llm_inputs(
        self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video", attention_mask=None, plan=None
    ):
        """Embeddings plus, for a padded prompt, the spliced attention mask and position ids.

        With ``attention_mask`` (1, L) (0 at padding), positions follow upstream: cumulative count of
        attended tokens minus one, padded positions set to 1; visual tokens are attended.
        """
        tokens = self.visual_tokens(pixel_values, clip_ids, clip_mask, media_type, plan)
        input_ids = _as_tensor(input_ids, "input_ids", integer=True)
        embeds = self.embed_prompt(input_ids, tokens)
        limit = self.language_model.config.max_position_embeddings
        if embeds.shape[1] > limit:
            raise InputError(
                f"prompt of {embeds.shape[1]} tokens (text + {tokens.shape[1]} visual) exceeds the LLM context of {limit}"
            )
        if attention_mask is None:
            return embeds, None, None
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        attention_mask = _as_tensor(attention_mask, "attention_mask", integer=True).to(self.device, torch.long)
        input_ids = input_ids.to(self.device)
        pos = int((input_ids[0] == self.config.image_token_index).nonzero()[0])
        visual = torch.ones(1, tokens.shape[1], dtype=torch.long, device=self.device)
        mask = torch.cat([attention_mask[:, :pos], visual, attention_mask[:, pos + 1 :]], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return embeds, mask, positions

    def forward(
        self, input_ids, pixel_values=None, clip_ids=None, clip_mask=None, media_type: str = "video",
        attention_mask=None, plan: WindowPlan | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits over the spliced prompt: (1, L - 1 + K, V)."""
        if pixel_values is None or clip_ids is None:
            raise InputError("forward needs pixel_values and clip_ids (PPLLaVA's pooling depends on the question)")
        embeds, mask, positions = self.prepare_llm_inputs(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, attention_mask, plan
        )
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        pixel_values=None,
        clip_ids=None,
        clip_mask=None,
        media_type: str = "video",
        max_new_tokens: int = 8,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask=None,
        plan: WindowPlan | None = None,
        on_token=None,
    ) -> torch.Tensor:
        """(1, n) new token ids: greedy by default, sampled with ``do_sample=True``."""
        result = self.generate_detailed(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, max_new_tokens,
            SamplingOptions(do_sample, temperature, top_k, top_p, seed), eos_token_id,
            attention_mask=attention_mask, plan=plan, on_token=on_token,
        )
        return torch.tensor([result.tokens], dtype=torch.long)

    @torch.inference_mode()
    def generate_detailed(
        self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video", max_new_tokens=8,
        options: SamplingOptions | None = None, eos_token_id=None, keep_logits: bool = False, on_token=None,
        attention_mask=None, plan: WindowPlan | None = None,
    ) -> Generation:
        if pixel_values is None or clip_ids is None:
            raise InputError("generate needs pixel_values and clip_ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        embeds, mask, positions = self.prepare_llm_inputs(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, attention_mask, plan
        )
        room = self.language_model.config.max_position_embeddings - embeds.shape[1]
        if max_new_tokens > room:
            log.warning("max_new_tokens %d exceeds the remaining context; generating at most %d", max_new_tokens, room)
            max_new_tokens = room
        if eos_token_id is None:
            eos = self.eos_token_ids
        else:
            eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        return generate_from_embeds(
            self.language_model, embeds, max_new_tokens, options or SamplingOptions(), eos, keep_logits, on_token,
            attention_mask=mask, position_ids=positions,
        )
