"""``ppllava calibrate``: a calibration set built with the runtime's own decoding, sampling and
preprocessing (the same code path as inference), one ``.npz`` shard per video plus ``calib.json``.

Each shard holds the normalised frames, the pre-pooling vision features, and per question the
alignment ids and mask, the question embedding, the window table, the visual tokens and the LLM
prompt ids. Shards are written atomically and skipped when already present, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ppllava.errors import InputError, PPLLaVAError
from ppllava.runtime.pipeline import Pipeline
from ppllava.runtime.preprocess import normalise
from ppllava.runtime.cache import file_digest
from ppllava.runtime.video import IMAGE_SUFFIXES, check_path, load_clip

log = logging.getLogger(__name__)

CALIB_JSON = "calib.json"
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
GENERIC_QUESTIONS = (
    "What is happening in this video?",
    "Describe the main objects and their colors.",
    "What is the person doing?",
    "Where does this scene take place?",
    "What happens at the end of the video?",
    "How many people appear in the video?",
    "What is the mood of this video?",
    "Describe the camera movement.",
)


def list_videos(source: Path) -> list[Path]:
    """A directory (its video files, sorted) or a text file with one path per line."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES)
    if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
        return [source]  # one video, not a list of them
    if source.is_file():
        try:
            lines = [line.strip() for line in source.read_text().splitlines()]
        except UnicodeDecodeError:
            raise InputError(f"--videos {source} is neither a video (by its suffix) nor a text list of paths") from None
        return [Path(line) for line in lines if line and not line.startswith("#")]
    raise InputError(f"--videos {source} is neither a directory nor a list file")


def engine_identity(pipe: Pipeline) -> str:
    return pipe.engine_id


def build_calibration_set(
    engine_dir: Path, videos: list[Path], out: Path, questions: list[str] | None = None,
    questions_per_video: int = 2, frames: int | None = None, progress: Callable[[str], None] = log.info,
) -> dict:
    if not videos:
        raise InputError("no videos to calibrate on")
    pipe = Pipeline.open_exported(engine_dir)  # never a quantized variant the default would pick
    pipe.tokenizers.require()
    questions = list(questions or GENERIC_QUESTIONS)
    if not questions:
        raise InputError("the questions file holds no questions")
    spec = pipe.manifest.data["preprocessing"]
    frames = frames or int(spec["default_frames"])
    limit = int(pipe.manifest.dims["max_frames"])
    if not 1 <= frames <= limit:
        raise InputError(f"--frames must be between 1 and this engine's maximum of {limit}, got {frames}")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CALIB_JSON
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path} is not readable ({exc}); choose another --out") from None
    if meta and meta.get("engine") != engine_identity(pipe):
        raise PPLLaVAError(f"{out} holds a calibration set of another engine; choose another --out")
    settings = {"frames": frames, "questions_per_video": questions_per_video}
    if meta and {k: meta.get("settings", {}).get(k) for k in settings} != settings:
        raise InputError(f"{out} was built with {meta.get('settings')}; resume with the same settings or choose another --out")
    entries, skipped = {e["shard"]: e for e in meta.get("videos", [])}, []
    q_index = 0
    for i, video in enumerate(videos):
        progress(f"[{i + 1}/{len(videos)}] {video}")
        try:
            digest = file_digest(check_path(video))
            shard = f"shard-{digest[:16]}.npz"
            if shard in entries and (out / shard).is_file():
                q_index += questions_per_video
                continue  # resumed: already written
            clip = load_clip(video, frames, int(spec["size"]))
            pixels = normalise(clip.frames, spec)
            features = pipe.vision(pixels)
            plan = pipe.manifest.plan(clip.media_type)
            index = plan.window_index((features.shape[0], *pipe.manifest.grid))
            record = {"pixel_values": pixels, "features": features, "window_index": index}
            asked = []
            for k in range(questions_per_video):
                question = questions[q_index % len(questions)]
                q_index += 1
                ids, mask = pipe.tokenizers.alignment_ids(question)
                mask = np.ones_like(ids) if mask is None else mask
                text = pipe.text(ids, mask)
                tokens = pipe.pool(features, text, plan, clip.media_type)
                record.update({f"clip_ids_{k}": ids, f"clip_mask_{k}": mask, f"text_embedding_{k}": text,
                               f"visual_tokens_{k}": tokens, f"prompt_ids_{k}": pipe.tokenizers.prompt_ids([(question, None)])})
                asked.append(question)
        except (InputError, PPLLaVAError) as exc:
            skipped.append({"video": str(video), "reason": str(exc)})
            progress(f"    skipped: {exc}")
            continue
        tmp = out / f".{shard}.{os.getpid()}.npz"
        np.savez(tmp, **record)
        tmp.replace(out / shard)
        entries[shard] = {"shard": shard, "video": str(video), "digest": digest, "frames": int(features.shape[0]),
                          "media_type": clip.media_type, "questions": asked}
        _write_meta(out, pipe, spec, settings, entries, skipped)  # after every shard: an interrupted run resumes
    if not entries:
        raise InputError(f"none of the {len(videos)} videos could be read ({skipped[0]['reason'] if skipped else ''})")
    return _write_meta(out, pipe, spec, settings, entries, skipped)


def _write_meta(out: Path, pipe: Pipeline, spec: dict, settings: dict, entries: dict, skipped: list) -> dict:
    questions_per_video = settings["questions_per_video"]
    meta = {
        "engine": engine_identity(pipe),
        "engine_dir": str(pipe.manifest.root),
        "source_fingerprint": pipe.manifest.data["source"]["fingerprint"],
        "settings": settings,
        "sampling": {"frames": settings["frames"], "method": spec.get("sampling", "segment_centres")},
        "questions_per_video": questions_per_video,
        "videos": sorted(entries.values(), key=lambda e: e["shard"]),
        "skipped": skipped,
        "counts": {"videos": len(entries), "skipped": len(skipped), "questions": len(entries) * questions_per_video},
    }
    tmp = out / f".{CALIB_JSON}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / CALIB_JSON)
    return meta


def load_shards(calib_dir: Path) -> tuple[dict, list[dict[str, np.ndarray]]]:
    meta_path = calib_dir / CALIB_JSON
    if not meta_path.is_file():
        raise InputError(f"{calib_dir} is not a calibration set (no {CALIB_JSON}; create it with `ppllava calibrate`)")
    try:
        meta = json.loads(meta_path.read_text())
        shards = []
        for entry in meta["videos"]:
            with np.load(calib_dir / entry["shard"]) as data:
                shards.append({k: data[k] for k in data.files})
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise InputError(f"{calib_dir} is damaged ({type(exc).__name__}: {exc}); rerun `ppllava calibrate`") from None
    if not shards:
        raise InputError(f"{calib_dir} holds no shards; rerun `ppllava calibrate`")
    return meta, shards
