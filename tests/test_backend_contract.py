"""The backend seam, reached where the libraries cannot run: the TensorRT and TensorRT-LLM adapters
driven against stubs of the documented ``tensorrt`` / ``cuda.cudart`` / ``polygraphy`` and
``tensorrt_llm.runtime.ModelRunner`` APIs, through ``Pipeline.ask``, ``ask_stream`` and bench.

Guards against adapters that diverge from the one generation loop (timing keys bench needs,
streaming, EOS), against a prompt table that does not rebuild the spliced prompt, and against
inputs the libraries would not accept (names, dtypes, streaming flags). The stubs compute real
outputs: a "plan" is the stage's ONNX file run by onnxruntime, and the stub ModelRunner runs the
engine's ONNX LLM on the embeddings the prompt table describes, so the stubbed backend must answer
with the onnxruntime backend's tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.errors import BackendError, EngineError
from ppllava.runtime.backends import BACKENDS, REGISTRY, get_backend
from ppllava.runtime.bench import BackendResult, BenchOptions, Run, bench_pipeline
from ppllava.runtime.manifest import Manifest, add_variants, file_records, variant_record
from ppllava.runtime.pipeline import Pipeline

IDENTITY = {"tensorrt": "10.3.0", "gpu": "Stub GPU", "compute_capability": "8.7"}


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    """A tiny engine with tensorrt-fp16 "plans" (copies of the ONNX stages, run by the stub) and a
    recorded TensorRT-LLM engine dir."""
    out = tmp_path_factory.mktemp("contract") / "engine"
    export_engine(ExportOptions(tiny_dirs["vicuna"], out), report=lambda _: None)
    records = []
    for stage in ("vision", "text", "pool"):
        shutil.copy(out / f"{stage}.onnx", out / f"{stage}.fp16.plan")
        records.append((stage, variant_record(out, out / f"{stage}.fp16.plan", "tensorrt", "fp16", **IDENTITY)))
    (out / "trtllm_engine").mkdir()
    (out / "trtllm_engine" / "rank0.engine").write_bytes(b"stub")
    records.append(("llm", variant_record(out, out / "trtllm_engine", "tensorrt-llm", "fp16", **IDENTITY)))
    add_variants(out, records)
    return out


class StubModelRunner:
    """``tensorrt_llm.runtime.ModelRunner`` as documented: ``from_dir(engine_dir=...)`` and
    ``generate(batch_input_ids=[int32 ids], prompt_table=(1, K, D) fp16, prompt_tasks, max_new_tokens,
    end_id, pad_id, stop_words_list, streaming, return_dict, output_sequence_lengths, ...)``; with
    ``streaming=True`` a generator of ``{"output_ids": (B, beams, max_len), "sequence_lengths": (B, beams)}``
    whose length grows by one token per step; ``output_ids`` is padded with ``pad_id`` to the full
    length, and an end id is not counted in ``sequence_lengths`` (so the adapter must read the
    lengths, and keep the end token itself). Greedy (``top_k=1``), on the engine's ONNX LLM."""

    SAMPLING_FIELDS = {"temperature", "top_k", "top_p", "random_seed"}  # tensorrt_llm SamplingConfig names

    calls: list[dict] = []
    engine_root = None

    @classmethod
    def from_dir(cls, engine_dir: str):
        runner = cls()
        runner.engine_dir = engine_dir
        return runner

    def generate(self, batch_input_ids, prompt_table, prompt_tasks, max_new_tokens, end_id, pad_id,
                 stop_words_list=None, streaming=False, return_dict=False, output_sequence_lengths=False, **sampling):
        import torch

        from ppllava.runtime.backends.onnxruntime import OrtDecoder
        from ppllava.runtime.backends.tensorrt_llm import embed_with_prompt_table

        self.calls.append(dict(ids=batch_input_ids, table=prompt_table, tasks=prompt_tasks, max_new=max_new_tokens,
                               end_id=end_id, pad_id=pad_id, stops=stop_words_list, streaming=streaming,
                               return_dict=return_dict, lengths=output_sequence_lengths, sampling=sampling))
        assert set(sampling) <= self.SAMPLING_FIELDS, sampling
        if stop_words_list is not None:  # the word-list format: int32 (batch, 2, n)
            assert isinstance(stop_words_list, np.ndarray) and stop_words_list.dtype == np.int32
            assert stop_words_list.ndim == 3 and stop_words_list.shape[:2] == (1, 2)
        pipe = Pipeline.open(self.engine_root)  # the engine's ONNX LLM stands in for the TensorRT-LLM engine
        decoder: OrtDecoder = pipe.decoder
        ids = batch_input_ids[0].numpy().astype(np.int64)[None]
        embeds = embed_with_prompt_table(ids, prompt_table[0].float().numpy(), pipe.embed_tokens)
        stops = set() if stop_words_list is None else set(stop_words_list[0, 0].tolist())
        decoder.reset(capacity=ids.shape[1] + max_new_tokens)
        logits = decoder.forward(embeds)
        sequence = list(ids[0])

        total = ids.shape[1] + max_new_tokens

        def result():
            out = torch.tensor([[sequence + [pad_id] * (total - len(sequence))]], dtype=torch.int32)
            return {"output_ids": out, "sequence_lengths": torch.tensor([[len(sequence)]], dtype=torch.int32)}

        def steps():
            nonlocal logits
            for _ in range(max_new_tokens):
                token = int(np.argmax(logits))
                if token == end_id:
                    yield result()  # finished: the end id is not counted
                    return
                sequence.append(token)
                yield result()
                if token in stops:
                    return
                logits = decoder.forward(np.asarray(pipe.embed_tokens[token], np.float32)[None, None])

        if streaming:
            return steps()
        for _ in steps():
            pass
        return result()


