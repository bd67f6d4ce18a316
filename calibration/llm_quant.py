"""``ppllava quantize --llm``: ModelOpt post-training quantization of the language model, calibrated on
the multimodal prompts of the calibration set (visual tokens spliced at the image token, exactly
as the runtime feeds the LLM), exported as a TensorRT-LLM checkpoint (``config.json`` +
``rank0.safetensors``) ready for ``trtllm-build``.

Accuracy is judged with ModelOpt's simulated quantization in PyTorch on held-out prompts: top-1
agreement of the logits along the FP model's greedy path, and the rate of identical greedy answers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ppllava.calibration.dataset import load_shards
from ppllava.errors import InputError, QuantizationError
from ppllava.calibration.quantize import QUANT_JSON
from ppllava.checkpoint import safetensors_header
from ppllava.runtime.manifest import Manifest, add_variants, variant_record
from ppllava.runtime.scratch import require_free, scratch_dir, sweep
from ppllava.runtime.pipeline import Pipeline
from ppllava.thresholds import QUANT_LLM_TOP1

log = logging.getLogger(__name__)

SCHEMES = ("int8_sq", "int8_wo", "fp8", "int4_awq")
TOP1_THRESHOLDS = QUANT_LLM_TOP1  # the one thresholds table (ppllava/thresholds.py)
GREEDY_TOKENS = 16
DECODER_TYPES = {"llama": "llama", "qwen2": "qwen"}
# Free space, in bytes per LLM weight, of what a quantized LLM writes: a TensorRT-LLM checkpoint
# holds its weights in fp16 at most (quantized ones in 1 or 0.5 bytes); an onnxruntime-genai
# int4/int8 LLM holds 1- or 0.5-byte weights (the 0.18 builder quantizes lm_head too: SmolLM2's
# int4 graph had it in 4 bits) plus fp32 norms and scales, so 2 bytes a weight bounds both. The
# builder also copies llm_hf/ whole into its scratch.
CHECKPOINT_BYTES_PER_WEIGHT = ORT_BYTES_PER_WEIGHT = 2


def _hf_weights(hf_dir: Path) -> tuple[int, int]:
    """(bytes, elements) of the weights in llm_hf/, from their safetensors headers."""
    files = sorted(hf_dir.glob("*.safetensors"))
    elements = sum(math.prod(shape) for f in files for shape, _ in safetensors_header(f).values())
    return sum(f.stat().st_size for f in files), elements


def _config(scheme: str, hidden: int, intermediate: int):
    import modelopt.torch.quantization as mtq

    if scheme == "int8_sq":
        return mtq.INT8_SMOOTHQUANT_CFG, {}
    if scheme == "int8_wo":
        return mtq.INT8_WEIGHT_ONLY_CFG, {}
    if scheme == "fp8":
        return mtq.FP8_DEFAULT_CFG, {}
    # AWQ groups weights in blocks of 128 along the input dimension; smaller models (e.g. width
    # 576) need 64, which TensorRT-LLM's W4A16 AWQ kernels also support.
    block = next((b for b in (128, 64, 32) if hidden % b == 0 and intermediate % b == 0), None)
    if block is None:
        raise InputError(f"int4_awq needs the LLM's widths ({hidden}, {intermediate}) divisible by 32, 64 or 128")
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:  # a list of {quantizer_name, cfg} rules in ModelOpt 0.47
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            entry["cfg"]["block_sizes"] = {**entry["cfg"]["block_sizes"], -1: block}
    return cfg, {"awq_block_size": block}


def _questions(shard: dict) -> int:
    """How many questions a calibration shard holds (keys ``prompt_ids_0``, ``prompt_ids_1``, ...)."""
    k = 0
    while f"prompt_ids_{k}" in shard:
        k += 1
    return k


def _prompts(pipe: Pipeline, shards: list[dict]) -> list[torch.Tensor]:
    """(1, L, D) inputs_embeds for every (video, question) in the shards, as the runtime splices them."""
    return [torch.from_numpy(np.ascontiguousarray(
                pipe.embed_prompt(shard[f"prompt_ids_{k}"], shard[f"visual_tokens_{k}"]), dtype=np.float32))
            for shard in shards for k in range(_questions(shard))]


def _greedy(model, embeds: torch.Tensor, steps: int) -> list[int]:
    """``steps`` greedy tokens (no end-of-sequence stop), by the reference's own loop."""
    from ppllava.generation import SamplingOptions, generate_from_embeds

    return generate_from_embeds(model, embeds, steps, SamplingOptions(), set()).tokens


