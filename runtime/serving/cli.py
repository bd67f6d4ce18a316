"""``ppllava triton-repo`` and ``ppllava serve``: parse into the options objects, call one function."""

from __future__ import annotations

from pathlib import Path


def cmd_triton_repo(args) -> int:
    from ppllava.runtime.serving.repository import RepoOptions, write_repository

    out = write_repository(RepoOptions(args.engine_dir, args.out, args.instances, args.max_batch, args.backend,
                                       args.allow, args.threads, args.queue_delay_us, force=args.force))
    print(f"wrote {out} (models ppllava, ppllava_stream); run it with: "
          f"tritonserver --model-repository {out}")
    return 0


def cmd_serve(args) -> int:
    from ppllava.runtime.serving.server import ServeOptions, serve

    return serve(ServeOptions(args.engine_dir, args.host, args.http_port, args.grpc_port, args.metrics_port,
                              args.instances, args.max_batch, args.threads, args.queue_delay_us, args.allow,
                              openai_port=args.openai_port, max_data_bytes=args.max_data_mib * 2**20),
                 announce=lambda line: print(line, flush=True))


def _model_options(p) -> None:
    from ppllava.runtime.serving.repository import RepoOptions

    p.add_argument("engine_dir", type=Path)
    p.add_argument("--instances", type=int, default=RepoOptions.instances, help="model instances (one Pipeline each)")
    p.add_argument("--max-batch", type=int, default=RepoOptions.max_batch, help="requests per dynamic batch")
    p.add_argument("--threads", type=int, help="intra-op threads per stage, per instance")
    p.add_argument("--queue-delay-us", type=int, default=RepoOptions.queue_delay_us,
                   help="how long the dynamic batcher waits to fill a batch (microseconds)")
    p.add_argument("--allow", type=Path, action="append", default=[], metavar="DIR",
                   help="a directory whose files clients may name as `video` (repeatable; uploads always work)")


def add_parsers(sub) -> None:
    from ppllava.runtime.serving.server import ServeOptions

    p = sub.add_parser("triton-repo", help="write a Triton model repository (python backend) over an engine dir")
    _model_options(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=cmd_triton_repo)

    p = sub.add_parser("serve", help="serve an engine dir on Triton Inference Server (HTTP/gRPC, KServe v2)")
    _model_options(p)
    p.add_argument("--host", default=ServeOptions.host, help="address to bind (default loopback only)")
    p.add_argument("--http-port", type=int, default=ServeOptions.http_port)
    p.add_argument("--grpc-port", type=int, default=ServeOptions.grpc_port)
    p.add_argument("--metrics-port", type=int, default=ServeOptions.metrics_port)
    p.add_argument("--openai-port", type=int, default=ServeOptions.openai_port,
                   help="port of the OpenAI-compatible /v1/chat/completions front end (0: off)")
    p.add_argument("--max-data-mib", type=int, default=ServeOptions.max_data_bytes // 2**20, metavar="MIB",
                   help="the largest data: URL the OpenAI front end takes")
    p.set_defaults(handler=cmd_serve)