class StubTrtRunner:
    """``polygraphy.backend.trt.TrtRunner(engine_loader)``: ``activate()``, ``get_input_metadata()``
    (ordered names) and ``infer(feed_dict)`` -> {name: array}; the "engine" is ONNX run by onnxruntime."""

    def __init__(self, loader):
        self.loader = loader
        self.session = None

    def activate(self):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(self.loader(), providers=["CPUExecutionProvider"])

    def deactivate(self):
        self.session = None

    def get_input_metadata(self):
        return {i.name: None for i in self.session.get_inputs()}

    def infer(self, feed_dict):
        assert all(v.flags["C_CONTIGUOUS"] for v in feed_dict.values())
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed_dict)))


@pytest.fixture
def stubs(monkeypatch, engine):
    """The GPU libraries, as their documented APIs, in sys.modules (the real ones are absent here)."""
    cudart = types.SimpleNamespace(cudaGetDeviceProperties=lambda i: (0, types.SimpleNamespace(
        name=IDENTITY["gpu"].encode(), major=8, minor=7)))
    modules = {
        "tensorrt": types.SimpleNamespace(__version__=IDENTITY["tensorrt"]),
        "cuda": types.SimpleNamespace(cudart=cudart),
        "polygraphy": types.ModuleType("polygraphy"),
        "polygraphy.backend": types.ModuleType("polygraphy.backend"),
        "polygraphy.backend.common": types.SimpleNamespace(BytesFromPath=lambda p: (lambda: open(p, "rb").read())),
        "polygraphy.backend.trt": types.SimpleNamespace(EngineFromBytes=lambda load: load, TrtRunner=StubTrtRunner),
        "tensorrt_llm": types.ModuleType("tensorrt_llm"),
        "tensorrt_llm.runtime": types.SimpleNamespace(ModelRunner=StubModelRunner),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    StubModelRunner.calls = []
    StubModelRunner.engine_root = engine
    return modules


def test_registry_names_every_backend_and_refuses_others():
    assert BACKENDS == tuple(REGISTRY) == ("onnxruntime", "tensorrt", "tensorrt-llm", "torch")
    for name in BACKENDS:
        cls = get_backend(name)
        assert cls.name == name
    with pytest.raises(BackendError, match="unknown"):
        get_backend("tensorrt-dla")


def test_tensorrt_llm_answers_like_onnxruntime_and_streams(engine, stubs):
    ort = Pipeline.open(engine)
    trt = Pipeline.open(engine, backend="tensorrt-llm")
    assert trt.backend.name == "tensorrt-llm" and trt.decoder.__class__.__name__ == "TrtLLMDecoder"
    assert trt.backend.device().name == IDENTITY["gpu"]
    frames = np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)
    want = ort.ask(frames, "What happens?", max_new_tokens=6)
    pieces = []
    got = trt.ask(frames, "What happens?", max_new_tokens=6, on_text=pieces.append)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert "".join(pieces).strip() == got.text
    call = StubModelRunner.calls[-1]
    assert call["streaming"] is True and call["return_dict"] is True and call["lengths"] is True
    K = want.visual_tokens
    # K visual tokens, then the zero row that pad-id tokens point at
    assert tuple(call["table"].shape) == (1, K + 1, 64) and str(call["table"].dtype) == "torch.float16"
    assert not call["table"][0, K].any()
    ids = call["ids"][0].tolist()
    assert str(call["ids"][0].dtype) == "torch.int32"
    assert ids.count(1024) == 1 and sorted(t for t in ids if t >= 1024) == list(range(1024, 1024 + K))
    assert call["end_id"] in trt.eos_token_ids and call["sampling"] == {"top_k": 1}
    assert call["pad_id"] == Manifest.load(engine).data["llm"]["pad_token_id"]
    # the one loop's timing keys: prefill and decode, never a single "generate"
    assert {"prefill", "decode"} <= set(got.timings.ms) and "generate" not in got.timings.ms
    # ask_stream yields the pieces as they are decoded, then the Answer
    items = list(trt.ask_stream(frames, "What happens?", max_new_tokens=6))
    assert items[-1].token_ids == want.token_ids and "".join(items[:-1]).strip() == want.text


