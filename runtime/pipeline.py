"""The torch-free pipeline over an engine directory: vision -> text -> pool -> LLM.

``Pipeline.open(engine_dir)`` loads what the manifest describes; ``generate_ids`` runs pre-processed
inputs end to end (integrations and parity checks use it; ``ask`` adds video decoding and
tokenization on top).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from ppllava.errors import EngineError, InputError
from ppllava.plan import WindowPlan, plan_for_budget
from ppllava.runtime.backends import BACKENDS, Backend, BackendOptions, get_backend
from ppllava.runtime.cache import DigestMemo, FeatureCache, FeatureSpec, file_digest
from ppllava.runtime.generation import Prompt, check_cancel
from ppllava.runtime.manifest import Manifest
from ppllava.runtime.video import IMAGE_SUFFIXES
from ppllava.runtime.sampling import Sampling, TokenSampler

log = logging.getLogger(__name__)

MEDIA_TYPES = ("video", "image")
__all__ = ["BACKENDS", "DEFAULT_MAX_NEW_TOKENS", "Pipeline"]
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Timings:
    ms: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1e3


@dataclass
class GenerationResult:
    token_ids: list[int]
    timings: Timings
    visual_tokens: int


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    timings: Timings
    visual_tokens: int
    frames: int
    cached: bool
    media_type: str
    prompt_tokens: int = 0  # prompt length the LLM saw, visual tokens included

    def as_dict(self) -> dict:
        decode_ms = self.timings.ms.get("decode", 0.0)
        steps = max(len(self.token_ids) - 1, 0)
        return {
            "answer": self.text, "token_ids": self.token_ids, "visual_tokens": self.visual_tokens,
            "frames": self.frames, "media_type": self.media_type, "vision_cached": self.cached,
            "prompt_tokens": self.prompt_tokens,
            "timings_ms": {k: round(v, 2) for k, v in self.timings.ms.items()},
            "decode_tokens_per_s": round(steps / (decode_ms / 1e3), 2) if decode_ms and steps else None,
        }


def _pools(plan: WindowPlan, shape) -> bool:
    try:
        plan.output_grid(shape)
        return True
    except ValueError:
        return False


class _AnySet:
    """Set when any of its events is (the caller's ``cancel`` and ``ask_stream``'s own)."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def exported_identity(manifest: Manifest) -> str:
    """The identity of an engine's exported vision features: its checkpoint's fingerprint and the
    vision stage's checksums (a pipeline on a quantized variant or another device adds its cache key)."""
    vision = manifest.stage("vision")
    return manifest.data["source"]["fingerprint"] + ":" + ",".join(sorted(f["sha256"] for f in vision.get("files", {}).values()))


