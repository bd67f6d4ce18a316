"""Shared fixtures: tiny checkpoints built here (no downloads), and no network for any test."""

from __future__ import annotations

import socket

import pytest


_SESSION_CACHE = None


def pytest_configure(config):
    """Per-user state (the CLI's persistent feature cache, the verified-files memo) and Inductor's
    compile cache (AOTInductor stages) go to a fresh directory per test session, never the user's
    ~/.cache or a /tmp/torchinductor_<user> that grows with every run; subprocesses inherit it, and
    it is removed when the session ends."""
    import os
    import tempfile

    global _SESSION_CACHE
    _SESSION_CACHE = tempfile.mkdtemp(prefix="ppllava-test-cache-")
    os.environ["PPLLAVA_CACHE_DIR"] = _SESSION_CACHE
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "inductor")


def pytest_unconfigure(config):
    import shutil

    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network connection fails the test: tests never download anything."""

    def guard(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint per variant, written once per test session."""
    from ppllava.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {v: make_tiny(root / v, v, seed=0) for v in ("vicuna", "qwen")}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    from ppllava import PPLLaVA

    return {v: PPLLaVA.from_pretrained(d) for v, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def tiny_engine(tiny_dirs, tmp_path_factory):
    """``tiny_engine(variant)``: that tiny checkpoint exported once per session (default options).
    Shared: tests that change an engine dir work on a copy."""
    from ppllava.export.engine import ExportOptions, export_engine

    built = {}

    def get(variant: str):
        if variant not in built:
            out = tmp_path_factory.mktemp(f"engine-{variant}") / "engine"
            export_engine(ExportOptions(tiny_dirs[variant], out), report=lambda _: None)
            built[variant] = out
        return built[variant]

    return get
