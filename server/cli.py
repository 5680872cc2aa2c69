"""Command line: ``infercore serve``, ``infercore models list``, ``infercore models verify PATH``,
``infercore models import SRC DEST``, ``infercore models export-onnx PATH [--quantize int8]``.

Every ``serve`` flag but ``--model`` can also be set through the environment as ``INFERCORE_<FLAG>``
(for example ``INFERCORE_API_KEY``, which keeps the key out of the process list); a flag on the
command line wins. The flags, their variables and their help come from ``config.ServerConfig``.
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
from ..models.settings import QUANTIZATIONS
from .config import add_server_flags, config_from_args, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercore", description="Embedding, sparse and rerank inference server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (and the gRPC one with --grpc-port)")
    add_server_flags(serve)

    models = commands.add_parser("models", help="inspect model directories")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="print the configured models and whether they load")
    add_server_flags(listing, ("models", "models_dir"))
    models_commands.add_parser(
        "catalog",
        help="print every catalog entry: task, architecture, dimensions, prompts, where the weights come from",
    )
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
        "--num-attention-heads", type=positive_int, default=None,
        help="only for archives whose code does not show the attention head count",
    )
    exporting = models_commands.add_parser(
        "export-onnx",
        help="export a model directory's ONNX graph into the cache ahead of time (for --backend onnx on an "
             "air-gapped host: copy the cache, or set INFERCORE_CACHE_DIR)",
    )
    exporting.add_argument("path", type=Path)
    exporting.add_argument("--quantize", choices=QUANTIZATIONS, default="none")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..models.devices import resolve_devices
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

    sources = resolve_sources([parse_model_arg(m) for m in args.models], args.models_dir)
    reports = [verify_model_dir(s.path, s.id) for s in sources]
    width = max(len(r.model_id) for r in reports)
    for r in reports:
        status = "ok" if r.ok else "NOT LOADABLE"
        print(f"{r.model_id:<{width}}  {r.task or '-':<16}  {status:<12}  {r.path}")
        if r.problem:
            print(f"{'':<{width}}  problem: {r.problem}")
    return 0 if all(r.ok for r in reports) else 1


def list_catalog(args: argparse.Namespace) -> int:
    from ..models.catalog import CATALOG, output_dimensions, weights_source

    for entry in CATALOG.values():
        print(entry.id)
        print(f"  task: {entry.task}  architecture: {entry.family}  dimensions: {output_dimensions(entry) or '-'}"
              f"  max input tokens: {entry.max_input_tokens or '-'}")
        if entry.aliases:
            print(f"  aliases: {', '.join(entry.aliases)}")
        if entry.prompts:
            prompts = ", ".join(f"{name}={text!r}" for name, text in entry.prompts.items())
            print(f"  prompts: {prompts} (default: {entry.default_prompt_name or 'none'})")
        if entry.tasks:
            print(f"  tasks: {', '.join(entry.tasks)} (default: {entry.default_task or 'none'})")
        print(f"  weights: {weights_source(entry)}")
        print(f"  {entry.description}")
    return 0


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
        if args.models_command == "catalog":
            return list_catalog(args)
        if args.models_command == "import":
            return import_model(args)
        if args.models_command == "export-onnx":
            return export_onnx(args)
        return verify_model(args)
    except (CheckpointError, ValueError) as exc:
        print(f"infercore: error: {exc}", file=sys.stderr)
        return 2
