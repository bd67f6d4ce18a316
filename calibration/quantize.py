"""``ppllava quantize --stages``: INT8/FP8 ONNX of the vision / text / pool stages, judged on held-out
clips against the FP stages, by one of two methods, each the one that measures best on its backend:

- ``dynamic`` (INT8, the onnxruntime CPU path): onnxruntime's dynamic quantization, per output
  channel, of the MatMul weights; activations are quantized at run time from their own range, so no
  calibration data is needed and every clip of the set is held out. On the 2-core CPU it ran the
  small preset's vision stage about 2x faster than fp32 at visual-token cosine > 0.999, where static
  Q/DQ gained 1.2x at cosine 0.95 (issue 17). The vision graph's attentions are first rewritten as
  onnxruntime's MultiHeadAttention (``attention_fusion``; checked against the export).
- ``qdq`` (INT8, FP8; what TensorRT needs): explicit Q/DQ with NVIDIA ModelOpt's ONNX post-training
  quantization, calibrated on the set (whole clips for the vision stage, so the BT-Adapter sees real
  frame sequences), judged on the held-out fifth. ``build-engines`` builds TensorRT plans from it.

Quantized stages are new files recorded in the manifest as variants of their stage (precision per
stage, never in a file name the runtime parses); the FP stages stay. ``ppllava ask --precision``
picks a variant.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ppllava.errors import BackendError, InputError, QuantizationError
from ppllava.runtime.backends import STAGES
from ppllava.runtime.backends.onnxruntime import DEFAULT_QUANTIZED, OrtStage, quantized_stages
from ppllava.runtime.manifest import Manifest, add_variants, variant_key, variant_record, write_json_atomic
from ppllava.runtime.pipeline import exported_identity
from ppllava.runtime.scratch import require_free, scratch_dir, sweep, temp_files_in
from ppllava.thresholds import QUANT_STAGES

from ppllava.calibration.dataset import load_shards

log = logging.getLogger(__name__)

PRECISIONS = {"int8": "int8", "fp8": "fp8"}
METHODS = ("auto", "dynamic", "qdq")
QUANTIZER = {"dynamic": "onnxruntime dynamic per-channel", "qdq": "nvidia-modelopt onnx ptq"}
# Accuracy thresholds, one table (cosine similarity against the FP stage on held-out clips).
THRESHOLDS = QUANT_STAGES  # the one thresholds table (ppllava/thresholds.py)
QUANT_JSON = "quant.json"
# Free space per byte of the stages quantized: the scratch copy of the stage, ModelOpt's
# intermediate ORT-quantized model, onnxruntime's augmented calibration model, and the Q/DQ output
# (each at most the stage's size; measured peak on the tiny engines: 1.9x to 2.8x).
SPACE_FACTOR = 4


def _feeds(stage: str, shards: list[dict]) -> list[dict[str, np.ndarray]]:
    """One feed per calibration step: a whole clip (vision) or one question (text, pool)."""
    feeds = []
    for shard in shards:
        if stage == "vision":
            feeds.append({"pixel_values": shard["pixel_values"]})
            continue
        k = 0
        while f"clip_ids_{k}" in shard:
            if stage == "text":
                feeds.append({"clip_ids": shard[f"clip_ids_{k}"], "clip_mask": shard[f"clip_mask_{k}"]})
            else:
                feeds.append({"features": shard["features"], "text_embedding": shard[f"text_embedding_{k}"],
                              "window_index": shard["window_index"]})
            k += 1
    return feeds


def _reader(feeds):
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = list(feeds)
            self.position = 0

        def get_next(self):
            if self.position >= len(self.items):
                return None
            self.position += 1
            return self.items[self.position - 1]

        def get_first(self):  # ModelOpt peeks at one feed to learn the input shapes
            return self.items[0] if self.items else None

        def rewind(self):
            self.position = 0

    return Reader()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def auto_method(precision: str) -> str:
    """What ``--method auto`` runs for ``precision``."""
    return "dynamic" if precision == "int8" else "qdq"


def resolve_method(method: str, precision: str) -> str:
    """``auto``: dynamic for INT8 (the onnxruntime CPU path), Q/DQ for FP8 (onnxruntime has no dynamic FP8)."""
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "auto":
        return auto_method(precision)
    if method == "dynamic" and precision != "int8":
        raise InputError(f"--method dynamic quantizes to int8 only; {precision} needs --method qdq")
    return method


def quantize_stages(engine_dir: Path, calib_dir: Path, stages: list[str], precision: str,
                    progress=log.info, enforce_thresholds: bool = True, method: str = "auto") -> dict:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} for the vision/text/pool stages, got {precision!r}")
    method = resolve_method(method, precision)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise InputError(f"--stages takes a comma list of {', '.join(STAGES)}; got {','.join(stages) or 'nothing'}")
    manifest = Manifest.load(engine_dir)
    sweep(engine_dir, progress)
    sources = [p for s in stages for p in (manifest.stage_path(s), manifest.stage_path(s).with_suffix(".onnx.data"))
               if p.is_file()]
    require_free(engine_dir, SPACE_FACTOR * sum(p.stat().st_size for p in sources),
                 f"quantizing {', '.join(stages)} ({precision})")
    meta, shards = load_shards(calib_dir)
    if meta.get("engine") != exported_identity(manifest):
        raise InputError(f"{calib_dir} was built from another engine or checkpoint (fingerprint mismatch); recalibrate")
    fusions = {}  # stage -> attentions rewritten as MultiHeadAttention (dynamic method)
    if method == "dynamic":  # nothing is calibrated: every clip is held out
        held_out, calibrate = shards, []

        def quantize_one(*args):
            return _quantize_dynamic(*args, check=shards[0], fusions=fusions)
    else:
        held_out = shards[-max(1, len(shards) // 5):] if len(shards) > 1 else shards
        calibrate = shards[: len(shards) - len(held_out)] or shards
        try:
            import modelopt.onnx.quantization as moq
        except ImportError as exc:
            raise QuantizationError(f"NVIDIA ModelOpt is not installed ({exc}); pip install 'ppllava[quant]'") from None
        if len(shards) < 2:
            log.warning("only one calibration clip: the accuracy report is measured on the calibration data itself")

        def quantize_one(*args):
            return _quantize_one(moq, *args)
    # Everything is built and judged in a scratch directory beside the engine dir; the engine dir
    # changes only at the end (new files under new names, then the manifest, then the old files go),
    # so a failure at any point leaves it exactly as it was.
    # The other stages' variants that will run beside these (an earlier run's) are judged with them,
    # chosen by the backend's own rule: for a dynamic int8 run, those the CPU default runs; else every
    # variant at this precision, which --precision runs. The combination is judged, not each run alone.
    earlier, methods = {}, dict.fromkeys(stages, method)
    default_run = method == "dynamic" and precision == DEFAULT_QUANTIZED
    for stage in sorted(quantized_stages(manifest, None if default_run else precision) - set(stages)):
        record = manifest.stage_variant(stage, variant_key("onnxruntime", precision))
        earlier[stage], methods[stage] = manifest.path(record), record.get("method", "qdq")
    if earlier:
        progress(f"judged together with the {precision} {', '.join(sorted(earlier))} recorded before")
    with scratch_dir(engine_dir, "quant") as scratch:
        built = {stage: quantize_one(manifest, stage, precision, calibrate, scratch, progress) for stage in stages}
        report = _accuracy(manifest, {**earlier, **built}, held_out, precision)
        report["method"] = method
        report["quantized_now"], report["methods"] = sorted(built), dict(sorted(methods.items()))
        if fusions:
            report["attention_fused"] = fusions
        worst = report["visual_tokens"]["cosine_min"]
        report["below_threshold"] = worst < THRESHOLDS["visual_tokens_cosine"]
        update_report(engine_dir, ("stages", precision), report)
        if report["below_threshold"] and enforce_thresholds:
            raise QuantizationError(
                f"{precision} visual tokens reach cosine {worst:.4f} < {THRESHOLDS['visual_tokens_cosine']} against the FP "
                f"stages on held-out clips; nothing recorded (numbers in {engine_dir / QUANT_JSON})"
            )
        if report["below_threshold"]:
            log.warning("%s visual tokens reach cosine %.4f < %s: recorded anyway (--no-threshold), marked below threshold",
                        precision, worst, THRESHOLDS["visual_tokens_cosine"])
        tag = os.urandom(3).hex()
        files = {}
        for stage, path in built.items():
            files[stage] = engine_dir / f"{stage}.{precision}.{tag}.onnx"
            shutil.move(str(path), files[stage])
    old = _record(engine_dir, files, precision, report, method, fusions)
    for path in old:  # only after the manifest points at the new files
        path.unlink(missing_ok=True)
    return report


def _copy_stage(manifest, stage: str, scratch: Path) -> tuple[Path, Path]:
    """A scratch copy of the stage's ONNX (and external data): the quantizers were seen to rewrite
    their input. Returns (work dir, copy)."""
    source = manifest.stage_path(stage)
    work = scratch / stage
    work.mkdir()
    return work, _copy_stage_files(source, work)


def _copy_stage_files(source: Path, work: Path) -> Path:
    copy = work / source.name
    shutil.copy2(source, copy)
    if source.with_suffix(".onnx.data").exists():
        shutil.copy2(source.with_suffix(".onnx.data"), work / source.with_suffix(".onnx.data").name)
    return copy


@contextlib.contextmanager
def _root_warnings_off():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantize_dynamic(manifest, stage: str, precision: str, calibrate: list[dict], scratch: Path, progress,
                      check: dict, fusions: dict) -> Path:
    """onnxruntime's dynamic INT8 quantization of the stage's MatMul weights, per output channel
    (signed weights, activations quantized per run) -> scratch/<stage>/<stage>.q.onnx. The vision
    stage's attentions become onnxruntime's MultiHeadAttention first (``attention_fusion``), checked
    against the exported graph's features of the calibration clip ``check``; ``fusions[stage]`` says how many."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise QuantizationError(f"onnxruntime's quantization tools are not available ({exc})") from None
    work, copy = _copy_stage(manifest, stage, scratch)
    if stage == "vision":
        fusions[stage] = _fuse_attention_checked(copy, manifest.stage_path(stage), check["pixel_values"],
                                                 check["features"], progress)
    progress(f"quantizing {stage} (int8, dynamic per-channel MatMul weights)")
    output = work / f"{stage}.q.onnx"
    library_temp = work / "tmp"
    library_temp.mkdir()
    logs = io.StringIO()
    try:
        # its advice to pre-process goes to the root logger at WARNING on every call: not the user's concern
        with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs), temp_files_in(library_temp), \
                _root_warnings_off():
            quantize_dynamic(str(copy), str(output), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"],
                             use_external_data_format=False)  # one file (a quarter of the fp32 weights), moved as one
    except Exception as exc:  # onnxruntime's quantizer raises many types; the first line says what failed
        raise QuantizationError(f"onnxruntime could not quantize the {stage} stage: {str(exc).strip().splitlines()[0]}") from exc
    return output


