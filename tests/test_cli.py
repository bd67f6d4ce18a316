"""The command line: one clear line and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ppllava import __version__
from ppllava.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ppllava.cli", *map(str, args)], capture_output=True, text=True)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ppllava {__version__}"


@pytest.mark.parametrize("variant,tokens", [("vicuna", {"8 frames": 16}), ("qwen", {"8 frames": 16, "16 frames": 32, "32 frames": 64})])
def test_info(tiny_dirs, capsys, variant, tokens):
    assert main(["info", str(tiny_dirs[variant]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == variant and info["keys_checked"]
    for budget, count in tokens.items():
        assert info["tokens"][budget] == count
    assert info["tokens"]["image"] == 5
    assert main(["info", str(tiny_dirs[variant])]) == 0
    table = capsys.readouterr().out
    assert f"variant      {variant}" in table and "8 frames" in table and "32 frames" in table


def _broken(tmp_path, kind):
    from ppllava.tiny import make_tiny, tiny_configs, write_checkpoint

    if kind == "missing shard":
        config, alignment = tiny_configs("vicuna")
        path = write_checkpoint(tmp_path / "c", config, alignment, shards=2)
        (path / "model-00001-of-00002.safetensors").unlink()
        return path, "missing: model-00001-of-00002.safetensors"
    path = make_tiny(tmp_path / "c", "vicuna")
    if kind == "wrong key":
        from safetensors.torch import load_file, save_file

        state = load_file(str(path / "model.safetensors"))
        state["language_model.model.norm.wieght"] = state.pop("language_model.model.norm.weight")
        save_file(state, str(path / "model.safetensors"))
        return path, "language_model.model.norm.weight"
    if kind == "bad config":
        (path / "config.json").write_text('{"pooling": "avp", "model_type": "llava_next"}')
        return path, "pooling='avp' is not supported"
    if kind == "not a checkpoint":
        return tmp_path / "nowhere", "no config.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "wrong key", "bad config", "not a checkpoint"])
@pytest.mark.parametrize("command", ["info", "reference"])
def test_broken_checkpoint_is_one_clear_line(tmp_path, kind, command):
    path, expected = _broken(tmp_path, kind)
    r = run_cli(command, path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_make_tiny_does_not_overwrite(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["make-tiny", str(target)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "keep me"
    assert main(["make-tiny", str(tmp_path / "new"), "--variant", "qwen", "--seed", "3"]) == 0
    assert (tmp_path / "new" / "siglip_tiny" / "config.json").is_file()


def test_reference_answer(tiny_dirs, capsys):
    assert main(["reference", str(tiny_dirs["qwen"]), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens" in out and "answer token ids: [" in out


@pytest.mark.parametrize(
    "change",
    [
        {"frame_shape": "abc"}, {"vision_config": [1]}, {"text_config": "x"}, {"pooling_temp": "hot"},
        {"image_token_index": None}, {"max_T": None}, {"btadapter_depth": None}, {"pad_token_id": "a"},
        {"vision_feature_layer": [-2]}, {"projector_hidden_act": "no_such_act"}, {"clip_weight": 5},
        {"vision_config": {"model_type": "clip_vision_model", "hidden_size": 30, "image_size": 42, "patch_size": 7,
                           "num_attention_heads": 4, "num_hidden_layers": 4, "intermediate_size": 64}},
    ],
)
def test_malformed_config_fields_are_one_line(tmp_path, change):
    from ppllava.tiny import make_tiny

    path = make_tiny(tmp_path / "c", "vicuna")
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    r = run_cli("info", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["reference", "{ckpt}", "--max-new-tokens", "-3"], "must be >= 1"),
        (["reference", "{ckpt}", "--frames", "100"], "max_T"),
        (["make-tiny", "/proc/no/such/dir"], "No such file"),
        (["make-tiny", "{file}"], "not a directory"),
    ],
)
def test_bad_arguments_are_one_line(tiny_dirs, tmp_path, args, expected):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli(*[a.format(ckpt=tiny_dirs["vicuna"], file=afile) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr and expected in r.stderr, r.stderr


def test_info_without_torch(tiny_dirs):
    # The light core (no torch) still describes a safetensors checkpoint; it says the keys were not checked.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None;"
        "import importlib.util; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda n, *a: None if n in ('torch', 'transformers') else real(n, *a);"
        f"from ppllava.cli import main; sys.exit(main(['info', {str(tiny_dirs['qwen'])!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "keys not checked" in r.stdout and "variant      qwen" in r.stdout
