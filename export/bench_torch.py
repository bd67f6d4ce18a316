"""The baseline for ``ppllava bench --compare torch``: the PyTorch reference in plain eager execution
(transformers modules, SDPA attention), fed exactly the inputs the runtime builds (same decoded
frames, same preprocessing, same token ids), timed per stage like the runtime."""

from __future__ import annotations

import time

import torch

from ppllava.model import PPLLaVA
from ppllava.runtime.bench import QUESTIONS, BackendResult, BenchOptions, HostMemory, Run, repeats, synthetic_frames
from ppllava.runtime.preprocess import normalise
from ppllava.runtime.video import load_clip, resize_frames


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = {}
        self.inputs: dict = {}  # what the LLM was given (frames, visual and prompt tokens)

    def __call__(self, stage: str, fn, *args, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
        return out


@torch.inference_mode()
def _answer(model: PPLLaVA, clock: _Clock, features, question: str, pipe, options: BenchOptions, media: str):

    tok = pipe.tokenizers
    input_ids = torch.from_numpy(tok.prompt_ids([(question, None)])).to(model.device)
    clip_ids, clip_mask = tok.alignment_ids(question)
    clip_ids = torch.from_numpy(clip_ids).to(model.device)
    clip_mask = None if clip_mask is None else torch.from_numpy(clip_mask).to(model.device)
    plan = pipe.manifest.plan(media)
    if options.tokens is not None:
        from ppllava.plan import plan_for_budget

        plan = plan_for_budget(options.tokens, (features.shape[0], *pipe.manifest.grid))
    text = clock("text", model.text_embedding, clip_ids, clip_mask)
    visual = clock("pool", model.pool, features, text, plan)
    if media == "image":
        visual = torch.cat([visual, model.image_newline[None]], dim=0)
    embeds = model.embed_prompt(input_ids, visual[None])  # (1, L - 1 + K, D)
    clock.inputs = {"frames": int(features.shape[0]), "media_type": media, "visual_tokens": int(visual.shape[0]),
                    "prompt_tokens": int(embeds.shape[1])}
    # The reference's own loop (ppllava.generation); the first token's arrival (a host int, so the
    # device has finished) ends the prefill, the rest is decode, as the runtime's loop records them.
    from ppllava.generation import SamplingOptions, generate_from_embeds

    if clock.device.type == "cuda":
        torch.cuda.synchronize(clock.device)
    arrivals: list[float] = []
    t0 = time.perf_counter()
    result = generate_from_embeds(model.language_model, embeds, options.max_new_tokens, SamplingOptions(), set(),
                                  on_token=lambda _: arrivals.append(time.perf_counter()))
    t_end = time.perf_counter()
    clock.ms["prefill"] = clock.ms.get("prefill", 0.0) + (arrivals[0] - t0) * 1e3
    clock.ms["decode"] = clock.ms.get("decode", 0.0) + (t_end - arrivals[0]) * 1e3
    return result.tokens


def bench_torch(checkpoint, pipe, options: BenchOptions, device: str = "cpu", log_line=print,
                memory: HostMemory | None = None, probe=None) -> BackendResult:
    """Same schedule as ``bench_pipeline``: cold run, warm-up, repeats of first question + follow-ups,
    ``probe`` (a ``rate_probe.RateProbe``) before each measured repeat and after the last.
    ``memory``: the host-memory window (default: from now, before the model is loaded)."""
    memory = memory or HostMemory()
    device = torch.device(device)
    already = 0
    if device.type == "cuda":
        # the backend measured first still holds its weights and caches: they are not the baseline's
        torch.cuda.reset_peak_memory_stats(device)
        already = torch.cuda.memory_allocated(device)
    # on a GPU, the dtype of the backend compared against (bf16 for a torch-backend engine), else fp16
    gpu_dtype = torch.bfloat16 if pipe.backend.compute_dtype == "bf16" else torch.float16
    precision = "fp32" if device.type == "cpu" else "bf16" if gpu_dtype == torch.bfloat16 else "fp16"
    model = PPLLaVA.from_pretrained(checkpoint, dtype=torch.float32 if device.type == "cpu" else gpu_dtype,
                                    device=device)
    spec = pipe.manifest.data["preprocessing"]
    size = int(spec["size"])
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(options.questions)]
    result = BackendResult("torch-eager")

    for r in repeats(options, result, probe, log_line):
        clock = _Clock(device)
        t_start = time.perf_counter()
        if options.video is not None:
            frames = options.frames or int(spec["default_frames"])
            clip = clock("decode_sample", load_clip, options.video, frames, size)
            media, rgb = clip.media_type, clip.frames
        else:
            media = "video"
            rgb = clock("decode_sample", resize_frames, synthetic_frames(options.synthetic_frames, seed=options.seed), size)
        pixels = clock("preprocess", lambda: torch.from_numpy(normalise(rgb, spec)).to(device, model.dtype))
        features = clock("vision", model.vision_features, pixels)
        tokens = _answer(model, clock, features, questions[0], pipe, options, media)
        first = Run(dict(clock.ms), (time.perf_counter() - t_start) * 1e3, len(tokens))
        if r == 0:
            result.cold = first
            result.first_tokens = tokens
            result.inputs = {**clock.inputs, "prompt_tokens": [clock.inputs["prompt_tokens"]]}
        elif r > options.warmup:
            result.first.append(first)
        for question in questions[1:]:
            clock = _Clock(device)
            t0 = time.perf_counter()
            tokens = _answer(model, clock, features, question, pipe, options, media)
            if r == 0:
                result.inputs["prompt_tokens"].append(clock.inputs["prompt_tokens"])
            if r > options.warmup:
                result.follow_up.append(Run(dict(clock.ms), (time.perf_counter() - t0) * 1e3, len(tokens)))
    result.finish(memory)
    result.runtime = {"backend": "torch-eager", "precision": precision, "providers": None,
                      "stage_precisions": {s: precision for s in ("vision", "text", "pool", "llm")},
                      "threads": torch.get_num_threads(), "engine_fingerprint": None}
    result.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        result.peak_device_mib = (torch.cuda.max_memory_allocated(device) - already) / 2**20
    return result