class Pipeline:
    """Video question answering over one engine dir: video -> features (cache) -> text -> pool ->
    prompt -> decoder, on whichever backend (``ppllava.runtime.backends``) runs the stages and the LLM.

    Open with ``Pipeline.open(engine_dir, backend=..., providers=..., threads=..., precision=...)``,
    preferably as a context manager (``close()`` releases the sessions and memory maps).

    Threads: one Pipeline may be shared. Stage runs (vision / text / pool) are serialised by one
    lock and generation by another, because the decoder holds one KV cache and bound I/O buffers
    that a second sequence would overwrite; so a second request's vision stage overlaps the first
    one's decoding, and answers are exactly what each request would get alone. For parallel
    decoding open one Pipeline per worker (they share nothing but the files).

    Cancellation: ``ask(..., cancel=event)`` raises ``Cancelled`` within one decode step (or
    before the next stage) once ``event.is_set()``; closing an ``ask_stream`` generator early
    (``break``, a client that disconnects) cancels its generation and waits for it, so the
    pipeline is usable again when the generator is gone.
    """

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest = manifest
        self.backend = backend
        self._stage_lock = threading.RLock()
        self._decode_lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._closed = False
        self.precision = backend.options.precision
        self.max_frames = int(backend.max_frames)
        self.stages = backend.open_stages()
        self.embed_tokens = self.image_newline = None
        self.decoder = backend.open_decoder(self._embeddings)
        llm = manifest.data["llm"]
        if self.decoder is not None:
            self._embeddings()
        self.image_token_id = int(llm["image_token_id"])
        self.pad_token_id = llm.get("pad_token_id")
        self.eos_token_ids = set(llm.get("eos_token_ids", []))
        self.context = int(manifest.dims["llm_context"])
        self.cache = FeatureCache()
        self.digests = DigestMemo()  # content hashes of video files, by (device, inode, size, mtime)
        self._tokenizers = None
        self.engine_id = exported_identity(manifest)
        if backend.cache_key:
            self.engine_id += ":" + backend.cache_key  # features of another artifact/device are cached apart

    def _embeddings(self):
        """The token-embedding table (memory-mapped: a 7B vocabulary's table is ~1 GB, and a prompt
        touches a few hundred rows) and ``image_newline``, loaded on first use."""
        with self._init_lock:
            if self.embed_tokens is None:
                from ppllava.runtime.tensors import map_safetensors

                extras = map_safetensors(self.manifest.root / self.manifest.data["llm"]["embeddings"])
                self.image_newline = np.asarray(extras["image_newline"])
                self.embed_tokens = extras["embed_tokens"]
            return self.embed_tokens

    @classmethod
    def open(cls, engine_dir, backend: str = "onnxruntime", providers: tuple[str, ...] = ("cpu",),
             threads: int | None = None, cache_dir=None, cache_bytes: int = 512 * 2**20,
             precision: str | None = None, cache_disk_bytes: int = 4 * 2**30) -> "Pipeline":
        """``backend``: a name in ``BACKENDS``; ``providers``: onnxruntime execution providers in
        order ("cuda,cpu" or ("cuda", "cpu")); ``threads``: intra-op threads per stage (None: the
        library's default); ``precision``: the recorded variant to run ("int8", "int4", "fp16", ...);
        ``cache_dir`` / ``cache_bytes`` / ``cache_disk_bytes``: the vision-feature cache (memory, plus
        disk if a dir is given; a damaged, foreign or unwritable cache only costs a recomputation)."""
        backend_class = get_backend(backend)  # the registry refuses an unknown name, before any file is read
        options = BackendOptions(providers, threads, precision)  # checked before any file is read
        manifest = Manifest.load(engine_dir)
        pipe = cls(manifest, backend_class(manifest, options))
        pipe.cache = FeatureCache(cache_bytes, cache_dir, cache_disk_bytes)
        pipe.digests = DigestMemo(cache_dir)
        return pipe

    @classmethod
    def open_exported(cls, engine_dir, **options) -> "Pipeline":
        """``open`` on the stages as exported, never the quantized variants it picks by default: what
        calibration, quantization and verification judge against."""
        # A peek at the manifest only: ``open`` validates it and checks the files (hashing them) itself.
        precision = Manifest.load(engine_dir, check_files=False).stage("vision").get("precision", "fp32")
        return cls.open(engine_dir, precision=precision, **options)

    def close(self) -> None:
        """Release the stage sessions, the decoder, the memory-mapped embeddings and the cached
        features; waits for a running request. Later calls raise ``EngineError``; closing twice is fine."""
        with self._decode_lock, self._stage_lock:
            if self._closed:
                return
            self._closed = True
            for stage in self.stages.values():
                stage.close()
            self.stages, self.decoder, self._tokenizers = {}, None, None
            self.embed_tokens = self.image_newline = None
            self.cache = FeatureCache(0)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_check(self) -> None:
        if self._closed:
            raise EngineError("this Pipeline was closed; open the engine dir again")

    @property
    def tokenizers(self):
        with self._init_lock:
            if self._tokenizers is None:
                from ppllava.runtime.prompt import Tokenizers

                self._tokenizers = Tokenizers(self.manifest.root, self.manifest.data)
            return self._tokenizers

    # ---------------------------------------------------------------- stages
    # The public stage methods take and return numpy arrays. The underscored ones are what
    # generate_ids chains; a backend may keep their results on its device (the torch backend does).
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.backend.host(self._vision(pixel_values))

    def text(self, clip_ids: np.ndarray, clip_mask: np.ndarray | None = None) -> np.ndarray:
        return self.backend.host(self._text(clip_ids, clip_mask))

    def pool(self, features: np.ndarray, text: np.ndarray, plan: WindowPlan, media_type: str = "video") -> np.ndarray:
        return self.backend.host(self._pool(features, text, plan, media_type))

    def _run(self, stage: str, **inputs) -> dict:
        with self._stage_lock:
            self._open_check()
            return self.stages[stage].run(**inputs)

    def _vision(self, pixel_values):
        return self._run("vision", pixel_values=pixel_values)["features"]

    def _text(self, clip_ids, clip_mask=None):
        if clip_mask is None:
            clip_mask = np.ones_like(clip_ids)
        else:
            # A masked tower (CLIP: causal attention, pooled at the end-of-text token) gives the same
            # embedding on the real tokens alone; the padding to 248 was ~13x the work (a SigLIP-style
            # tower has no mask and pools the last position: its padding stays).
            real = int(clip_mask[0].sum())
            if (self.manifest.data["alignment"]["mask"] and clip_mask.shape[0] == 1 and 0 < real < clip_mask.shape[1]
                    and clip_mask[0, :real].all()):
                clip_ids, clip_mask = clip_ids[:, :real], clip_mask[:, :real]
        return self._run("text", clip_ids=clip_ids, clip_mask=clip_mask)["text_embedding"]

    def _pool(self, features, text, plan: WindowPlan, media_type: str = "video"):
        grid = (features.shape[0], *self.manifest.grid)
        try:
            index = plan.window_index(grid)
        except ValueError as exc:
            raise InputError(f"cannot pool {features.shape[0]} frame(s): {exc}") from None
        tokens = self._run("pool", features=features, text_embedding=text, window_index=index)["visual_tokens"]
        if media_type == "image":
            self._embeddings()
            tokens = self.backend.concat(tokens, self.image_newline)
        return tokens

    def prompt(self, input_ids, visual) -> Prompt:
        """The prompt value every decoder splices: (1, L) ids with one image token + (K, D) visual tokens."""
        return Prompt.build(input_ids, visual, self.image_token_id, self._embeddings().shape[0], self.pad_token_id)

    def embed_prompt(self, input_ids: np.ndarray, visual: np.ndarray) -> np.ndarray:
        """(1, L) ids with one image token + (K, D) visual tokens -> (1, L - 1 + K, D); as upstream,
        prompt tokens equal to the pad id embed to zeros."""
        return self.prompt(input_ids, self.backend.host(visual)).embeds(self._embeddings())

    def _visual(self, pixel_values, clip_ids, clip_mask, media_type, plan):
        features = self._vision(np.asarray(pixel_values, dtype=np.float32))
        text = self._text(np.asarray(clip_ids, dtype=np.int64), None if clip_mask is None else np.asarray(clip_mask, dtype=np.int64))
        return self._pool(features, text, plan or self.manifest.plan(media_type), media_type)

    def forced_choices(self, pixel_values, clip_ids, input_ids, forced: list[int], clip_mask=None,
                       media_type: str = "video", plan: WindowPlan | None = None) -> list[int]:
        """Teacher forcing: the LLM is fed ``forced`` (e.g. a reference's greedy tokens) one by one,
        and this returns its own greedy choice before each. ``mean(choice == forced)`` is the top-1
        agreement with the reference along the reference's path."""
        if self.decoder is None or not self.decoder.teacher_forcing:
            raise EngineError("teacher forcing needs a step decoder (onnxruntime or torch), not --llm none and not "
                              "TensorRT-LLM's ModelRunner, which generates whole sequences")
        visual = self._visual(pixel_values, clip_ids, clip_mask, media_type, plan)
        prompt = self.prompt(input_ids, visual)
        with self._decode_lock:
            self._open_check()
            return self.decoder.forced_choices(prompt, list(forced))

    # ------------------------------------------------------------ end to end
    def ask_stream(self, video, question: str, cancel=None, **options):
        """Like ``ask``, as a generator: yields text pieces as they are decoded, then the ``Answer``.

        The work runs on a helper thread; errors are re-raised here, in the caller's thread. Closing
        the generator early (``break``, ``.close()``, garbage collection) cancels the generation and
        waits for the helper thread; ``cancel`` set by the caller raises ``Cancelled`` here.
        """
        import queue

        items: queue.Queue = queue.Queue()
        done = object()
        abandoned = threading.Event()

        def work():
            try:
                items.put(self.ask(video, question, on_text=items.put, cancel=_AnySet(cancel, abandoned), **options))
            except BaseException as exc:  # handed to the consumer, raised there
                items.put(exc)
            finally:
                items.put(done)

        thread = threading.Thread(target=work, name="ppllava-ask", daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abandoned.set()
            thread.join()

    def video_features(self, video, frames: int | None = None, start: float | None = None, end: float | None = None,
                       max_side: int | None = None, timings: Timings | None = None):
        """Decode, preprocess and run the vision stage, or take the features from the cache.
        ``video`` is a file path, or already-decoded RGB frames (T, H, W, 3) uint8 (used as they are:
        no sampling). Returns (features, media_type, frame count, cached)."""
        from ppllava.runtime.preprocess import normalise
        from ppllava.runtime.video import MAX_SIDE, check_path, load_clip, resize_frames

        timings = timings or Timings()
        spec = self.manifest.data["preprocessing"]
        frames = frames or int(spec["default_frames"])
        limit = self.max_frames
        if frames > limit:
            raise InputError(f"--frames {frames} exceeds this engine's maximum of {limit} (export --max-frames)")
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or not 1 <= video.shape[0] <= limit:
                raise InputError(f"frames must be (T, H, W, 3) uint8 RGB with 1 <= T <= {limit}, got {video.shape} {video.dtype}")
            content = hashlib.blake2b(video.tobytes(), digest_size=20).hexdigest()
        else:
            content = self._digest(check_path(video), timings)
        # "sampling": how frames are chosen (by timestamps since VFR support), so older entries never match
        key = FeatureCache.key(content, self.engine_id, frames=frames, start=start, end=end, sampling="timestamps")
        dims = self.manifest.dims
        # features from another engine, of another shape or not finite are discarded and recomputed
        expect = FeatureSpec((int(dims["num_patches"]), int(dims["vision_hidden"])), (np.float16, np.float32),
                             self.max_frames)
        hit = self.cache.get(key, engine=self.engine_id, expect=expect)
        if hit is not None:
            features, media = hit
            return features, media, features.shape[0], True
        t0 = time.perf_counter()
        if isinstance(video, np.ndarray):
            clip_frames, media_type = resize_frames(video, int(spec["size"])), "video"
        else:
            clip = load_clip(video, frames, int(spec["size"]), start, end, MAX_SIDE if max_side is None else max_side)
            clip_frames, media_type = clip.frames, clip.media_type
        timings.add("decode_sample", time.perf_counter() - t0)
        t0 = time.perf_counter()
        pixels = normalise(clip_frames, spec)
        timings.add("preprocess", time.perf_counter() - t0)
        t0 = time.perf_counter()
        features = self._vision(pixels)
        self.backend.sync()
        timings.add("vision", time.perf_counter() - t0)
        self.cache.put(key, features, media_type, engine=self.engine_id)
        return features, media_type, features.shape[0], False

    def _check_frames(self, frames: int, what: str) -> None:
        """Refuse (before decoding, where possible) a frame count the default pooling plan cannot pool."""
        grid = self.manifest.grid
        plan = self.manifest.plan("video")
        try:
            plan.output_grid((frames, *grid))
        except ValueError:
            fits = [t for t in range(1, self.max_frames + 1) if _pools(plan, (t, *grid))]
            need = f"at least {fits[0]}" if fits else "more"
            raise InputError(f"{what} {frames} frame(s); this engine's pooling plan needs {need} "
                             "(or pass --tokens to pool fewer frames)") from None

    def _digest(self, path, timings: Timings) -> str:
        """Content hash of a video file, remembered (on disk with a cache dir) while the file is unchanged."""
        digest = self.digests.lookup(path)
        if digest is None:
            t0 = time.perf_counter()
            digest = file_digest(path, memo=self.digests)
            timings.add("hash", time.perf_counter() - t0)
        return digest

    def ask(self, video, question: str, history: list[tuple[str, str]] | None = None, frames: int | None = None,
            start: float | None = None, end: float | None = None, tokens: int | None = None,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: Sampling = Sampling(), max_side: int | None = None,
            on_text: Callable[[str], None] | None = None, ignore_eos: bool = False, cancel=None) -> Answer:
        """Answer ``question`` about ``video`` (a file path, or RGB frames (T, H, W, 3) uint8);
        ``history`` holds earlier (question, answer) turns. ``on_text`` receives the answer as it
        streams; ``cancel`` (e.g. a ``threading.Event``) stops it with ``Cancelled``."""
        from ppllava.runtime.prompt import check_question

        question = check_question(question)
        self.tokenizers.require()
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if tokens is not None and tokens < 1:
            raise InputError(f"--tokens must be >= 1, got {tokens}")
        if tokens is None and isinstance(video, (str, Path)) and Path(video).suffix.lower() not in IMAGE_SUFFIXES:
            self._check_frames(frames or int(self.manifest.data["preprocessing"]["default_frames"]), "--frames asks for")
        timings = Timings()
        check_cancel(cancel)
        features, media, count, cached = self.video_features(video, frames, start, end, max_side, timings)
        check_cancel(cancel)
        plan = self.manifest.plan(media)
        if tokens is not None:
            if media == "image" and tokens < 2:
                raise InputError(f"--tokens must be >= 2 for an image (one visual token plus its newline token), got {tokens}")
            budget = tokens - (media == "image")  # the image's newline token counts against the budget
            plan = plan_for_budget(budget, (count, *self.manifest.grid))
            most = count * self.manifest.grid[0] * self.manifest.grid[1]
            if budget > most:
                log.warning("--tokens %d: %d frame(s) give at most %d visual tokens; using %d", tokens, count,
                            most + (media == "image"), most + (media == "image"))
        if media == "video" and tokens is None:
            self._check_frames(count, "the clip gave")
        visual = int(np.prod(plan.output_grid((count, *self.manifest.grid)))) + (media == "image")
        input_ids = self.tokenizers.prompt_ids([*(history or []), (question, None)])
        length = input_ids.shape[1] - 1 + visual
        if length >= self.context:
            raise InputError(
                f"prompt of {length} tokens ({visual} visual) does not fit the LLM context of {self.context}; "
                "ask a shorter question, drop chat history, or lower --tokens"
            )
        clip_ids, clip_mask = self.tokenizers.alignment_ids(question)
        streamed: list[int] = []
        printed = [""]

        def emit(token: int) -> None:
            streamed.append(token)
            if on_text is not None and token not in self.eos_token_ids:
                text = self.tokenizers.decode([t for t in streamed if t not in self.eos_token_ids])
                # A multi-byte character arrives over several tokens: hold back until it is complete.
                if not text.endswith("\ufffd") and text.startswith(printed[0]):
                    on_text(text[len(printed[0]):])
                    printed[0] = text

        result = self.generate_ids(None, clip_ids, input_ids, clip_mask, max_new_tokens, media, plan, sampling,
                                   features=features, on_token=emit, ignore_eos=ignore_eos, cancel=cancel)
        for stage, ms in result.timings.ms.items():
            timings.ms[stage] = timings.ms.get(stage, 0.0) + ms
        text = self.tokenizers.decode([t for t in result.token_ids if t not in self.eos_token_ids])
        if on_text is not None and text.startswith(printed[0]) and len(text) > len(printed[0]):
            on_text(text[len(printed[0]):])  # whatever was held back at the end
        return Answer(text.strip(), result.token_ids, timings, result.visual_tokens, count, cached, media, length)

    def generate_ids(
        self,
        pixel_values,
        clip_ids,
        input_ids,
        clip_mask=None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        media_type: str = "video",
        plan: WindowPlan | None = None,
        sampling: Sampling = Sampling(),
        features: np.ndarray | None = None,
        on_token: Callable[[int], None] | None = None,
        ignore_eos: bool = False,
        cancel=None,
    ) -> GenerationResult:
        """Pre-processed inputs -> new token ids (greedy unless ``sampling`` says otherwise)."""
        self._open_check()
        if self.decoder is None:
            raise EngineError(f"{self.manifest.root} was exported without an LLM (--llm none)")
        if media_type not in MEDIA_TYPES:
            raise InputError(f"media_type must be one of {MEDIA_TYPES}, got {media_type!r}")
        timings = Timings()
        t0 = time.perf_counter()
        if features is None:
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            limit = self.max_frames
            if pixel_values.ndim != 4 or not 1 <= pixel_values.shape[0] <= limit:
                raise InputError(f"pixel_values must be (T, 3, S, S) with 1 <= T <= {limit}, got {pixel_values.shape}")
            features = self._vision(pixel_values)
            self.backend.sync()
            timings.add("vision", time.perf_counter() - t0)
        t0 = time.perf_counter()
        text = self._text(np.asarray(clip_ids, dtype=np.int64), None if clip_mask is None else np.asarray(clip_mask, dtype=np.int64))
        self.backend.sync()
        timings.add("text", time.perf_counter() - t0)
        t0 = time.perf_counter()
        visual = self._pool(features, text, plan or self.manifest.plan(media_type), media_type)
        self.backend.sync()
        timings.add("pool", time.perf_counter() - t0)
        prompt = self.prompt(input_ids, visual)
        if prompt.length >= self.context:
            raise InputError(f"prompt of {prompt.length} tokens ({visual.shape[0]} visual) does not fit the LLM context of {self.context}")
        max_new_tokens = min(max_new_tokens, self.context - prompt.length)
        with self._decode_lock:  # one KV cache: one sequence at a time (see the class docstring)
            self._open_check()
            check_cancel(cancel)
            tokens = self.decoder.generate(prompt, max_new_tokens, TokenSampler(sampling), self.eos_token_ids,
                                           ignore_eos=ignore_eos, on_token=on_token, timings=timings, cancel=cancel)
        return GenerationResult(tokens, timings, int(visual.shape[0]))