def test_streaming_reaches_on_token_step_by_step(engine, stubs):
    """Each token reaches ``on_token`` while the runner is still generating (not all at the end)."""
    trt = Pipeline.open(engine, backend="tensorrt-llm")
    seen_when = []
    original = StubModelRunner.generate

    def counting(self, *args, **kwargs):
        stream = original(self, *args, **kwargs)
        for i, item in enumerate(stream):
            seen_when.append(("yield", i))
            yield item

    StubModelRunner.generate = counting
    try:
        rng = np.random.default_rng(1)
        px = rng.standard_normal((4, 3, 42, 42)).astype(np.float32)
        clip = rng.integers(3, 200, (1, 9))
        trt.generate_ids(px, clip, np.array([[5, 1000, 7, 8]]), max_new_tokens=5, ignore_eos=True,
                         on_token=lambda t: seen_when.append(("token", t)))
    finally:
        StubModelRunner.generate = original
    kinds = [k for k, _ in seen_when]
    assert kinds == ["yield", "token"] * 5  # token i is delivered before yield i + 1 is asked for
    assert StubModelRunner.calls[-1]["end_id"] == -1  # ignore_eos: no end id


def test_bench_on_the_stubbed_tensorrt_llm_backend(engine, stubs):
    pipe = Pipeline.open(engine, backend="tensorrt-llm")
    options = BenchOptions(synthetic_frames=4, repeat=2, warmup=0, questions=2, max_new_tokens=5)
    result = bench_pipeline(pipe, options, log_line=lambda _: None, name="tensorrt-llm")
    summary = result.summary()
    first = summary["first_question"]
    assert {"prefill", "decode", "vision", "text", "pool"} <= set(first["stages_ms"])
    assert first["decode_ms_per_token"]["median"] > 0 and first["tokens_per_s"] > 0
    ttft = first["time_to_first_token_ms"]["median"]
    assert 0 < ttft < first["end_to_end_ms"]["median"]
    assert summary["device"] == IDENTITY["gpu"]


