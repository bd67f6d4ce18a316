"""The ``onnxruntime`` backend: every stage an ONNX graph in an InferenceSession, and the LLM as
onnxruntime-genai's builder graph driven by the runtime's one decode loop (``StepDecoder``).

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

from ppllava.errors import BackendError, EngineError
from ppllava.runtime.backends import STAGES, BackendOptions, DeviceInfo, HostBackend, first_line
from ppllava.runtime.generation import Prompt, StepDecoder
from ppllava.runtime.manifest import Manifest, variant_key

log = logging.getLogger(__name__)

DEFAULT_QUANTIZED = "int8"  # the stage variants run without --precision, where they passed

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def make_session(path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None,
                 spin: bool = False, profile: Path | None = None):
    """An onnxruntime session with the requested providers (each must exist here) and quiet logging.

    ``spin``: intra-op threads busy-wait between the parallel ops of one run, and stop when the run
    ends (``session.force_spinning_stop``). A decode step is ~180 small ops: waking the workers for
    each costs more than the step's arithmetic, so the decoder spins. Without the forced stop the
    workers would keep spinning after a run and steal the cores that video decoding, the next
    stage or a baseline measured in the same process need. The stages do not spin: on a 2-core
    Intel Xeon their spinning ran the small preset's int8 vision stage alone in 0.87-0.91x the time
    and `bench` end to end 1.03-1.05x faster (two alternating pairs of runs), but 8 answers asked
    from two threads of one Pipeline took 3.97 against 3.61 s (a stage's busy workers take the cores
    of the other request's decode); a shared Pipeline is what serving runs.

    ``profile``: write onnxruntime's per-node profile (op, shapes, weight bytes) under this file
    prefix until ``session.end_profiling()`` (``ppllava.runtime.floors`` reads it). ``path`` may be
    the bytes of a model.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed: pip install 'ppllava[runtime]'") from None
    available = set(ort.get_available_providers())
    chosen = []
    for name in providers:
        provider = PROVIDERS.get(name, name)
        if provider not in available:
            raise BackendError(
                f"onnxruntime provider {provider} is not available here (available: {', '.join(sorted(available))})"
            )
        chosen.append(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=options,
                                    providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise BackendError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


class OrtStage:
    """One ONNX stage in an onnxruntime InferenceSession."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None,
                 profile: Path | None = None):
        self.session = make_session(path, providers, threads, profile=profile)
        self.path = path
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def close(self) -> None:
        self.session = None  # onnxruntime frees the session (and its arena) with the last reference

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise BackendError(f"{self.path.name} needs inputs {sorted(missing)}")
        feed = {}
        for name in self.input_names:
            value = inputs[name]
            want = self._input_types[name]
            if want == "tensor(float16)" and value.dtype != np.float16:
                value = value.astype(np.float16)
            elif want == "tensor(float)" and value.dtype != np.float32:
                value = value.astype(np.float32)
            elif want == "tensor(int64)" and value.dtype != np.int64:
                value = value.astype(np.int64)
            feed[name] = np.ascontiguousarray(value)
        try:
            outputs = self.session.run(list(self.output_names), feed)
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"{self.path.name} failed in onnxruntime: {first_line(exc)}") from None
        return dict(zip(self.output_names, outputs))


class OnnxruntimeBackend(HostBackend):
    """ONNX stages (the FP export, or the ``--precision`` variants ``ppllava quantize`` recorded)
    and the ONNX LLM (or its ``--precision`` variant), on the requested execution providers."""

    name = "onnxruntime"
    profile_dir: Path | None = None  # set before opening: every session writes an onnxruntime profile there

    def __init__(self, manifest: Manifest, options: BackendOptions = BackendOptions()):
        self.manifest, self.options = manifest, options
        precision = options.precision
        self.max_frames = int(manifest.dims["max_frames"])
        # Without --precision, on the CPU provider, the dynamic INT8 stages `ppllava quantize` recorded
        # as passing their accuracy threshold are the fast path (--precision fp32, or the export's
        # precision, opts out). Other providers were not measured with them: they run the export.
        self.key = variant_key(self.name, precision or DEFAULT_QUANTIZED)
        cpu_only = tuple(options.providers) == ("cpu",)
        self.quantized = quantized_stages(manifest, precision, cpu_only)
        if precision and not self.quantized and not manifest.stage_variant("llm", self.key) and all(
            manifest.stage(n).get("precision") != precision for n in STAGES
        ):
            exported = manifest.stage("vision").get("precision", "fp32")
            if precision in ("fp32", "fp16", "bf16"):
                raise EngineError(f"{manifest.root} was exported in {exported}: --precision {exported} runs the exported stages")
            raise EngineError(f"{manifest.root} has no {precision} stages; create them with `ppllava quantize`")
        below = [n for n in self.quantized if self.artifact(n).get("below_threshold")]
        if below:
            log.warning("the %s %s stages were recorded below their accuracy threshold (see quant.json)",
                        precision, ", ".join(below))
        self.compute_dtype = (precision or DEFAULT_QUANTIZED) if "vision" in self.quantized else manifest.stage("vision").get("precision", "fp32")
        # quantized features are cached apart from the FP ones, and from an earlier quantization's
        # (each quantize run publishes its files under new names)
        self.cache_key = Path(self.artifact("vision")["file"]).name if "vision" in self.quantized else ""

    def artifact(self, stage: str) -> dict:
        if stage in self.quantized:
            return self.manifest.stage_variant(stage, self.key)
        return self.manifest.stage(stage)

    def _profile(self, name: str) -> Path | None:
        return None if self.profile_dir is None else Path(self.profile_dir) / name

    def open_stages(self) -> dict:
        return {n: OrtStage(self.manifest.path(self.artifact(n)), self.options.providers, self.options.threads,
                            profile=self._profile(n))
                for n in STAGES}

    def llm_artifact(self) -> dict | None:
        return onnx_llm_record(self.manifest, self.options.precision)

    def open_decoder(self, embeddings):
        return open_onnx_llm(self.manifest, self.options, embeddings, profile=self._profile("llm"))

    def device(self) -> DeviceInfo:
        providers = self.options.providers
        return DeviceInfo("cpu" if tuple(providers) == ("cpu",) else "onnxruntime " + ",".join(providers))


def runs_by_default(record: dict | None) -> bool:
    """Whether the backend runs this ``onnxruntime:int8`` stage variant without --precision on the CPU
    provider: a dynamic one that passed its accuracy threshold. Only the dynamic ones, because that
    is what measured faster here; a Q/DQ variant (made for TensorRT) runs on request."""
    return bool(record) and record.get("method") == "dynamic" and not record.get("below_threshold")


def quantized_stages(manifest: Manifest, precision: str | None, cpu_only: bool = True) -> set[str]:
    """The stages whose quantized variant this backend runs: with ``precision`` (--precision) every
    stage's variant at it; without, on the CPU provider only, the default's (``runs_by_default``).
    ``ppllava quantize`` judges new variants beside exactly these."""
    key = variant_key("onnxruntime", precision or DEFAULT_QUANTIZED)
    return {n for n in STAGES if (v := manifest.stage_variant(n, key)) and (precision or (cpu_only and runs_by_default(v)))}


def onnx_llm_record(manifest: Manifest, precision: str | None) -> dict | None:
    """The ONNX LLM a backend runs: its ``onnxruntime:<precision>`` variant where one exists, else the
    exported one; None for an engine exported without one (--llm none)."""
    if not manifest.exported("llm"):
        return None
    variant = precision and manifest.stage_variant("llm", variant_key("onnxruntime", precision))
    return variant or manifest.stage("llm")


def open_onnx_llm(manifest: Manifest, options: BackendOptions, embeddings, profile: Path | None = None):
    """An ``OrtDecoder`` on ``onnx_llm_record``, or None."""
    record = onnx_llm_record(manifest, options.precision)
    if record is None:
        return None
    return OrtDecoder(manifest.path(record), options.providers, options.threads, kv_in_place=True,
                      embed_tokens=embeddings(), profile=profile)


class OrtDecoder(StepDecoder):
    """model.onnx from onnxruntime-genai's builder with ``exclude_embeds=true``; ``embed_tokens``
    (the engine's embedding table) embeds the tokens it is fed one by one."""

    def __init__(self, llm_dir: Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None,
                 kv_in_place: bool = False, embed_tokens: np.ndarray | None = None, profile: Path | None = None):
        try:
            config = json.loads((llm_dir / "genai_config.json").read_text())["model"]
            decoder = config["decoder"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise BackendError(f"{llm_dir} has no usable genai_config.json: {exc}") from None
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        self.context = int(config["context_length"])
        self.path = llm_dir / decoder.get("filename", "model.onnx")  # the graph this decoder runs
        self.session = make_session(self.path, providers, threads, spin=True, profile=profile)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = np.float16 if inputs["inputs_embeds"].type == "tensor(float16)" else np.float32
        # The fp32 CPU graph (GroupQueryAttention) derives positions from the mask; the fp16 one
        # (MultiHeadAttention) takes them explicitly.
        self.takes_positions = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        # An engine exported since the last-position slice (export/llm.py) returns (1, 1, V) logits
        # in prefill too, so one bound buffer serves every run; an older one returns (1, S, V).
        self.last_position_only = len(logits.shape) == 3 and logits.shape[1] == 1
        self.vocab = int(config.get("vocab_size") or logits.shape[2])
        self.logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.past = None
        self.length = 0
        # In-place KV cache: one fixed (1, kv_heads, context, head_dim) buffer per layer bound as both
        # past and present (the builder's GroupQueryAttention graph supports this), so no cache is
        # copied between steps. Only for the GQA graph (no position_ids input).
        self.kv_in_place = kv_in_place and not self.takes_positions
        self.embed_tokens = embed_tokens

    def prefill(self, prompt: Prompt) -> np.ndarray:
        return self.forward(prompt.embeds(self.embed_tokens))

    def step(self, token: int) -> np.ndarray:
        return self.forward(np.asarray(self.embed_tokens[token], dtype=np.float32)[None, None])

    def reset(self, capacity: int | None = None) -> None:
        """Start a new sequence; ``capacity`` (prompt + new tokens) sizes the in-place cache."""
        self.length = 0
        if self.kv_in_place:
            want = min(self.context, -(-(capacity or self.context) // 256) * 256)  # round up to 256
            if not isinstance(self.past, dict) or "binding" not in self.past or self.past["capacity"] < want:
                self.past = self._bind_in_place(want)
            return
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype)
        self.past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

    def _bind_in_place(self, capacity: int) -> dict:
        """One binding for the whole sequence: each layer's (1, kv_heads, capacity, head_dim) buffer
        bound as both past and present (the builder's GroupQueryAttention graph writes the new
        positions in place), the attention mask a view of one buffer of ones, and (for a
        last-position graph) the logits one bound (1, 1, V) buffer read in place. A step then
        binds only its embedding and the mask's new length."""
        import onnxruntime

        shape = (1, self.kv_heads, capacity, self.head_dim)
        buffers = {f"{i}.{kv}": onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype))
                   for i in range(self.layers) for kv in ("key", "value")}
        binding = self.session.io_binding()
        for name, value in buffers.items():
            binding.bind_ortvalue_input(f"past_key_values.{name}", value)
            binding.bind_ortvalue_output(f"present.{name}", value)
        logits = None
        if self.last_position_only:
            logits = np.zeros((1, 1, self.vocab), self.logits_dtype)
            binding.bind_ortvalue_output("logits", onnxruntime.OrtValue.ortvalue_from_numpy(logits))
        return {"binding": binding, "buffers": buffers, "capacity": capacity, "logits": logits,
                "mask": np.ones((1, capacity), np.int64)}

    def _forward_in_place(self, embeds: np.ndarray, total: int) -> np.ndarray:
        past = self.past
        binding = past["binding"]
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        binding.bind_cpu_input("attention_mask", past["mask"][:, :total])  # tokens so far, not the buffer
        if past["logits"] is None:  # full-sequence logits change shape between prefill and decode
            binding.clear_binding_outputs()
            for name, value in past["buffers"].items():
                binding.bind_ortvalue_output(f"present.{name}", value)
            binding.bind_output("logits")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"LLM failed in onnxruntime: {first_line(exc)}") from None
        self.length = total
        if past["logits"] is not None:
            return past["logits"][0, -1].astype(np.float32)  # a copy: the buffer is reused next run
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