def top1_evidence(agree: int, total: int) -> dict:
    """The judged sample behind a top-1 agreement: its token counts and the 95% Wilson interval of
    the rate. A held-out set of 4 prompts x 16 tokens puts one token at 1.6 points, so a verdict
    next to the threshold says little until the set grows (``calibrate`` more clips/questions)."""
    z = 1.959964
    p, z2 = agree / total, z * z / total
    centre, half = (p + z2 / 2) / (1 + z2), z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return {"top1_tokens": [agree, total], "top1_interval_95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]}


def evidence_text(report: dict) -> str:
    """'61/64 held-out tokens, 95% interval 0.871-0.984', and a word when that interval holds the
    threshold (the verdict could go either way on another held-out set)."""
    (agree, total), (lo, hi) = report["top1_tokens"], report["top1_interval_95"]
    text = f"{agree}/{total} held-out tokens, 95% interval {lo:.3f}-{hi:.3f}"
    if lo < report["threshold_top1"] < hi:
        text += " around the threshold: calibrate with more clips or questions for a firmer verdict"
    return text


@torch.inference_mode()
def _agreement(fp, quant, prompts: list[torch.Tensor], table: torch.Tensor) -> dict:
    agree = total = identical = 0
    for embeds in prompts:
        path = _greedy(fp, embeds, GREEDY_TOKENS)
        full = torch.cat([embeds, table[path[:-1]][None]], dim=1)
        start = embeds.shape[1] - 1
        top_fp = fp(inputs_embeds=full).logits[0, start:].argmax(-1)
        top_q = quant(inputs_embeds=full).logits[0, start:].argmax(-1)
        agree += int((top_fp == top_q).sum())
        total += len(path)
        identical += int(_greedy(quant, embeds, GREEDY_TOKENS) == path)
    return {"top1_agreement": agree / total, **top1_evidence(agree, total),
            "identical_greedy_answers": identical / len(prompts),
            "held_out_prompts": len(prompts), "tokens_per_prompt": GREEDY_TOKENS}


def quantize_llm(engine_dir: Path, calib_dir: Path, scheme: str, progress=log.info,
                 enforce_thresholds: bool = True) -> dict:
    if scheme not in SCHEMES:
        raise InputError(f"--llm must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_tensorrt_llm_checkpoint
    except ImportError as exc:
        raise QuantizationError(f"NVIDIA ModelOpt is not installed ({exc}); pip install 'ppllava[quant]'") from None
    from transformers import AutoModelForCausalLM

    manifest = Manifest.load(engine_dir)
    sweep(engine_dir, progress)
    hf_dir = engine_dir / manifest.data["llm"]["hf_dir"]
    require_free(engine_dir, CHECKPOINT_BYTES_PER_WEIGHT * _hf_weights(hf_dir)[1],
                 f"the {scheme} TensorRT-LLM checkpoint")
    pipe = Pipeline.open_exported(engine_dir)
    meta, shards = load_shards(calib_dir)
    if meta.get("engine") != pipe.engine_id:
        raise InputError(f"{calib_dir} was built from another engine or checkpoint (fingerprint mismatch); recalibrate")
    prompts = _prompts(pipe, shards)
    held = max(1, len(prompts) // 5)
    calibrate, held_out = (prompts[:-held], prompts[-held:]) if len(prompts) > 1 else (prompts, prompts)
    fp = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    cfg, extra = _config(scheme, fp.config.hidden_size, fp.config.intermediate_size)
    quant = copy.deepcopy(fp)
    progress(f"quantizing the LLM ({scheme}) on {len(calibrate)} multimodal prompts")

    def forward_loop(model):
        with torch.inference_mode():
            for embeds in calibrate:
                model(inputs_embeds=embeds)

    quant = mtq.quantize(quant, cfg, forward_loop=forward_loop)
    table = fp.get_input_embeddings().weight.detach()
    report = {"scheme": scheme, **extra, **_agreement(fp, quant, held_out, table),
              "threshold_top1": TOP1_THRESHOLDS[scheme], "simulated": "ModelOpt fake quantization in PyTorch (fp32)"}
    report["below_threshold"] = report["top1_agreement"] < TOP1_THRESHOLDS[scheme]
    _save_report(engine_dir, scheme, report)
    if report["below_threshold"] and enforce_thresholds:
        raise QuantizationError(
            f"{scheme}: top-1 agreement {report['top1_agreement']:.3f} < {TOP1_THRESHOLDS[scheme]} "
            f"({evidence_text(report)}); no checkpoint written (numbers in {engine_dir / QUANT_JSON})"
        )
    model_type = fp.config.model_type
    if model_type not in DECODER_TYPES:
        raise QuantizationError(f"no TensorRT-LLM decoder type for {model_type!r}")
    target = engine_dir / "trtllm" / f"{scheme}.{os.urandom(3).hex()}"  # new name: the old stays valid until recorded
    with scratch_dir(engine_dir, "llmq") as scratch:
        out = scratch / scheme
        with torch.inference_mode():
            export_tensorrt_llm_checkpoint(quant, decoder_type=DECODER_TYPES[model_type], dtype=torch.float16,
                                           export_dir=str(out), inference_tensor_parallel=1)
        target.parent.mkdir(exist_ok=True)
        out.rename(target)
    old = _record(engine_dir, scheme, target, report)
    if old is not None and old != target:
        shutil.rmtree(old, ignore_errors=True)
    return report


def _save_report(engine_dir: Path, scheme: str, report: dict) -> None:
    from ppllava.calibration.quantize import update_report

    update_report(engine_dir, ("llm", scheme), report)


def _record(engine_dir: Path, scheme: str, target: Path, report: dict) -> Path | None:
    """File the checkpoint as the LLM stage's ``tensorrt-llm:<scheme>:checkpoint`` variant (the
    input of ``build-engines --llm-scheme``); returns the directory of the one it replaces."""
    config = json.loads((target / "config.json").read_text())
    record = variant_record(engine_dir, target, "tensorrt-llm", scheme, kind="checkpoint",
                            quantization=config.get("quantization"), top1_agreement=report["top1_agreement"],
                            below_threshold=report["below_threshold"])
    superseded = add_variants(engine_dir, [("llm", record)])
    return superseded[0] if superseded else None


ORT_PRECISIONS = ("int4", "int8")


def quantize_ort_llm(engine_dir: Path, calib_dir: Path, precision: str, progress=log.info,
                     enforce_thresholds: bool = True) -> dict:
    """The CPU path: onnxruntime-genai's builder with weight-only ``int4``/``int8`` (round to
    nearest, no calibration needed), judged against the FP ONNX LLM on the calibration set's
    held-out multimodal prompts, recorded as a variant of the LLM stage (``ask --precision int4``)."""
    from ppllava.export.llm import build_onnx_llm
    from ppllava.runtime.backends.onnxruntime import OrtDecoder
    from ppllava.runtime.sampling import Sampling, TokenSampler

    if precision not in ORT_PRECISIONS:
        raise InputError(f"the onnxruntime-genai LLM takes int4 or int8, got {precision!r}")
    manifest = Manifest.load(engine_dir)
    if not manifest.exported("llm"):
        raise InputError(f"{engine_dir} has no ONNX LLM (exported with --llm none)")
    sweep(engine_dir, progress)
    hf_bytes, hf_elements = _hf_weights(engine_dir / manifest.data["llm"]["hf_dir"])
    require_free(engine_dir, hf_bytes + ORT_BYTES_PER_WEIGHT * hf_elements, f"the {precision} ONNX LLM")
    pipe = Pipeline.open_exported(engine_dir)
    meta, shards = load_shards(calib_dir)
    if meta.get("engine") != pipe.engine_id:
        raise InputError(f"{calib_dir} was built from another engine or checkpoint (fingerprint mismatch); recalibrate")
    prompts = [pipe.prompt(shard[f"prompt_ids_{k}"], shard[f"visual_tokens_{k}"])
               for shard in shards for k in range(_questions(shard))]
    held_out = prompts[-max(1, len(prompts) // 5):]
    target = engine_dir / f"llm_{precision}.{os.urandom(3).hex()}"
    progress(f"building the {precision} ONNX LLM with onnxruntime-genai's builder")
    with scratch_dir(engine_dir, "llmq") as scratch:  # the builder's copy of llm_hf goes in here too
        out = scratch / target.name
        build_onnx_llm(engine_dir / manifest.data["llm"]["hf_dir"], out, torch.float32, precision=precision)
        table = pipe.embed_tokens
        fp, quant = OrtDecoder(manifest.stage_path("llm"), embed_tokens=table), OrtDecoder(out, embed_tokens=table)
        greedy = TokenSampler(Sampling())
        agree = total = identical = 0
        for prompt in held_out:  # the runtime's one generation loop, on both decoders
            path = fp.generate(prompt, GREEDY_TOKENS, greedy, set())
            chosen = quant.forced_choices(prompt, path)  # teacher-forced along the FP greedy path
            agree += sum(int(a == b) for a, b in zip(chosen, path))
            total += len(path)
            identical += int(quant.generate(prompt, GREEDY_TOKENS, greedy, set()) == path)
        report = {"scheme": f"ort_{precision}", "top1_agreement": agree / total, **top1_evidence(agree, total),
                  "identical_greedy_answers": identical / len(held_out), "held_out_prompts": len(held_out),
                  "tokens_per_prompt": GREEDY_TOKENS, "threshold_top1": TOP1_THRESHOLDS[f"ort_{precision}"],
                  "simulated": "no: measured with onnxruntime on this machine"}
        report["below_threshold"] = report["top1_agreement"] < report["threshold_top1"]
        _save_report(engine_dir, f"ort_{precision}", report)
        if report["below_threshold"] and enforce_thresholds:
            raise QuantizationError(
                f"ort_{precision}: top-1 agreement {report['top1_agreement']:.3f} < {report['threshold_top1']} "
                f"({evidence_text(report)}); not recorded"
            )
        del fp, quant
        out.rename(target)
    record = variant_record(engine_dir, target, "onnxruntime", precision,
                            quantizer="onnxruntime-genai builder (RTN weight-only)",
                            top1_agreement=report["top1_agreement"], below_threshold=report["below_threshold"])
    for old in add_variants(engine_dir, [("llm", record)]):
        shutil.rmtree(old, ignore_errors=True)
    return report
