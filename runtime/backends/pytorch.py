"""The ``torch`` backend: AOTInductor stages and a static-KV-cache LLM with a CUDA-graph decode step.

For GPUs without TensorRT-LLM (a new generation, a Jetson with only PyTorch), and the GPU path
that needs nothing but PyTorch. Vision / text / pool run from the ``.pt2`` packages that
``ppllava export --torch`` compiled for this device; their outputs stay on the device from one
stage to the next. The LLM is the engine dir's extracted Hugging Face model (``llm_hf/``) driven by
our own loop, gpt-fast style:

- one preallocated KV cache per layer, written in place at the token's position (``index_copy_``),
  sized to the request (prompt + new tokens, rounded up to 256) so decode reads no more than it must;
- the spliced prompt (text embeddings with the visual tokens at ``<image>``) prefilled in one call;
- each decode step is the same kernels on the same buffers, so on a GPU it is captured once in a
  CUDA graph and replayed: one launch per token instead of hundreds.

Torch and transformers are imported here only, inside functions: importing the runtime (or this
module) does not import torch.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ppllava.errors import BackendError, EngineError
from ppllava.runtime.backends import STAGES, BackendOptions, DeviceInfo, check_identity, first_line
from ppllava.runtime.generation import Prompt, StepDecoder
from ppllava.runtime.manifest import Manifest, variant_key

log = logging.getLogger(__name__)

CACHE_STEP = 256  # KV-cache capacity is rounded up to this many positions
DTYPES = ("fp32", "fp16", "bf16")


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendError("the torch backend needs PyTorch (pip install torch)") from None
    return torch


def _dtype(name: str):
    torch = _torch()
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise EngineError(f"unknown torch precision {name!r} in the manifest (known: {', '.join(DTYPES)})") from None


def current_identity(device: str) -> dict:
    """The torch version and device (for CUDA: GPU name and compute capability) a package must match."""
    torch = _torch()
    identity = {"torch": torch.__version__.split("+")[0], "device": device}
    if device == "cpu":
        import platform

        identity["machine"] = platform.machine()
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa  # what Inductor compiles CPU kernels for

            identity["cpu_isa"] = str(pick_vec_isa()) or "none"
        except Exception:  # a private helper: tolerate its absence in other torch releases
            identity["cpu_isa"] = "unknown"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BackendError("these torch stages were compiled for CUDA, and no CUDA GPU is usable here")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        identity["gpu"] = props.name
        identity["compute_capability"] = f"{props.major}.{props.minor}"
    return identity


def check_package(variant: dict, current: dict) -> None:
    """Refuse an AOTInductor package compiled for another torch release, device or GPU."""
    check_identity(variant, current, (("device", "device"), ("torch", "torch version"), ("gpu", "GPU"),
                                      ("compute_capability", "compute capability"), ("machine", "CPU architecture"),
                                      ("cpu_isa", "CPU vector instruction set")),
                   "compiled", "re-export here with `ppllava export CHECKPOINT --out ENGINE_DIR --torch --force`")


@contextmanager
def _device_errors(what: str):
    """Device out-of-memory becomes one line instead of a traceback."""
    torch = _torch()
    try:
        yield
    except torch.OutOfMemoryError:
        raise BackendError(f"out of device memory while {what}: use fewer frames (--frames), a smaller --tokens "
                           "budget or --max-new-tokens, or a smaller dtype") from None


class TorchStage:
    """One AOTInductor package; numpy or torch inputs, torch outputs left on the package's device."""

    def __init__(self, path: Path, variant: dict):
        torch = _torch()
        check_package(variant, current_identity(variant.get("device", "cpu")))
        self.path = path
        self.device = torch.device(variant["device"])
        self.dtype = _dtype(variant["precision"])
        self.input_names = tuple(i["name"] for i in variant["inputs"])
        self.output_names = tuple(o["name"] for o in variant["outputs"])
        self._float = {i["name"] for i in variant["inputs"] if i["dtype"] in ("float32", "float16", "bfloat16")}
        try:
            self.runner = torch._inductor.aoti_load_package(str(self.path))
        except Exception as exc:  # a damaged package, or one from another torch build
            raise BackendError(f"torch cannot load {self.path}: {first_line(exc)}") from None

    def close(self) -> None:
        self.runner = None

    def run(self, **inputs) -> dict:
        torch = _torch()
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise BackendError(f"{self.path.name} needs inputs {sorted(missing)}")
        args = []
        for name in self.input_names:
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            dtype = self.dtype if name in self._float else torch.int64
            args.append(tensor.to(device=self.device, dtype=dtype, non_blocking=True).contiguous())
        try:
            with torch.inference_mode(), _device_errors(f"running {self.path.name}"):
                out = self.runner(*args)
        except BackendError:
            raise
        except Exception as exc:  # shapes outside the compiled ranges end up here
            raise BackendError(f"{self.path.name} failed: {first_line(exc)}") from None
        outs = out if isinstance(out, (list, tuple)) else [out]
        return dict(zip(self.output_names, outs))


