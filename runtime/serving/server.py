"""``ppllava serve``: Triton Inference Server on a generated repository, started, watched, stopped.

The binary is the one in the ``nvidia-pytriton`` wheel of this interpreter (``pip install
'ppllava[serve]'``), else ``tritonserver`` on PATH. The python backend's stub embeds a libpython, so
it must be the stub for this interpreter's version, with this interpreter's own lib dir first on
``LD_LIBRARY_PATH`` (a pyenv build otherwise picks up another libpython3.X and fails inside
threading). Everything the server writes (repository, backends dir, shared-memory regions under a
private prefix) is removed on stop, also when the server had to be killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ppllava.errors import PPLLaVAError
from ppllava.runtime.serving.openai_api import MAX_DATA_BYTES
from ppllava.runtime.serving.repository import RepoOptions, write_repository

log = logging.getLogger(__name__)
INSTALL = "pip install 'ppllava[serve]'"
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"  # KServe v2; deploy/k8s probes these


@dataclass
class ServeOptions:
    engine_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch: int = 4
    threads: int | None = None
    queue_delay_us: int = RepoOptions.queue_delay_us
    allow: list[Path] = field(default_factory=list)
    ready_timeout: float = 120.0
    openai_port: int = 8080  # the OpenAI-compatible front end (openai_api.py); 0: none
    max_data_bytes: int = MAX_DATA_BYTES  # the largest data: URL it takes


@dataclass
class Binary:
    tritonserver: Path
    python_backend: Path  # the dir holding libtriton_python.so
    stub: Path | None  # the stub for this interpreter (None: the backend dir already has one)
    libs: list[Path]


def find_binary() -> Binary:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent / "tritonserver"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if (root / "bin" / "tritonserver").is_file():
            if not stub.is_file():
                raise PPLLaVAError(f"nvidia-pytriton has no python-backend stub for Python {version}; "
                                   "serve from Python 3.8-3.13")
            libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
            return Binary(root / "bin" / "tritonserver", root / "backends" / "python", stub, [libs])
    found = shutil.which("tritonserver")
    if found:  # a container or system install: its own backends dir sits next to it
        home = Path(found).resolve().parent.parent
        return Binary(Path(found), home / "backends" / "python", None, [])
    raise PPLLaVAError(f"no Triton Inference Server here (neither nvidia-pytriton nor tritonserver on PATH): {INSTALL}")


def _environment(binary: Binary) -> dict:
    env = dict(os.environ)
    own = [sysconfig.get_config_var("LIBDIR") or ""]
    paths = [p for p in [*own, *map(str, binary.libs), env.get("LD_LIBRARY_PATH", "")] if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    # The stub's embedded interpreter runs isolated (PYTHONPATH is ignored) and takes its
    # sys.executable from `python3` on PATH: this interpreter's bin dir first makes that a venv's
    # python, so its pyvenv.cfg puts the venv's site-packages (numpy < 2, ppllava) on the stub's path
    # instead of the base interpreter's (which may hold numpy 2: the 2.51 stub then crashes on BYTES).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def site_dirs() -> list[str]:
    import site

    return [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]


class TritonServer:
    """A running server; ``stop()`` (or the context manager) ends it and removes its files."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.binary = find_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="ppllava-serve-"))
        self.shm_prefix = f"triton_python_backend_shm_ppllava{os.getpid()}_"
        self.process: subprocess.Popen | None = None
        try:
            self.repository = write_repository(RepoOptions(
                options.engine_dir, self.workdir / "models", options.instances, options.max_batch,
                allow=options.allow, threads=options.threads, queue_delay_us=options.queue_delay_us,
                site_dirs=site_dirs()))
            self.backends = self._backends()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _backends(self) -> Path:
        target = self.workdir / "backends" / "python"
        shutil.copytree(self.binary.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
        if self.binary.stub is not None:
            shutil.copy2(self.binary.stub, target / "triton_python_backend_stub")
        return target.parent

    def command(self) -> list[str]:
        o = self.options
        return [str(self.binary.tritonserver), "--model-repository", str(self.repository),
                "--backend-directory", str(self.backends), "--exit-on-error=true", "--strict-readiness=true",
                "--http-address", o.host, "--http-port", str(o.http_port),
                "--grpc-address", o.host, "--grpc-port", str(o.grpc_port),
                "--metrics-address", o.host, "--metrics-port", str(o.metrics_port),
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--log-verbose=0"]

    @property
    def endpoints(self) -> dict:
        o = self.options
        return {"http": f"http://{o.host}:{o.http_port}", "grpc": f"{o.host}:{o.grpc_port}",
                "metrics": f"http://{o.host}:{o.metrics_port}/metrics"}

    def start(self) -> "TritonServer":
        env = _environment(self.binary)
        env["TMPDIR"] = str(self.workdir)  # the models' upload dirs go away with it, even after a crash
        self.process = subprocess.Popen(self.command(), env=env, cwd=self.workdir,
                                        start_new_session=True)  # Ctrl-C reaches us; we stop it in order
        deadline = time.monotonic() + self.options.ready_timeout
        url = self.endpoints["http"] + READY_PATH
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise PPLLaVAError(f"tritonserver exited with status {code} while loading the models (its log is above)")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise PPLLaVAError(f"tritonserver was not ready after {self.options.ready_timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (Triton finishes the requests in flight, then unloads), SIGKILL after ``timeout``;
        then the temp dir and any shared-memory region under this server's prefix are removed."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %.0f s; killing it", timeout)
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            if process is not None:
                try:  # stubs left behind by a killed server share its session
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
                region.unlink(missing_ok=True)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(options: ServeOptions, announce=print) -> int:
    """Run until SIGINT/SIGTERM, then stop cleanly. ``announce`` receives the endpoint lines."""
    stopping = []

    def handler(signum, frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(options)
    front = None
    try:
        server.start()
        if options.openai_port:
            from ppllava.runtime.serving.openai_api import OpenAIFrontEnd, OpenAIOptions

            local = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host  # a wildcard bind
            front = OpenAIFrontEnd(OpenAIOptions(f"{local}:{options.grpc_port}", options.host,
                                                 options.openai_port, options.allow, options.max_data_bytes)).start()
        for name, url in server.endpoints.items():
            announce(f"{name:8s} {url}")
        if front is not None:
            announce(f"openai   {front.url} (POST /v1/chat/completions, GET /v1/models)")
        announce("models   ppllava (request/response), ppllava_stream (decoupled); Ctrl-C stops")
        while not stopping and server.process.poll() is None:
            time.sleep(0.2)
        if not stopping:
            raise PPLLaVAError(f"tritonserver exited unexpectedly with status {server.process.returncode}")
        return 0
    finally:
        if front is not None:  # first: its requests in flight still need Triton
            front.stop()
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