def test_bench_summary_of_a_run_without_decode_steps():
    """The issue's crash: a run whose decode took no measurable time (or one token) has no ms/token."""
    r = BackendResult("x")
    r.first = [Run({"vision": 10.0, "text": 1.0, "pool": 1.0, "prefill": 5.0, "decode": 0.0}, 20.0, 32)]
    summary = r.summary()["first_question"]
    assert summary["tokens_per_s"] is None and summary["time_to_first_token_ms"]["median"] == 17.0


def test_tensorrt_stages_receive_named_contiguous_inputs(engine, stubs):
    trt = Pipeline.open(engine, backend="tensorrt")
    ort = Pipeline.open(engine)
    px = np.asfortranarray(np.random.default_rng(2).standard_normal((4, 3, 42, 42)).astype(np.float32))
    np.testing.assert_array_equal(trt.vision(px), ort.vision(np.ascontiguousarray(px)))
    assert trt.backend.artifact("vision")["file"] == "vision.fp16.plan"
    assert Manifest.load(engine).stage_variant("vision", "tensorrt:fp16")["gpu"] == IDENTITY["gpu"]


def test_plan_for_another_gpu_is_refused(engine, stubs, monkeypatch):
    other = types.SimpleNamespace(cudaGetDeviceProperties=lambda i: (0, types.SimpleNamespace(
        name=b"Other GPU", major=9, minor=0)))
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(cudart=other))
    with pytest.raises(BackendError, match="rebuild it here"):
        Pipeline.open(engine, backend="tensorrt")


def test_teacher_forcing_is_refused_on_a_native_decoder(engine, stubs):
    from ppllava.errors import EngineError

    trt = Pipeline.open(engine, backend="tensorrt-llm")
    with pytest.raises(EngineError, match="step decoder"):
        trt.forced_choices(np.zeros((4, 3, 42, 42), np.float32), np.ones((1, 4), np.int64),
                           np.array([[5, 1000, 7]]), [1, 2])


def test_end_and_stop_tokens_are_kept_like_every_decoder(engine, stubs):
    """An answer that ends at the end id, or at another end-of-sequence id (a stop word), ends with
    that token on TensorRT-LLM as on onnxruntime (the runner does not count the end id)."""
    from ppllava.runtime.sampling import Sampling, TokenSampler

    ort, trt = Pipeline.open(engine), Pipeline.open(engine, backend="tensorrt-llm")
    rng = np.random.default_rng(3)
    visual = rng.standard_normal((8, 64)).astype(np.float32)
    prompt = ort.prompt(np.array([[5, 1000, 7, 8]]), visual)
    greedy = TokenSampler(Sampling())
    free = ort.decoder.generate(prompt, 6, greedy, set())
    for eos in ({free[2]}, {free[2], 1}, {1, free[2]} | {free[3]}):
        want = ort.decoder.generate(prompt, 6, greedy, eos)
        streamed = []
        got = trt.decoder.generate(trt.prompt(np.array([[5, 1000, 7, 8]]), visual), 6, greedy, eos,
                                   on_token=streamed.append)
        assert got == want == streamed, (eos, got, want)
        if len(eos) > 1:
            assert StubModelRunner.calls[-1]["stops"] is not None


