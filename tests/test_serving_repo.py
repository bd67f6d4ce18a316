"""The serving pieces that need no Triton: request checks, the generated repository, the CLI's
one-line refusal when the binary is missing. (End to end on the real server: test_serving.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppllava.errors import InputError, PPLLaVAError
from ppllava.runtime.serving.request import client_message, parse_request


def _b(value):
    return np.array([[value]], dtype=np.object_)


def test_request_rules(tmp_path):
    """Bug class: a request that reaches the pipeline with a path outside the allow-list, or an
    error message that tells the client where the server keeps its files."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    allow = [tmp_path.resolve()]
    parsed = parse_request({"question": _b(b" hi "), "video": _b(str(video).encode()),
                            "max_new_tokens": np.array([[5]], np.int32), "temperature": np.array([[0.5]], np.float32),
                            "history": _b(b'[["q", "a"]]')}, allow)
    assert parsed.question == "hi" and parsed.video == video.resolve()
    assert parsed.options["max_new_tokens"] == 5 and parsed.options["sampling"].temperature == 0.5
    assert parsed.options["history"] == [("q", "a")]
    (tmp_path / "link.mp4").symlink_to("/etc/hostname")
    cases = {
        "question: empty": {"question": _b(b"  "), "video": _b(str(video).encode())},
        "video: no such file": {"question": _b(b"q"), "video": _b(str(tmp_path / "nope.mp4").encode())},
        "video: the path is outside": {"question": _b(b"q"), "video": _b(str(tmp_path / "link.mp4").encode())},
        "send exactly one": {"question": _b(b"q"), "video": _b(b"a"), "video_bytes": _b(b"b")},
        "video_bytes: empty": {"question": _b(b"q"), "video_bytes": _b(b"")},
        "history: expected": {"question": _b(b"q"), "video_bytes": _b(b"v"), "history": _b(b'{"a": 1}')},
        "temperature must be": {"question": _b(b"q"), "video_bytes": _b(b"v"), "temperature": np.array([[-1.0]], np.float32)},
        "question: send one value": {"question": np.array([[b"a", b"b"]], dtype=np.object_), "video_bytes": _b(b"v")},
        "unknown input": {"question": _b(b"q"), "video_bytes": _b(b"v"), "bogus": _b(b"1")},
    }
    for start, inputs in cases.items():
        with pytest.raises(InputError) as caught:
            parse_request(inputs, allow)
        assert str(caught.value).startswith(start), (start, str(caught.value))
        assert str(tmp_path) not in str(caught.value)


def test_upload_is_private_and_removed(tmp_path):
    parsed = parse_request({"question": _b(b"q"), "video_bytes": _b(b"content")}, [])
    with parsed.video_file(tmp_path) as path:
        assert path.read_bytes() == b"content" and path.stat().st_mode & 0o077 == 0
        message = client_message(InputError(f"{path} has no decodable frames\n(more)"), parsed, path)
    assert not path.exists() and message == "video_bytes has no decodable frames (more)"


def test_repository(tmp_path, tiny_engine):
    from ppllava.errors import EngineError
    from ppllava.runtime.serving.repository import RepoOptions, write_repository

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text("{}")
    with pytest.raises(EngineError, match="not a ppllava engine manifest"):  # refused here, not in the server's log
        write_repository(RepoOptions(fake, tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()
    engine = tiny_engine("vicuna")
    out = write_repository(RepoOptions(engine, tmp_path / "repo", instances=3, max_batch=6, allow=[tmp_path]))
    plain = (out / "ppllava" / "config.pbtxt").read_text()
    stream = (out / "ppllava_stream" / "config.pbtxt").read_text()
    assert "count: 3 kind: KIND_CPU" in plain and "max_batch_size: 6" in plain and "decoupled" not in plain
    assert "decoupled: true" in stream and 'name: "text"' in stream
    assert plain.count("optional: true") == 11  # all but the question
    assert json.dumps(str(engine.resolve())) in plain
    assert (out / "ppllava" / "1" / "model.py").read_text().startswith('"""The Triton python-backend model')
    with pytest.raises(InputError, match="not empty"):
        write_repository(RepoOptions(engine, out))
    with pytest.raises(InputError, match="--instances"):
        write_repository(RepoOptions(engine, tmp_path / "other", instances=0))
    with pytest.raises(InputError, match="threads must be an integer >= 1"):
        write_repository(RepoOptions(engine, tmp_path / "other", threads=0))


def test_serve_without_binary_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    from ppllava.cli import main
    from ppllava.runtime.serving import server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    with pytest.raises(PPLLaVAError, match=r"pip install 'ppllava\[serve\]'"):
        server.find_binary()
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'ppllava[serve]'" in err


def test_k8s_manifest_matches_serve():
    """Bug class: a deployment whose probes, ports or flags drifted from what `ppllava serve` does."""
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from ppllava.cli import build_parser
    from ppllava.runtime.serving.server import LIVE_PATH, READY_PATH, ServeOptions

    path = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "ppllava.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert container["command"] == ["ppllava"] and args.command == "serve"
    assert str(args.engine_dir) == "/engine" and [str(a) for a in args.allow] == ["/videos"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/engine", "/videos"} <= mounts
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "openai": args.openai_port}
    assert (args.http_port, args.grpc_port, args.metrics_port, args.openai_port) == (
        ServeOptions.http_port, ServeOptions.grpc_port, ServeOptions.metrics_port, ServeOptions.openai_port)
    assert container["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    assert docs["Deployment"]["spec"]["replicas"] == 2 and container["resources"]["requests"]
    service = {p["name"]: (p["port"], p["targetPort"]) for p in docs["Service"]["spec"]["ports"]}
    assert service == {name: (port, name) for name, port in ports.items()}
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
