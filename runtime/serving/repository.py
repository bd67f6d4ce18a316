"""``ppllava triton-repo``: a standard Triton model repository over one engine dir.

Two python-backend models, both ``1/model.py`` = ``triton_model.py``:
- ``ppllava``: request/response, ``instances`` instances (KIND_CPU), dynamic batching over requests;
- ``ppllava_stream``: decoupled, streams text pieces.
The engine dir and the allow-list travel as config parameters, so NVIDIA's tritonserver containers
load the same repository (mount the engine and the allowed dirs at the same paths).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ppllava.errors import InputError, require_writable
from ppllava.runtime.serving.request import INPUTS, OUTPUTS, STREAM_OUTPUTS

MODEL = "ppllava"
STREAM_MODEL = "ppllava_stream"


@dataclass
class RepoOptions:
    engine_dir: Path
    out: Path
    instances: int = 1
    max_batch: int = 4
    backend: str = "onnxruntime"
    allow: list[Path] = field(default_factory=list)
    threads: int | None = None  # intra-op threads per stage, per instance
    queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    site_dirs: list[str] = field(default_factory=list)  # set by `ppllava serve` only
    force: bool = False

    def check(self) -> None:
        from ppllava.runtime.backends import BackendOptions, get_backend
        from ppllava.runtime.manifest import Manifest

        get_backend(self.backend)  # an unknown name is refused here
        BackendOptions(threads=self.threads)  # the one threads check the API and the CLI share
        if self.instances < 1:
            raise InputError(f"--instances must be >= 1, got {self.instances}")
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.queue_delay_us < 0:
            raise InputError(f"--queue-delay-us must be >= 0, got {self.queue_delay_us}")
        # schema, paths and checksums now, in one line, not later in a model's initialize inside the server's log
        Manifest.load(self.engine_dir)
        for directory in self.allow:
            if not directory.is_dir():
                raise InputError(f"--allow {directory}: not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not self.force:
            raise InputError(f"{self.out} exists and is not empty; choose another --out or pass --force")


def _tensor(name: str, data_type: str, dims: str, optional: bool = False) -> str:
    extra = "\n    optional: true" if optional else ""
    return f"  {{\n    name: \"{name}\"\n    data_type: {data_type}\n    dims: {dims}{extra}\n  }}"


def model_config(name: str, options: RepoOptions, decoupled: bool) -> str:
    parameters = {
        "engine_dir": str(options.engine_dir.resolve()),
        "backend": options.backend,
        "allow": json.dumps([str(d.resolve()) for d in options.allow]),
    }
    if options.threads is not None:
        parameters["threads"] = str(options.threads)
    if options.site_dirs:
        parameters["site_dirs"] = json.dumps(options.site_dirs)
    inputs = ",\n".join(_tensor(n, t, "[ 1 ]", opt) for n, (t, opt) in INPUTS.items())
    outputs = ",\n".join(_tensor(n, t, d) for n, (t, d) in (STREAM_OUTPUTS if decoupled else OUTPUTS).items())
    params = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                       for k, v in parameters.items())
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    # Requests are batched by count (each is one question, shape [1, 1]): a batch is answered by one
    # instance, the requests side by side, each with its own response or error.
    # The stream model keeps one instance: its requests run on threads over one Pipeline.
    instances = 1 if decoupled else options.instances
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {options.max_batch}\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} }}\n{policy}"
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n{params}\n")


def write_repository(options: RepoOptions) -> Path:
    """Write the repository (through a temp dir next to it, then a rename); returns its path."""
    options.check()
    require_writable(options.out, "--out")
    source = Path(__file__).with_name("triton_model.py")
    staging = options.out.with_name(options.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name, decoupled in ((MODEL, False), (STREAM_MODEL, True)):
        (staging / name / "1").mkdir(parents=True)
        (staging / name / "config.pbtxt").write_text(model_config(name, options, decoupled))
        shutil.copyfile(source, staging / name / "1" / "model.py")
    if options.out.exists():
        shutil.rmtree(options.out)
    staging.rename(options.out)
    return options.out
