"""The OpenAI-compatible front end (runtime/serving/openai_api.py) end to end: the official `openai`
client against FastAPI in front of the real Triton server, over loopback.

Runs in the [serve] venv (.ci/serving.sh), skipped where openai, fastapi, tritonclient, the binary
or the engine is missing. Bug classes: an answer that differs from Triton's own for the same request,
a stream whose pieces do not add up to the answer, a refusal that is not a one-line 400.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.serving
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("tritonclient.grpc")

from test_serving import (  # noqa: E402,F401
    ENGINE, MAX_NEW, QUESTION, _ask_http, _free_ports, _no_network, _require_engine, _video,
)

from ppllava.errors import PPLLaVAError  # noqa: E402

MAX_DATA = 2 * 2**20  # the sample video is 1 MiB


@pytest.fixture(scope="module")
def video():
    return _video()


@pytest.fixture(scope="module")
def server(video):
    from ppllava.runtime.serving.openai_api import OpenAIFrontEnd, OpenAIOptions
    from ppllava.runtime.serving.server import ServeOptions, TritonServer

    _require_engine()
    http_port, grpc_port, metrics_port, openai_port = _free_ports(4)
    try:
        srv = TritonServer(ServeOptions(ENGINE, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                        allow=[video.parent]))
    except PPLLaVAError as exc:  # no binary here
        pytest.skip(str(exc))
    t0 = time.monotonic()
    srv.start()
    front = OpenAIFrontEnd(OpenAIOptions(srv.endpoints["grpc"], port=openai_port, allow=[video.parent],
                                         max_data_bytes=MAX_DATA)).start()
    print(f"\nserver and front end ready in {time.monotonic() - t0:.1f} s")
    yield srv, front
    front.stop()
    srv.stop()


@pytest.fixture(scope="module")
def triton_answer(server, video):
    """What Triton's `ppllava` model answers for the same video and question."""
    return _ask_http(server[0], video=video)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server[1].url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _messages(url: str, question: str = QUESTION, kind: str = "video_url") -> list:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}]


def test_models_and_answer_match_triton(client, video, triton_answer):
    assert [m.id for m in client.models.list().data] == ["ppllava"]
    reply = client.chat.completions.create(model="ppllava", messages=_messages(video.as_uri()), max_tokens=MAX_NEW)
    text, ids = triton_answer
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == len(ids) and reply.usage.prompt_tokens > len(ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_stream_adds_up_to_the_answer(client, video, triton_answer):
    stream = client.chat.completions.create(model="ppllava", messages=_messages(video.as_uri()), max_tokens=MAX_NEW,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, ids = triton_answer
    assert "".join(pieces) == text
    assert len(pieces) >= min(3, len(ids) - 1), pieces  # pieces, not one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ids) and chunks[-1].usage.prompt_tokens > 0


def test_data_url_and_history(client, video, triton_answer):
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    reply = client.chat.completions.create(model="ppllava", messages=_messages(url), max_tokens=MAX_NEW)
    assert reply.choices[0].message.content == triton_answer[0]
    followup = [*_messages(video.as_uri()), {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="ppllava", messages=followup, max_tokens=4, temperature=0.0)
    assert second.usage.prompt_tokens > reply.usage.prompt_tokens  # the earlier turn is in the prompt


BAD = {  # messages -> the start of the one-line message
    "remote URL": (lambda v: _messages("https://example.com/clip.mp4"), "remote URLs are not fetched"),
    "outside the allow-list": (lambda v: _messages("file:///etc/hostname"), "video: the path is outside"),
    "oversized data URL": (lambda v: _messages("data:video/mp4;base64," + "A" * (3 * MAX_DATA)), "data: URL of about"),
    "empty question": (lambda v: _messages(v.as_uri(), "   "), "question: empty"),
    "two videos": (lambda v: [*_messages(v.as_uri()), {"role": "assistant", "content": "a"},
                              *_messages(v.as_uri())], "send exactly one video"),
    "no video": (lambda v: [{"role": "user", "content": "hi"}], "send exactly one video"),
    "undecodable upload": (lambda v: _messages("data:video/mp4;base64," + base64.b64encode(b"not a video" * 9).decode()),
                           "video_bytes"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_refusals_are_one_line_400s(client, video, server, name):
    make, start = BAD[name]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            reply = client.chat.completions.create(model="ppllava", messages=make(video), max_tokens=MAX_NEW,
                                                   stream=stream)
            list(reply) if stream else None
        error = caught.value.body
        assert caught.value.status_code == 400 and error["type"] == "invalid_request_error", error
        assert error["message"].startswith(start), (name, error["message"])
        assert "\n" not in error["message"] and str(server[0].workdir) not in error["message"]


def test_serve_cli_starts_and_stops_the_front_end(video):
    """`ppllava serve --openai-port P`: prints the endpoint, answers, Ctrl-C stops both."""
    _require_engine()
    http_port, grpc_port, metrics_port, openai_port = _free_ports(4)
    proc = subprocess.Popen([sys.executable, "-m", "ppllava.cli", "serve", str(ENGINE), "--allow", str(video.parent),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics_port), "--openai-port", str(openai_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not any(line.startswith("models") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = f"http://127.0.0.1:{openai_port}/v1"
        assert any(line.startswith(f"openai   {url}") for line in lines), lines
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c:
            reply = c.chat.completions.create(model="ppllava", messages=_messages(video.as_uri()), max_tokens=2)
        assert reply.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_ask_against_the_server(server, video, triton_answer):
    """`ppllava ask URL VIDEO QUESTION`: the CLI as a client, streaming, same answer as Triton's."""
    import subprocess
    import sys

    url = server[1].url
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", url, str(video), QUESTION, "--max-new-tokens",
                        str(MAX_NEW), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    result = json.loads(r.stdout)
    assert result["answer"] == triton_answer[0].strip() and result["usage"]["completion_tokens"] >= 1
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", url, str(video), "<image>?"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    closed = f"http://127.0.0.1:{_free_ports(1)[0]}"
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", closed, str(video), QUESTION], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr and len(r.stderr.strip().splitlines()) == 1