# The fused graph may differ from the exported one by float rounding only (the same products,
# reordered): about 1e-6 of the features' scale here; a wrong match differs by their whole scale.
FUSION_TOLERANCE = 1e-4


def _fuse_attention_checked(copy: Path, source: Path, pixel_values: np.ndarray, features: np.ndarray,
                            progress) -> int:
    """Rewrite ``copy`` (the scratch copy of ``source``) with MultiHeadAttention where it matches,
    if the rewritten graph gives the exported one's ``features`` (a calibration shard's, computed by
    ``source`` itself) on ``pixel_values``; else restore it."""
    import onnx

    from ppllava.calibration.attention_fusion import fuse_attention

    model = onnx.load(str(copy))
    fused = fuse_attention(model)
    if not fused:
        return 0
    refused = None
    try:
        data = copy.with_suffix(".onnx.data")
        if data.exists():  # rewritten whole: onnx's writer would append to the old file
            data.unlink()
            onnx.save(model, str(copy), save_as_external_data=True, location=data.name)
        else:
            onnx.save(model, str(copy))
        del model
        before = features
        after = OrtStage(copy).run(pixel_values=pixel_values)["features"]
        scale = float(np.abs(before).max()) or 1.0
        if after.shape != before.shape:
            refused = f"gives features of shape {after.shape}, not {before.shape}"
        else:
            difference = float(np.abs(after - before).max())
            if not difference <= FUSION_TOLERANCE * scale:  # also refuses NaN
                refused = f"differs from it by {difference:.3g} (features up to {scale:.3g})"
    except (BackendError, OSError, ValueError) as exc:  # not written, or onnxruntime refused the graph
        refused = f"could not be checked: {exc}"
    if refused:
        log.warning("the MultiHeadAttention rewrite of %s %s; quantizing the graph as exported", source.name, refused)
        _copy_stage_files(source, copy.parent)
        return 0
    progress(f"{fused} attentions as onnxruntime MultiHeadAttention (features within {difference:.2g} of the export)")
    return fused


