"""Command line: ``infercore serve``, ``infercore models list``, ``infercore models verify PATH``,
``infercore models import SRC DEST``, ``infercore models export-onnx PATH [--quantize int8]``.

Every ``serve`` flag can also be set through the environment as ``INFERCORE_<FLAG>`` (for example
``INFERCORE_API_KEY``, which keeps the key out of the process list); a flag on the command line wins.
"""

from __future__ import annotations

import os

# Before anything imports torch: idle OpenMP workers sleep instead of spinning. With spinning
# workers, a CPU server that shares its cores (with its own event loop, tokenizers, or any other
# process) runs 10-30x slower (bench: benchmarks/bench_cpu_threads.py); with nothing else running
# the cost of sleeping is within noise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import sys
from pathlib import Path

from ..models.checkpoint import CheckpointError
from ..models.repository import parse_model_arg, resolve_sources
from .config import ServerConfig

DEVICES_HELP = (
    "where models run: auto (default: every visible GPU, else the CPU), cpu, cuda (= cuda:0), cuda:N, "
    "cuda:all, or a list such as cuda:0,cuda:1; each model is loaded once per device and the replicas "
    "share one queue. For one process per GPU instead, give each process --device cuda:N "
    "(or CUDA_VISIBLE_DEVICES)"
)


