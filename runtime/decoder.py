"""The LLM stage in onnxruntime: onnxruntime-genai's builder graph driven by our own decode loop.

Why our own loop rather than onnxruntime-genai's Generator: the Generator's plain decoder pipeline
feeds ``input_ids``, while PPLLaVA's prompt holds visual tokens that exist only as embeddings. Our
loop feeds ``inputs_embeds`` at every step (the prefill with the spliced visual tokens, then one
embedded token per step) and keeps the KV cache as the graph's present outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ppllava.runtime.backends import BackendError, first_line, make_session

log = logging.getLogger(__name__)


class OrtDecoder:
    """model.onnx from onnxruntime-genai's builder with ``exclude_embeds=true``."""

    def __init__(self, llm_dir: Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None,
                 kv_in_place: bool = False):
        try:
            config = json.loads((llm_dir / "genai_config.json").read_text())["model"]
            decoder = config["decoder"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise BackendError(f"{llm_dir} has no usable genai_config.json: {exc}") from None
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        self.context = int(config["context_length"])
        self.session = make_session(llm_dir / decoder.get("filename", "model.onnx"), providers, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = np.float16 if inputs["inputs_embeds"].type == "tensor(float16)" else np.float32
        # The fp32 CPU graph (GroupQueryAttention) derives positions from the mask; the fp16 one
        # (MultiHeadAttention) takes them explicitly.
        self.takes_positions = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past = None
        self.length = 0
        # In-place KV cache: one fixed (1, kv_heads, context, head_dim) buffer per layer bound as both
        # past and present (the builder's GroupQueryAttention graph supports this), so no cache is
        # copied between steps. Only for the GQA graph (no position_ids input).
        self.kv_in_place = kv_in_place and not self.takes_positions

    def reset(self, capacity: int | None = None) -> None:
        """Start a new sequence; ``capacity`` (prompt + new tokens) sizes the in-place cache."""
        self.length = 0
        if self.kv_in_place:
            want = min(self.context, -(-(capacity or self.context) // 256) * 256)  # round up to 256
            if not isinstance(self.past, dict) or "binding" not in self.past or self.past["capacity"] < want:
                shape = (1, self.kv_heads, want, self.head_dim)
                import onnxruntime

                buffers = {f"{i}.{kv}": onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype))
                           for i in range(self.layers) for kv in ("key", "value")}
                binding = self.session.io_binding()
                for name, value in buffers.items():
                    binding.bind_ortvalue_input(f"past_key_values.{name}", value)
                self.past = {"binding": binding, "buffers": buffers, "capacity": want}
            return
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype)
        self.past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

    def _forward_in_place(self, embeds: np.ndarray, total: int) -> np.ndarray:
        binding, buffers = self.past["binding"], self.past["buffers"]
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))  # tokens so far, not the buffer
        binding.clear_binding_outputs()  # logits change shape between prefill and decode
        for name, value in buffers.items():
            binding.bind_ortvalue_output(f"present.{name}", value)
        binding.bind_output("logits")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"LLM failed in onnxruntime: {first_line(exc)}") from None
        self.length = total
        return binding.get_outputs()[-1].numpy()[0, -1].astype(np.float32)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Append (1, S, D) embeddings to the sequence; returns the last position's logits (V,) float32."""
        if self.past is None:
            self.reset()
        steps = embeds.shape[1]
        total = self.length + steps
        if self.kv_in_place:
            if total > self.past["capacity"]:
                raise BackendError(f"sequence of {total} tokens exceeds the KV cache of {self.past['capacity']}")
            return self._forward_in_place(embeds, total)
        feed = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=self.dtype),
                "attention_mask": np.ones((1, total), np.int64), **self.past}
        if self.takes_positions:
            feed["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        try:
            outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"LLM failed in onnxruntime: {first_line(exc)}") from None
        self.past = {
            f"past_key_values.{i}.{kv}": outputs[f"present.{i}.{kv}"] for i in range(self.layers) for kv in ("key", "value")
        }
        self.length = total
        return outputs["logits"][0, -1].astype(np.float32)