class StaticKVCache:
    """Per-layer (1, kv_heads, capacity, head_dim) key and value buffers, written in place.

    Implements the one method transformers' attention modules call on a cache, ``update``: the new
    keys/values go to ``position`` and the whole buffer is returned; the attention mask hides the
    positions not written yet. The decoder sets ``position`` (a device tensor, so a captured CUDA
    graph reads its current value) before each forward: transformers 4.x also passes it to
    ``update`` as ``cache_kwargs["cache_position"]``, 5.x no longer does (its caches count tokens).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        torch = _torch()
        shape = (1, kv_heads, capacity, head_dim)
        self.capacity = capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.position = None  # (S,) positions the next forward writes

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: dict | None = None):
        self.keys[layer_idx].index_copy_(2, self.position, key_states)
        self.values[layer_idx].index_copy_(2, self.position, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


STATIC_ATTENTION = "ppllava_static_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function for the static cache: SDPA with the cache's boolean mask, and
    grouped-query attention done by folding each KV head's query group into the query length, so
    the cache is never repeated per query head (transformers' SDPA path copies it with repeat_kv as
    soon as a mask is given: for Qwen2-7B's 7 query heads per KV head, 7x the cache traffic per step).
    Query heads i*g .. i*g+g-1 share KV head i, as in repeat_kv. Returns (B, S, H, d), None."""
    torch = _torch()
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(b, kv_heads, groups * s, d)  # rows ordered (group, position)
    mask = attention_mask
    if mask is not None and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), None


def _register_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_ATTENTION, grouped_sdpa)
    return STATIC_ATTENTION