def _env(name: str, default):
    return os.environ.get("INFERCORE_" + name.upper().replace("-", "_"), default)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", default=[], metavar="ID=PATH",
        help="serve the model directory PATH under the id ID (repeatable)",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=_env("models-dir", None),
        help="serve every sub-directory with a config.json; the folder name is the id",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_seconds(value: float, flag: str) -> float:
    if not value > 0:
        raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercore", description="Embedding, sparse and rerank inference server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (and the gRPC one with --grpc-port)")
    defaults = ServerConfig()
    serve.add_argument("--host", default=_env("host", defaults.host))
    serve.add_argument("--port", type=int, default=int(_env("port", defaults.port)))
    _model_options(serve)
    serve.add_argument("--device", default=_env("device", defaults.device), help=DEVICES_HELP)
    serve.add_argument(
        "--dtype", default=_env("dtype", defaults.dtype), choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations; auto = float32 on CPU, the family's half type on CUDA",
    )
    serve.add_argument(
        "--backend", default=_env("backend", defaults.backend), choices=["torch", "onnx"],
        help="what computes the models: torch (default) or ONNX Runtime (graph exported once into the cache, or "
             "the model's own onnx/model.onnx); a model's infercore.json 'backend' overrides it",
    )
    serve.add_argument(
        "--quantize", default=_env("quantize", defaults.quantize), choices=["none", "int8"],
        help="int8: dynamic int8 weights (onnx only), served only if its parity with fp32 on a fixed text set "
             "reaches the model's floor (min cosine 0.99, infercore.json 'int8_quality_floor')",
    )
    serve.add_argument("--api-key", default=_env("api-key", None), help="require 'Authorization: Bearer KEY'")
    serve.add_argument(
        "--max-batch-tokens", type=_positive_int, default=_env("max-batch-tokens", None),
        help="token budget of one model batch (default: 4096 on CPU, 16384 on CUDA; never below a model's input limit)",
    )
    serve.add_argument(
        "--max-batch-requests", type=_positive_int, default=_env("max-batch-requests", None),
        help="cap on inputs per model batch",
    )
    serve.add_argument(
        "--max-queued-tokens", type=_positive_int, default=_env("max-queued-tokens", None),
        help="tokens that may wait per model before requests get 429 "
        "(default: 8 batches' worth on CPU, 32 per GPU on CUDA)",
    )
    serve.add_argument(
        "--max-concurrent-requests", type=_positive_int,
        default=int(_env("max-concurrent-requests", defaults.max_concurrent_requests)),
        help="requests in progress at once before new ones get 429",
    )
    serve.add_argument(
        "--request-timeout", type=float, default=float(_env("request-timeout", defaults.request_timeout_s)),
        help="seconds a request may take when it sends no X-Request-Timeout header; later: 503",
    )
    serve.add_argument(
        "--drain-timeout", type=float, default=float(_env("drain-timeout", defaults.drain_timeout_s)),
        help="after SIGTERM, seconds admitted requests may take to finish before the process exits",
    )
    serve.add_argument(
        "--max-client-batch-size", type=_positive_int,
        default=int(_env("max-client-batch-size", defaults.max_client_batch_size)),
        help="inputs per request; more gets 413",
    )
    serve.add_argument(
        "--max-input-tokens", type=_positive_int, default=_env("max-input-tokens", None),
        help="lower every model's token limit to N",
    )
    serve.add_argument(
        "--auto-truncate", action=argparse.BooleanOptionalAction,
        default=_env("auto-truncate", "false").lower() in ("1", "true", "yes"),
        help="truncate over-long inputs when a request does not say (default: refuse them with 413)",
    )
    serve.add_argument(
        "--payload-limit", type=_positive_int, default=int(_env("payload-limit", defaults.payload_limit_bytes)),
        help="largest request body in bytes",
    )
    serve.add_argument(
        "--tokenization-workers", type=_positive_int,
        default=int(_env("tokenization-workers", defaults.tokenization_workers)),
    )
    serve.add_argument(
        "--cpu-workers", type=_positive_int, default=_env("cpu-workers", None),
        help="parallel executors per CPU model (default: one per core)",
    )
    serve.add_argument(
        "--cpu-threads", type=_positive_int, default=int(_env("cpu-threads", defaults.cpu_threads)),
        help="intra-op threads of each CPU executor",
    )
    serve.add_argument(
        "--log-level", default=_env("log-level", "info"), choices=["debug", "info", "warning", "error"],
    )
    serve.add_argument(
        "--grpc-port", type=int, default=_env("grpc-port", None),
        help="also serve the gRPC API (infercore.v1) on this port of --host (default: off; 0 picks a free port)",
    )
    serve.add_argument(
        "--grpc-stream-max-in-flight", type=_positive_int,
        default=int(_env("grpc-stream-max-in-flight", defaults.grpc_stream_max_in_flight)),
        help="requests of one gRPC stream in progress at once; the server reads no further until one is answered",
    )
    serve.add_argument(
        "--tls-cert", type=Path, default=_env("tls-cert", None),
        help="PEM certificate chain: HTTPS on the HTTP port, TLS on the gRPC port",
    )
    serve.add_argument("--tls-key", type=Path, default=_env("tls-key", None), help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", type=Path, default=_env("tls-client-ca", None),
        help="PEM CA bundle: HTTP and gRPC clients must present a certificate it signed (mutual TLS); "
        "its subject is logged as the request's tenant",
    )

    models = commands.add_parser("models", help="inspect model directories")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="print the configured models and whether they load")
    _model_options(listing)
    verify = models_commands.add_parser("verify", help="check a model directory and run it once on the CPU")
    verify.add_argument("path", type=Path)
    importing = models_commands.add_parser(
        "import", help="convert an eland/ELSER archive (NAME.pt + NAME.vocab.json + NAME.metadata.json) "
        "into a model directory",
    )
    importing.add_argument("src", type=Path, help="the .pt file, or the directory holding the three files")
    importing.add_argument("dest", type=Path, help="the model directory to write (new or empty)")
    importing.add_argument("--force", action="store_true", help="write into a non-empty DEST, replacing its files")
    importing.add_argument(
        "--num-attention-heads", type=_positive_int, default=None,
        help="only for archives whose code does not show the attention head count",
    )
    exporting = models_commands.add_parser(
        "export-onnx",
        help="export a model directory's ONNX graph into the cache ahead of time (for --backend onnx on an "
             "air-gapped host: copy the cache, or set INFERCORE_CACHE_DIR)",
    )
    exporting.add_argument("path", type=Path)
    exporting.add_argument("--quantize", choices=["none", "int8"], default="none")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        models=[parse_model_arg(m) for m in args.model],
        models_dir=Path(args.models_dir) if args.models_dir else None,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        quantize=args.quantize,
        api_key=args.api_key or None,
        max_batch_tokens=int(args.max_batch_tokens) if args.max_batch_tokens else None,
        max_batch_requests=int(args.max_batch_requests) if args.max_batch_requests else None,
        max_client_batch_size=args.max_client_batch_size,
        max_queued_tokens=int(args.max_queued_tokens) if args.max_queued_tokens else None,
        max_concurrent_requests=args.max_concurrent_requests,
        request_timeout_s=_positive_seconds(args.request_timeout, "--request-timeout"),
        drain_timeout_s=_positive_seconds(args.drain_timeout, "--drain-timeout"),
        max_input_tokens=int(args.max_input_tokens) if args.max_input_tokens else None,
        auto_truncate=args.auto_truncate,
        payload_limit_bytes=args.payload_limit,
        tokenization_workers=args.tokenization_workers,
        cpu_workers=int(args.cpu_workers) if args.cpu_workers else None,
        cpu_threads=args.cpu_threads,
        log_level=args.log_level,
        grpc_port=_grpc_port(args.grpc_port),
        grpc_stream_max_in_flight=args.grpc_stream_max_in_flight,
        **_tls_files(args),
    )


