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
from ppllava.errors import InputError
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
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        alignment_config: str | Path | None = None,
        attn_implementation: str = "sdpa",
    ) -> "PPLLaVA":
        """Load an upstream-layout checkpoint directory strictly: every weight from the checkpoint,
        missing or unexpected keys listed in the error."""
        path = Path(path)
        config = PPLLaVAConfig.from_file(path)
        config.attn_implementation = attn_implementation
        alignment = resolve_alignment_config(path, config.clip_weight, config.variant, alignment_config)
        with parameters_on_meta():
            model = cls(config, alignment)
        state = load_state_dict(path)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = bool(model.language_model.config.tie_word_embeddings)
        compare_keys(expected, {k: tuple(v.shape) for k, v in state.items()},
                     optional={"language_model.lm_head.weight"} if tied else set())
        state = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if tied:
            model.language_model.tie_weights()
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            if eos is not None:
                model.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        model.requires_grad_(False)  # an inference reference; callers that train can re-enable
        model.to(device=device, dtype=dtype)
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

    def prepare_inputs_embeds(self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video"):
        """(1, L - 1 + K, D) embeddings of the prompt with the visual tokens spliced in."""
        return self.prepare_llm_inputs(input_ids, pixel_values, clip_ids, clip_mask, media_type)[0]

    def prepare_llm_inputs(self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video", attention_mask=None):
        """Embeddings plus, for a padded prompt, the spliced attention mask and position ids.

        With ``attention_mask`` (1, L) (0 at padding), positions follow upstream: cumulative count of
        attended tokens minus one, padded positions set to 1; visual tokens are attended.
        """
        tokens = self.visual_tokens(pixel_values, clip_ids, clip_mask, media_type)
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
        attention_mask = attention_mask.to(self.device, torch.long)
        pos = int((input_ids[0] == self.config.image_token_index).nonzero()[0])
        visual = torch.ones(1, tokens.shape[1], dtype=torch.long, device=self.device)
        mask = torch.cat([attention_mask[:, :pos], visual, attention_mask[:, pos + 1 :]], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return embeds, mask, positions

    def forward(
        self, input_ids, pixel_values=None, clip_ids=None, clip_mask=None, media_type: str = "video", attention_mask=None
    ) -> CausalLMOutputWithPast:
        """Logits over the spliced prompt: (1, L - 1 + K, V)."""
        if pixel_values is None or clip_ids is None:
            raise InputError("forward needs pixel_values and clip_ids (PPLLaVA's pooling depends on the question)")
        embeds, mask, positions = self.prepare_llm_inputs(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, attention_mask
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
        on_token=None,
    ) -> torch.Tensor:
        """(1, n) new token ids: greedy by default, sampled with ``do_sample=True``."""
        result = self.generate_detailed(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, max_new_tokens,
            SamplingOptions(do_sample, temperature, top_k, top_p, seed), eos_token_id,
            attention_mask=attention_mask, on_token=on_token,
        )
        return torch.tensor([result.tokens], dtype=torch.long)

    @torch.inference_mode()
    def generate_detailed(
        self, input_ids, pixel_values, clip_ids, clip_mask=None, media_type="video", max_new_tokens=8,
        options: SamplingOptions | None = None, eos_token_id=None, keep_logits: bool = False, on_token=None,
        attention_mask=None,
    ) -> Generation:
        if pixel_values is None or clip_ids is None:
            raise InputError("generate needs pixel_values and clip_ids")
        embeds, mask, positions = self.prepare_llm_inputs(
            input_ids, pixel_values, clip_ids, clip_mask, media_type, attention_mask
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