class TorchDecoder(StepDecoder):
    """The Hugging Face LLM of ``llm_hf/`` with a static KV cache; ``cuda_graph`` (default: on a
    GPU) replays the captured single-token step."""

    def __init__(self, hf_dir: Path, device: str = "cpu", precision: str = "fp32", cuda_graph: bool | None = None):
        torch = _torch()
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise BackendError("the torch backend needs transformers for the LLM (pip install transformers)") from None
        if not (hf_dir / "config.json").is_file():
            raise EngineError(f"{hf_dir} has no config.json: the engine dir's LLM is missing; re-export")
        try:
            config = AutoConfig.from_pretrained(hf_dir)
            model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=_dtype(precision),
                                                         attn_implementation="sdpa")
        except Exception as exc:  # OSError, ValueError, safetensors' own error for a damaged file, ...
            raise EngineError(f"cannot load the LLM from {hf_dir}: {first_line(exc)}; re-export") from None
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise BackendError("this LLM uses sliding-window attention, which the torch backend's static cache "
                               "does not implement; use the onnxruntime backend")
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = _dtype(precision)
        with _device_errors("loading the LLM"):
            self.model = model.to(self.device).eval()
        # every attention module reads its implementation from the (shared) config at call time
        self.model.config._attn_implementation = _register_attention()
        core = self.model.model
        self.embed = core.embed_tokens
        self.layers = list(core.layers)
        self.norm = core.norm
        self.rotary = core.rotary_emb
        self.lm_head = self.model.lm_head
        self.context = int(config.max_position_embeddings)
        self.vocab = int(config.vocab_size)
        heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        rope = getattr(self.rotary, "rope_type", "default")
        if self.cuda_graph and rope in ("dynamic", "longrope"):
            # their frequency update compares a device value on the host: not capturable
            log.warning("%s RoPE cannot be captured in a CUDA graph; decoding without one", rope)
            self.cuda_graph = False
        if self.cuda_graph and self.device.type != "cuda":
            raise BackendError("CUDA graphs need the LLM on a CUDA device")
        self.kv: StaticKVCache | None = None
        self.length = 0
        self._graph = None
        self.graph_captures = 0  # how many times a decode graph was captured (tests and bench read it)

    # ------------------------------------------------------------ sequence
    def reset(self, capacity: int | None = None) -> None:
        """Start a new sequence; ``capacity`` (prompt + new tokens) sizes the cache, reused while it
        fits and is not more than twice too large."""
        want = min(self.context, -(-(capacity or self.context) // CACHE_STEP) * CACHE_STEP)
        if self.kv is None or self.kv.capacity < want or self.kv.capacity > 2 * want:
            self.kv = None
            self._graph = None  # captured against the old buffers
            with _device_errors(f"allocating the KV cache for {want} positions"):
                self.kv = StaticKVCache(len(self.layers), self.kv_heads, self.head_dim, want, self.dtype, self.device)
            self._positions = self.torch.arange(want, device=self.device)
            self._token = self.torch.zeros((1, 1), dtype=self.torch.long, device=self.device)
            self._position = self.torch.zeros((1,), dtype=self.torch.long, device=self.device)
        self.length = 0

    def _run(self, hidden, cache_position):
        """Hidden states (1, S, D) at ``cache_position`` (S,) through every layer; last position's logits."""
        position_ids = cache_position[None]
        # (1, 1, S, capacity): a query sees the keys at or before its own position, nothing unwritten.
        mask = (self._positions[None, :] <= cache_position[:, None])[None, None]
        embeddings = self.rotary(hidden, position_ids)
        self.kv.position = cache_position
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=self.kv,
                        use_cache=True, cache_position=cache_position, position_embeddings=embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(self.norm(hidden[:, -1:]))[0, -1]

    def _as_embeds(self, embeds):
        torch = self.torch
        tensor = embeds if isinstance(embeds, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(embeds))
        return tensor.to(device=self.device, dtype=self.dtype)

    def _logits(self, logits) -> np.ndarray:
        return logits.float().cpu().numpy()

    def forward(self, embeds) -> np.ndarray:
        """Append (1, S, D) embeddings (the prefill: one call for the whole prompt); returns the last
        position's logits (V,) float32."""
        torch = self.torch
        if self.kv is None:
            self.reset()
        steps = int(embeds.shape[1])
        if self.length + steps > self.kv.capacity:
            raise BackendError(f"sequence of {self.length + steps} tokens exceeds the KV cache of {self.kv.capacity}")
        with torch.inference_mode(), _device_errors(f"prefilling {steps} tokens"):
            position = torch.arange(self.length, self.length + steps, device=self.device)
            logits = self._run(self._as_embeds(embeds), position)
            self.length += steps
            return self._logits(logits)

    def prefill(self, prompt: Prompt) -> np.ndarray:
        return self.forward(self.embed_prompt(prompt))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def step(self, token: int) -> np.ndarray:
        """Append one token by id (embedded on the device); the decode step."""
        torch = self.torch
        if self.kv is None or self.length + 1 > self.kv.capacity:
            raise BackendError(f"sequence of {self.length + 1} tokens exceeds the KV cache")
        with torch.inference_mode(), _device_errors("decoding"):
            self._token.fill_(int(token))
            self._position.fill_(self.length)
            if self.cuda_graph:
                if self._graph is None:
                    self._capture()
                self._graph.replay()
                logits = self._graph_logits
            else:
                logits = self._step()
            self.length += 1
            return self._logits(logits)

    def _step(self):
        return self._run(self.embed(self._token), self._position)

    def _capture(self) -> None:
        """Record the decode step on the current buffers. Warm-up runs write the same keys/values at
        the same position as the real step, so the cache is unchanged by them."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._step()
        self._graph = graph
        self.graph_captures += 1

    # ------------------------------------------------------------ prompt
    def embed_prompt(self, prompt: Prompt):
        """The checked prompt -> (1, L - 1 + K, D) on the device, the visual tokens at the image
        token's position, pad-id tokens zero."""
        torch = self.torch
        pos = prompt.image_pos
        with torch.inference_mode():
            text = self.embed(torch.from_numpy(prompt.text_ids).to(self.device))
            text = text.masked_fill(torch.from_numpy(prompt.pads).to(self.device)[:, None], 0.0)
            return torch.cat([text[:pos], self._as_embeds(prompt.visual), text[pos + 1 :]])[None]


class TorchBackend:
    """Stages from the manifest's ``torch`` variants (AOTInductor packages for one device and
    dtype), the LLM from ``llm_hf/``; stage outputs stay on the device until ``host``."""

    name = "torch"
    torch_stages = True

    def __init__(self, manifest: Manifest, options: BackendOptions = BackendOptions()):
        compiled = {n: manifest.variants(n, self.name) for n in STAGES}
        missing = [n for n in STAGES if not compiled[n]]
        if missing:
            raise EngineError(f"{manifest.root} has no torch stages ({', '.join(missing)}): export them with "
                              f"`ppllava export CHECKPOINT --out {manifest.root} --torch --force`")
        dtypes = sorted(set.intersection(*(set(v) for v in compiled.values())))
        chosen = options.precision or (dtypes[0] if len(dtypes) == 1 else None)
        if chosen not in dtypes:
            raise EngineError(f"the torch stages of {manifest.root} are compiled in {', '.join(dtypes) or 'mixed dtypes'}"
                              + (f", not {chosen}" if chosen else "; pick one with --precision"))
        self.manifest, self.options = manifest, options
        self.key = variant_key(self.name, chosen)
        vision = self.artifact("vision")
        self.device_name = vision.get("device", "cpu")
        self.precision = self.compute_dtype = vision["precision"]
        self.max_frames = int(manifest.dims["max_frames"])
        # cached features differ by dtype and device, not only by package file
        self.cache_key = f"{vision['file']}:{self.precision}:{self.device_name}"
        if options.threads:
            _torch().set_num_threads(options.threads)

    def artifact(self, stage: str) -> dict:
        return self.manifest.stage_variant(stage, self.key)

    def open_stages(self) -> dict:
        return {n: TorchStage(self.manifest.path(self.artifact(n)), self.artifact(n)) for n in STAGES}

    def llm_artifact(self) -> dict | None:
        """``llm_hf/``, loaded in the stages' dtype (it is the export's source copy, not a variant record)."""
        hf_dir = self.manifest.data["llm"].get("hf_dir")
        return {"dir": hf_dir, "backend": self.name, "precision": self.precision} if hf_dir else None

    def open_decoder(self, embeddings):
        hf_dir = self.manifest.data["llm"].get("hf_dir")
        if not hf_dir:
            return None
        if not (self.manifest.root / hf_dir / "config.json").is_file():
            raise EngineError(f"{self.manifest.root / hf_dir} is missing or incomplete: the torch backend's LLM; "
                              "re-export or copy the whole engine dir")
        return TorchDecoder(self.manifest.root / hf_dir, self.device_name, self.precision)

    def host(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.float().cpu().numpy()

    def concat(self, tokens, row: np.ndarray):
        torch = _torch()
        if isinstance(tokens, np.ndarray):
            return np.concatenate([tokens, np.asarray(row)[None].astype(tokens.dtype)], axis=0)
        value = torch.from_numpy(np.array(row, np.float32)).to(tokens.device, tokens.dtype)
        return torch.cat([tokens, value[None]])

    def sync(self) -> None:
        if self.device_name == "cuda":
            _torch().cuda.synchronize()

    def reset_peak_memory(self) -> None:
        if self.device_name == "cuda":
            _torch().cuda.reset_peak_memory_stats()

    def device(self) -> DeviceInfo:
        """The GPU (or "cpu") and its peak memory in MiB since the last reset, for bench reports."""
        if self.device_name != "cuda":
            return DeviceInfo("cpu")
        torch = _torch()
        return DeviceInfo(torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2**20)