def test_sampling_maps_to_sampling_config_fields(engine, stubs):
    from ppllava.runtime.sampling import Sampling, TokenSampler

    trt = Pipeline.open(engine, backend="tensorrt-llm")
    prompt = trt.prompt(np.array([[5, 1000, 7]]), np.zeros((4, 64), np.float32))
    trt.decoder.generate(prompt, 2, TokenSampler(Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=11)), {2})
    assert StubModelRunner.calls[-1]["sampling"] == {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "random_seed": 11}
    trt.decoder.generate(prompt, 2, TokenSampler(Sampling(temperature=0.7)), {2})
    assert isinstance(StubModelRunner.calls[-1]["sampling"]["random_seed"], int)  # fresh, as TokenSampler(seed=None)


def test_feature_cache_keys_follow_the_artifact(engine, stubs, tmp_path):
    """Features computed by another artifact or backend are never served from the cache."""
    ort, trt = Pipeline.open(engine), Pipeline.open(engine, backend="tensorrt")
    assert ort.engine_id != trt.engine_id and trt.engine_id.endswith("vision.fp16.plan")


def test_format_1_engine_dirs_are_read_and_upgraded(engine, stubs, tmp_path):
    """Engine dirs written before format 2 (variant keys "int8" / "tensorrt-fp16" / "torch", the
    TensorRT-LLM checkpoint and engine under ``llm``) load as format 2, and the next recorded
    artifact writes the manifest back as format 2 with every old record kept."""
    old = tmp_path / "v1"
    shutil.copytree(engine, old)
    data = json.loads((old / "manifest.json").read_text())
    for stage in ("vision", "text", "pool"):
        plan = data["stages"][stage].pop("variants")["tensorrt:fp16"]
        del plan["backend"]  # format-1 records written before variant_record had no backend field
        data["stages"][stage]["variants"] = {"tensorrt-fp16": plan}
    built = data["stages"].pop("llm")["variants"]["tensorrt-llm:fp16"]
    data["llm"]["tensorrt_llm_engine"] = {"dir": built["dir"], "scheme": "int8_wo", **IDENTITY, "files": built["files"]}
    (old / "trtllm" / "int8_wo").mkdir(parents=True)
    (old / "trtllm" / "int8_wo" / "config.json").write_text("{}")
    data["llm"]["quantized"] = {"int8_wo": {"dir": "trtllm/int8_wo", "format": "tensorrt-llm checkpoint",
                                            "files": file_records(old, [old / "trtllm" / "int8_wo" / "config.json"])}}
    data["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(data))

    manifest = Manifest.load(old)
    assert manifest.data["format_version"] == 2
    assert manifest.stage_variant("vision", "tensorrt:fp16")["backend"] == "tensorrt"
    assert set(manifest.variants("llm", "tensorrt-llm")) == {"int8_wo"}
    assert set(manifest.variants("llm", "tensorrt-llm", kind="checkpoint")) == {"int8_wo"}
    assert not manifest.exported("llm") and "quantized" not in manifest.data["llm"]
    pipe = Pipeline.open(old, backend="tensorrt-llm")
    assert pipe.backend.engine_dir == old / built["dir"]
    assert len(pipe.ask(np.zeros((4, 48, 64, 3), np.uint8), "what?", max_new_tokens=3).token_ids) >= 1

    # format 1 wrote the TensorRT-LLM engine without checksums: not used (rebuild), the rest still opens
    data["llm"]["tensorrt_llm_engine"].pop("files")
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="build-engines"):
        Pipeline.open(old, backend="tensorrt-llm")
    assert Pipeline.open(old, backend="tensorrt").backend.artifact("vision")["file"] == "vision.fp16.plan"

    (old / "extra.onnx").write_bytes(b"x")
    add_variants(old, [("pool", variant_record(old, old / "extra.onnx", "onnxruntime", "int8"))])
    written = json.loads((old / "manifest.json").read_text())
    assert written["format_version"] == 2 and "tensorrt_llm_engine" not in written["llm"]
    assert set(written["stages"]["pool"]["variants"]) == {"tensorrt:fp16", "onnxruntime:int8"}
    assert set(written["stages"]["llm"]["variants"]) == {"tensorrt-llm:int8_wo:checkpoint"}