def _grpc_port(value) -> int | None:
    if value is None or value == "":
        return None
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"--grpc-port must be a port number (0 for a free one), got {value}")
    return port


def _tls_files(args: argparse.Namespace) -> dict[str, Path | None]:
    """--tls-cert/--tls-key/--tls-client-ca, checked: cert and key together, a client CA only with them."""
    files = {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca}
    files = {name: Path(path) if path else None for name, path in files.items()}
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if files["tls_client_ca"] is not None and files["tls_cert"] is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
    return files


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..models.loader import resolve_devices
    from .app import DrainingServer, create_app
    from .engine import Engine
    from .tls import uvicorn_tls_options

    configure_logging(args.log_level)
    config = config_from_args(args)
    # Catch a wrong path, an empty models dir or a device that is not there before binding the port.
    resolve_sources(config.models, config.models_dir)
    resolve_devices(config.device)

    engine = Engine(config)
    exit_code = 0

    def on_load_failure() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(engine, on_load_failure)
    server = DrainingServer(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level,
            access_log=False, lifespan="on", timeout_graceful_shutdown=5, **uvicorn_tls_options(config),
        ),
        engine,
        config.drain_timeout_s,
    )
    server.run()
    return exit_code


def list_models(args: argparse.Namespace) -> int:
    from ..models.verify import verify_model_dir

    sources = resolve_sources([parse_model_arg(m) for m in args.model], args.models_dir)
    reports = [verify_model_dir(s.path, s.id) for s in sources]
    width = max(len(r.model_id) for r in reports)
    for r in reports:
        status = "ok" if r.ok else "NOT LOADABLE"
        print(f"{r.model_id:<{width}}  {r.task or '-':<16}  {status:<12}  {r.path}")
        if r.problem:
            print(f"{'':<{width}}  problem: {r.problem}")
    return 0 if all(r.ok for r in reports) else 1


def verify_model(args: argparse.Namespace) -> int:
    from ..models.verify import verify_model_dir

    report = verify_model_dir(args.path, load=True)
    for fact in report.facts:
        print(f"  {fact}")
    if report.ok:
        print(f"OK: {report.path} is a servable {report.task} model ({report.family} family)")
        return 0
    print(f"NOT SERVABLE: {report.problem}")
    return 1


def import_model(args: argparse.Namespace) -> int:
    from ..models.eland import MODEL_DIR_FILES, import_eland_archive

    dest = import_eland_archive(args.src, args.dest, overwrite=args.force, num_attention_heads=args.num_attention_heads)
    for name in MODEL_DIR_FILES:
        print(f"  wrote {dest / name}")
    print(f"OK: {dest} is a sparse_embedding model directory")
    return 0


def export_onnx(args: argparse.Namespace) -> int:
    from ..models.loader import load_model

    configure_logging("info")
    model = load_model(args.path.name, args.path, "cpu", backend="onnx", quantize=args.quantize)
    figures = ", ".join(f"{k} {v}" for k, v in (model.quality or {}).items())
    files = ", ".join(str(path) for path in model.backend.graphs.files.values())
    print(f"OK: {args.path} exported for onnx {model.backend.precision} ({files}); {figures}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.models_command == "list":
            return list_models(args)
        if args.models_command == "import":
            return import_model(args)
        if args.models_command == "export-onnx":
            return export_onnx(args)
        return verify_model(args)
    except (CheckpointError, ValueError) as exc:
        print(f"infercore: error: {exc}", file=sys.stderr)
        return 2
