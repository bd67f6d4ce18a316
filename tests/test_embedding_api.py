"""The runtime as a library that apps embed: threads, cancellation, lifecycle, option checks."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import numpy as np
import pytest

from ppllava.runtime import Cancelled, EngineError, InputError, Pipeline

CLIPS = [np.random.default_rng(seed).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8) for seed in range(2)]
QUESTIONS = ["What happens first?", "Who is in the room, and why?", "Describe the colours.", "Is it raining?"]
LONG = {"max_new_tokens": 12, "ignore_eos": True}  # long sequences: an interleaved KV cache shows


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("qwen")


@pytest.fixture(scope="module")
def pipe(engine):
    with Pipeline.open(engine) as pipe:
        yield pipe


def _expected(pipe):
    return {(c, q): pipe.ask(CLIPS[c], QUESTIONS[q], **LONG).token_ids for c in range(2) for q in range(4)}


def test_threads_sharing_one_pipeline_get_their_sequential_answers(pipe):
    expected = _expected(pipe)
    jobs = [(c, q) for c in range(2) for q in range(4)] * 2
    start = threading.Barrier(4)
    got, errors = {}, []

    def worker(mine):
        start.wait()
        try:
            for job in mine:
                got.setdefault(job, []).append(pipe.ask(CLIPS[job[0]], QUESTIONS[job[1]], **LONG).token_ids)
        except Exception as exc:  # surfaced below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(len(v) for v in got.values()) == len(jobs)
    for job, answers in got.items():
        assert all(a == expected[job] for a in answers), job


def test_leaving_ask_stream_early_cancels_and_the_next_ask_works(pipe):
    expected = pipe.ask(CLIPS[1], QUESTIONS[0], **LONG).token_ids
    pieces = []
    for i, piece in enumerate(pipe.ask_stream(CLIPS[0], QUESTIONS[1], max_new_tokens=200, ignore_eos=True)):
        pieces.append(piece)
        if i == 1:
            break
    assert len(pieces) == 2
    assert not [t for t in threading.enumerate() if t.name == "ppllava-ask"]  # the worker has stopped
    assert pipe.ask(CLIPS[1], QUESTIONS[0], **LONG).token_ids == expected


def test_cancel_from_another_thread(pipe):
    expected = pipe.ask(CLIPS[0], QUESTIONS[2], **LONG).token_ids
    cancel = threading.Event()
    first_piece = threading.Event()
    outcome = []

    def asker():
        try:
            pipe.ask(CLIPS[0], QUESTIONS[3], max_new_tokens=200, ignore_eos=True, cancel=cancel,
                     on_text=lambda _: first_piece.set())
        except Cancelled:
            outcome.append("cancelled")
        else:
            outcome.append("finished")

    thread = threading.Thread(target=asker)
    thread.start()
    assert first_piece.wait(timeout=120)
    cancel.set()
    thread.join(timeout=120)
    assert outcome == ["cancelled"]
    # a stream whose caller-held cancel is set raises Cancelled in the consumer
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        for _ in pipe.ask_stream(CLIPS[0], QUESTIONS[3], cancel=cancel, max_new_tokens=200, ignore_eos=True):
            cancel.set()
    assert pipe.ask(CLIPS[0], QUESTIONS[2], **LONG).token_ids == expected


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_close_releases_sessions_and_memory(engine):
    with Pipeline.open(engine) as pipe:
        pipe.ask(CLIPS[0], QUESTIONS[0], max_new_tokens=3)
        sessions = [weakref.ref(stage.session) for stage in pipe.stages.values()] + [weakref.ref(pipe.decoder.session)]
    gc.collect()
    assert all(ref() is None for ref in sessions)  # every onnxruntime session is gone
    with pytest.raises(EngineError, match="closed"):
        pipe.ask(CLIPS[0], QUESTIONS[0])
    pipe.close()  # twice is fine

    # Open/ask/close cycles hold steady. A pipeline kept alive costs ~8 MiB of this tiny engine's
    # sessions (measured by keeping them), so a per-cycle leak would add ~64 MiB over 8 cycles;
    # the bound is a fraction of that, well above allocator noise.
    def cycle():
        with Pipeline.open(engine) as p:
            p.ask(CLIPS[1], QUESTIONS[1], max_new_tokens=3)
        gc.collect()

    for _ in range(3):
        cycle()
    before = _rss_mib()
    for _ in range(8):
        cycle()
    assert _rss_mib() - before < 24


def test_options_are_checked_once_for_api_and_cli(engine, tmp_path):
    pipe = Pipeline.open(engine, providers="cpu")  # a string, as the CLI's --providers takes
    assert pipe.backend.options.providers == ("cpu",)
    with pytest.raises(Exception, match="CUDAExecutionProvider is not available"):
        Pipeline.open(engine, providers="cuda, cpu")
    for threads in (0, -1, 1.5):
        with pytest.raises(InputError, match="threads must be an integer >= 1"):
            Pipeline.open(engine, threads=threads)
    assert Pipeline.open(engine, threads=1).ask(CLIPS[0], QUESTIONS[0], max_new_tokens=2).token_ids


def test_public_names():
    import ppllava.runtime as runtime

    for name in runtime.__all__:
        assert getattr(runtime, name) is not None
    assert Pipeline.__doc__ and "Threads" in Pipeline.__doc__ and "Cancellation" in Pipeline.__doc__
