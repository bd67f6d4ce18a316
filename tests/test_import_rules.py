"""ARCHITECTURE.md's import rules. Guards against torch leaking into the edge runtime and against
the reference depending on the code that wraps it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Sanctioned lazy exceptions, each behind an explicit option: `ask --reference` runs the PyTorch
# reference on the runtime's decoded frames; `bench --compare torch` and `bench --random-weights`
# call the export side (torch) for the baseline and for building engines.
ALLOWED_LAZY = {
    ("runtime/cli.py", "_compare_with_reference"),
    ("runtime/cli.py", "_near_tie"),  # part of `ask --reference`: the reference's rounding bound
    ("runtime/cli.py", "_random_engine"),
    ("runtime/cli.py", "_torch_baseline"),
    ("runtime/backends/tensorrt_llm.py", "generate"),  # TensorRT-LLM's own runtime is torch-based
}
# The torch backend is the one runtime module whose library is torch (and transformers for the
# LLM); it imports them only inside functions, so importing the module does not import torch.
TORCH_BACKEND = "runtime/backends/pytorch.py"


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """file -> every module it imports (top level or inside functions, except ALLOWED_LAZY)."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (rel, node.name) in ALLOWED_LAZY:
                node.body = []  # its imports are the sanctioned exception
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        found[rel] = names
    return found


# Torch-free modules of the ppllava package that the runtime may share: the command dispatcher,
# errors, the window-plan arithmetic and where per-user state lives.
SHARED = {"__init__", "errors", "plan", "cli", "paths"}


def test_reference_imports_no_wrapper():
    for path, names in imported_modules(ROOT / "ppllava").items():
        if path == "ppllava/cli.py":
            continue  # the dispatcher registers every package's subcommands (lazily)
        bad = {n for n in names if n.split(".")[:2] in (["ppllava", "export"], ["ppllava", "runtime"], ["ppllava", "calibration"])}
        assert not bad, f"{path} imports {bad}"


def test_runtime_imports_neither_torch_nor_reference():
    reference = {p.stem for p in (ROOT / "ppllava").glob("*.py")} - SHARED
    for path, names in imported_modules(ROOT / "runtime").items():
        torch_ok = ("torch", "transformers") if path == TORCH_BACKEND else ()
        bad = {
            n for n in names
            if (n.split(".")[0] in ("torch", "transformers", "onnxscript") and n.split(".")[0] not in torch_ok)
            or n.startswith(("safetensors.torch", "ppllava.export", "ppllava.calibration"))
            or (n.startswith("ppllava.") and n.split(".")[1] in reference)
        }
        assert not bad, f"{path} imports {bad}"


def test_importing_package_and_runtime_does_not_import_torch():
    code = (
        "import sys, ppllava, ppllava.runtime, ppllava.cli, ppllava.config, ppllava.plan;"
        "import ppllava.runtime.pipeline, ppllava.runtime.manifest, ppllava.export.cli; ppllava.cli.build_parser();"
        "import ppllava.runtime.backends.pytorch;"
        "assert 'torch' not in sys.modules, 'torch was imported';"
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_version_without_torch():
    # A runtime-only install has no torch: the CLI itself must still start.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None;"
        "from ppllava.cli import main; sys.exit(main(['--version']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ppllava" in r.stdout, r.stderr


def test_torch_backend_imports_torch_only_inside_functions():
    tree = ast.parse((ROOT / TORCH_BACKEND).read_text())
    top = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & {"torch", "transformers"}, top
