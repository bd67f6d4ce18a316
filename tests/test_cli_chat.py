"""The CLI a person lives in: chat that forgives, commands that say what they need up front."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from ppllava.cli import main


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("qwen")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatvideo") / "v.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(20):
        writer.write(np.full((48, 64, 3), i * 12 % 255, np.uint8))
    writer.release()
    return path


def _chat(engine, video, stdin: str, *extra):
    return subprocess.run([sys.executable, "-m", "ppllava.cli", "chat", str(engine), str(video), "--max-new-tokens", "4",
                           "--no-cache", *extra], input=stdin, capture_output=True, text=True, timeout=300)


def test_chat_forgives_empty_lines_and_bad_questions(engine, video):
    # an empty line, then a refused first question, then two real ones, then Ctrl-D (end of input)
    r = _chat(engine, video, "\n<image> what?\nWhat happens?\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ppllava> ") == 3  # the refused one, and both real questions answered
    assert "must not contain '<image>'" in r.stderr and "Traceback" not in r.stderr
    assert "[context " in r.stderr and "/256 tokens, 2 turns]" in r.stderr  # how full the context is
    assert r.stderr.endswith("\n")  # Ctrl-D leaves the terminal on a fresh line


def test_chat_checks_the_video_before_the_first_question(engine, tmp_path):
    r = _chat(engine, tmp_path / "missing.mp4", "What happens?\n")
    assert r.returncode == 2 and "you>" not in r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    r = _chat(engine, text, "What happens?\n")
    assert r.returncode == 2 and "ppllava>" not in r.stdout and len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_the_answer_not_the_session(engine, video, monkeypatch, capsys):
    from ppllava.runtime.pipeline import Pipeline

    questions = iter(["Tell me everything.", "What happens?"])

    def fake_input(prompt):
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    original = Pipeline.ask_stream
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(list(kwargs.get("history")))
        stream = original(self, *args, **kwargs)
        if len(calls) == 1:  # the first answer: Ctrl-C arrives after its first piece
            yield next(stream)
            stream.close()
            raise KeyboardInterrupt
        yield from stream

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(Pipeline, "ask_stream", interrupted_once)
    assert main(["chat", str(engine), str(video), "--max-new-tokens", "4", "--no-cache"]) == 0
    err = capsys.readouterr().err
    assert "(answer stopped; not kept in the history)" in err
    assert len(calls) == 2 and calls[1] == []  # the session went on; the stopped answer is not history
    assert "1 turns]" in err


@pytest.mark.parametrize("argv", [
    ["make-tiny", "{tmp}/t"], ["reference", "{tmp}/ckpt"], ["export", "{tmp}/ckpt", "--out", "{tmp}/e"],
    ["verify", "{tmp}/e", "--checkpoint", "{tmp}/ckpt"], ["bench", "--random-weights", "small"],
    ["bench", "{engine}", "--compare", "torch"], ["ask", "{engine}", "{video}", "hi", "--reference", "{tmp}/ckpt"],
])
def test_commands_that_need_torch_say_so_before_any_work(argv, engine, video, tmp_path):
    argv = [a.format(tmp=tmp_path, engine=engine, video=video) for a in argv]
    code = "import sys; sys.modules['torch'] = None; from ppllava.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"ppllava {argv[0]}: error: this command needs torch, not installed "
                                             f"here: pip install 'ppllava[export]'"]
    assert r.stdout == "" and not list(tmp_path.iterdir())  # nothing streamed, nothing written


def test_broken_pipe_is_quiet(engine, video):
    r = subprocess.run(f"{sys.executable} -m ppllava.cli ask {engine} {video} 'What happens?' --no-cache "
                       f"--max-new-tokens 200 | head -c 1", shell=True, capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr


def test_help_is_for_users():
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "--help"], capture_output=True, text=True)
    assert "Export PPLLaVA video-LLM checkpoints" in r.stdout and "Parses arguments" not in r.stdout


def _ask(*argv):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", *map(str, argv)], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip().splitlines()


def test_smaller_cli_points(engine, video, tmp_path):
    import json

    from ppllava.calibration.dataset import list_videos
    from ppllava.errors import InputError

    # calibrate --videos one.mp4 is one video; a binary non-video is one clear line
    assert list_videos(video) == [video]
    blob = tmp_path / "list.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="neither a video .* nor a text list"):
        list_videos(blob)
    # input checks that need no engine come before loading it
    code, err = _ask("ask", tmp_path / "no-engine", video, "<image>?")
    assert code == 2 and len(err) == 1 and "<image>" in err[0]
    # --frames below what the pooling plan needs: said in the user's terms, before decoding
    code, err = _ask("ask", engine, video, "What?", "--frames", "1", "--no-cache")
    assert code == 2 and len(err) == 1 and "--frames asks for 1 frame(s); this engine's pooling plan needs at least 2" in err[0]
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.full((48, 64, 3), 90, np.uint8))
    code, err = _ask("ask", engine, image, "What?", "--tokens", "1", "--no-cache")
    assert code == 2 and "--tokens must be >= 2 for an image" in err[0]
    # a budget above what the frames give is lowered with a word, not silently
    code, err = _ask("ask", engine, video, "What?", "--frames", "2", "--tokens", "100", "--max-new-tokens", "2", "--no-cache")
    assert code == 0 and any("give at most" in line for line in err)
    # the manifest records no build-machine paths for the tokenizers
    data = json.loads((engine / "manifest.json").read_text())
    assert "/" not in data["alignment"]["tokenizer_source"] and "/" not in (data["llm"]["tokenizer_source"] or "")
    # a destination that cannot be written is refused before any work
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _ask("export", tmp_path / "missing-ckpt", "--out", blocker / "engine")
    assert code == 2 and len(err) == 1 and "not writable" in err[0]


def test_ask_a_server_that_is_not_there_is_one_line(video):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = _ask("ask", f"http://127.0.0.1:{port}", video, "What happens?")
    assert code == 2 and len(err) == 1 and "cannot reach" in err[0]
    code, err = _ask("chat", f"http://127.0.0.1:{port}", video)
    assert code == 2 and len(err) == 1 and "ppllava ask URL" in err[0]