def _quantize_one(moq, manifest, stage: str, precision: str, calibrate: list[dict], scratch: Path, progress) -> Path:
    """ModelOpt's explicit Q/DQ on a copy of the stage -> scratch/<stage>/<stage>.q.onnx."""
    work, copy = _copy_stage(manifest, stage, scratch)
    feeds = _feeds(stage, calibrate)
    if not feeds:
        raise InputError(f"the calibration set has no samples for the {stage} stage")
    progress(f"quantizing {stage} ({precision}) on {len(feeds)} calibration samples")
    output = work / f"{stage}.q.onnx"
    library_temp = work / "tmp"  # ModelOpt's and onnxruntime's model copies (see temp_files_in)
    library_temp.mkdir()
    logs = io.StringIO()
    try:
        with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs), temp_files_in(library_temp):
            moq.quantize(onnx_path=str(copy), quantize_mode=precision, calibration_data_reader=_reader(feeds),
                         calibration_eps=["cpu"], output_path=str(output), log_level="ERROR",
                         high_precision_dtype="fp32")
    except Exception as exc:  # ModelOpt raises many types; the first line says what failed
        raise QuantizationError(f"ModelOpt could not quantize the {stage} stage: {str(exc).strip().splitlines()[0]}") from exc
    return output


def read_report(engine_dir: Path, keys: tuple[str, str]) -> dict | None:
    """One report of quant.json (``update_report``'s keys), or None."""
    try:
        data = json.loads((engine_dir / QUANT_JSON).read_text())
        report = data[keys[0]][keys[1]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if isinstance(report, dict) else None


def update_report(engine_dir: Path, keys: tuple[str, str], report: dict) -> None:
    """Merge one report into quant.json ({"stages": {precision: ...}, "llm": {scheme: ...}}), atomically."""
    path = engine_dir / QUANT_JSON
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or not set(data) <= {"stages", "llm"}:
        data = {}  # an older single-report file
    data.setdefault(keys[0], {})[keys[1]] = report
    write_json_atomic(path, data)


def _accuracy(manifest: Manifest, files: dict[str, Path], held_out: list[dict], precision: str) -> dict:
    """FP stages vs quantized ones, chained as the runtime chains them, on held-out clips."""
    fp = {s: OrtStage(manifest.stage_path(s)) for s in STAGES}
    q = {s: OrtStage(files[s]) if s in files else fp[s] for s in STAGES}
    rows = {"features": [], "text_embedding": [], "visual_tokens": []}
    for shard in held_out:
        f_fp = fp["vision"].run(pixel_values=shard["pixel_values"])["features"]
        f_q = q["vision"].run(pixel_values=shard["pixel_values"])["features"]
        rows["features"].append((f_fp, f_q))
        k = 0
        while f"clip_ids_{k}" in shard:
            ids, mask = shard[f"clip_ids_{k}"], shard[f"clip_mask_{k}"]
            t_fp = fp["text"].run(clip_ids=ids, clip_mask=mask)["text_embedding"]
            t_q = q["text"].run(clip_ids=ids, clip_mask=mask)["text_embedding"]
            rows["text_embedding"].append((t_fp, t_q))
            v_fp = fp["pool"].run(features=f_fp, text_embedding=t_fp, window_index=shard["window_index"])["visual_tokens"]
            v_q = q["pool"].run(features=f_q, text_embedding=t_q, window_index=shard["window_index"])["visual_tokens"]
            rows["visual_tokens"].append((v_fp, v_q))
            k += 1
    report = {"precision": precision, "stages": sorted(files), "held_out_clips": len(held_out), "thresholds": THRESHOLDS}
    for name, pairs in rows.items():
        cos = np.concatenate([_cosine(a, b) for a, b in pairs])
        report[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                        "max_abs_error": float(max(np.abs(a - b).max() for a, b in pairs))}
    return report


def _record(engine_dir: Path, files: dict[str, Path], precision: str, report: dict, method: str,
            fusions: dict[str, int]) -> list[Path]:
    """Add the quantized files to the manifest as stage variants (atomic rewrite); returns the files
    of the variants they replace. ``fusions``: a stage's attentions rewritten as MultiHeadAttention."""
    return add_variants(engine_dir, [(stage, variant_record(
        engine_dir, file, "onnxruntime", precision, quantizer=QUANTIZER[method], method=method,
        visual_tokens_cosine_min=report["visual_tokens"]["cosine_min"], below_threshold=report["below_threshold"],
        **({"attention_fused": fusions[stage]} if stage in fusions else {})))
        for stage, file in files.items()])
