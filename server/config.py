"""Server settings, each defined once: a ``ServerConfig`` field whose ``setting(...)`` metadata also
makes its command-line flag (``--FLAG``), its environment variable (``INFERCORE_<FLAG>``) and its
help. A flag on the command line wins over the environment, which wins over the field's default.

Adding a server setting is one ``setting(...)`` line here (plus its test); ``add_server_flags`` and
``config_from_args`` pick it up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..models.repository import ModelSource, parse_model_arg
from ..models.settings import BACKENDS, QUANTIZATIONS
from .json_limits import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, MAX_DEPTH_CEILING

# Per-device default token budget of a batch. On CPU, bigger batches buy nothing (the matmuls are
# already at the cores' peak) and cost page faults for >32 MiB activations: 4096 measured ~1.2x
# faster than 16384 on the 2-core machine (benchmarks/bench_engine_cpu.py --max-batch-tokens).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
# Default admission bound: this many full batches may wait per model and per device it runs on (each
# replica drains the queue as fast, so the wait the bound stands for stays the same). On CPU 8
# batches are about 5 s of work for MiniLM on 2 cores; a deeper queue only makes admitted requests
# wait longer under overload (benchmarks/bench_load.py: p50 24 s with 32) instead of telling clients
# to come back.
QUEUED_BATCHES_DEFAULT = {"cpu": 8, "cuda": 32}
ENV_PREFIX = "INFERCORE_"
_TRUE_WORDS = ("1", "true", "yes")

DEVICES_HELP = (
    "where models run: auto (default: every visible GPU, else the CPU), cpu, cuda (= cuda:0), cuda:N, "
    "cuda:all, or a list such as cuda:0,cuda:1; each model is loaded once per device and the replicas "
    "share one queue. For one process per GPU instead, give each process --device cuda:N "
    "(or CUDA_VISIBLE_DEVICES)"
)


@dataclass(frozen=True)
class Flag:
    """How one server setting appears on the command line and in the environment.

    ``parse`` turns the text into the value while parsing (a bad value exits with argparse's usage
    error naming the flag); ``check`` then validates or completes the parsed value and raises
    ValueError naming the flag. ``switch`` settings are ``--flag``/``--no-flag`` (environment:
    1/true/yes); ``repeatable`` ones collect every occurrence into a list (no environment variable).
    """

    help: str
    name: str | None = None  # default: the field's name with dashes
    parse: Callable[[str], Any] | None = None
    check: Callable[[Any, str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False
    repeatable: bool = False


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **flag: Any) -> Any:
    """A ``ServerConfig`` field that is also a command-line flag and an environment variable."""
    return field(default=default, default_factory=default_factory, metadata={"flag": Flag(help, **flag)})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_seconds(value: float, flag: str) -> float:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
    return value


def _json_depth(value: int, flag: str) -> int:
    if not 1 <= value <= MAX_DEPTH_CEILING:
        raise ValueError(f"{flag} must be between 1 and {MAX_DEPTH_CEILING}, got {value}")
    return value


def _port_or_off(value: int | None, flag: str) -> int | None:
    if value is None:
        return None
    if not 0 <= value <= 65535:
        raise ValueError(f"{flag} must be a port number (0 for a free one), got {value}")
    return value


def _model_sources(values: list[str], flag: str) -> list[ModelSource]:
    return [parse_model_arg(value) for value in values]


def _text_or_none(value: str | None, flag: str) -> str | None:
    return value or None


def host_list(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """"a.example, b.example:8443" → ("a.example", "b.example:8443"), lower-cased; "" → ()."""
    if isinstance(text, tuple):
        return text
    hosts = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    for host in hosts:
        if "/" in host or "@" in host or " " in host:
            raise argparse.ArgumentTypeError(
                f"must be host names (optionally host:port), comma-separated, got {host!r}"
            )
    return hosts


@dataclass
class ServerConfig:
    """Every server setting. Constructed directly (tests, benchmarks) or by ``config_from_args``."""

    host: str = setting("127.0.0.1", "address to listen on (HTTP, and gRPC with --grpc-port)")
    port: int = setting(8080, "HTTP port", parse=int)
    models: list[ModelSource] = setting(
        help="serve the model directory PATH under the id ID (repeatable)", default_factory=list,
        name="model", metavar="ID=PATH", repeatable=True, check=_model_sources,
    )
    models_dir: Path | None = setting(
        None, "serve every sub-directory with a config.json; the folder name is the id", parse=Path,
    )
    # One device or several: each model is loaded once per device (models/loader.py resolve_devices).
    device: str = setting("auto", DEVICES_HELP)
    dtype: str = setting(
        "auto", "weights and activations; auto = float32 on CPU, the family's half type on CUDA",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    # A model's own infercore.json "backend" / "quantize" win over these (models/settings.py).
    backend: str = setting(
        "torch", "what computes the models: torch, or onnx (ONNX Runtime; the graph is exported once into the "
        "cache, or the model's own onnx/model.onnx is used; an image tower stays on torch); a model's "
        "infercore.json 'backend' overrides it", choices=BACKENDS,
    )
    quantize: str = setting(
        "none", "int8: dynamic int8 weights (onnx only), served only if its parity with fp32 on a fixed text set "
        "reaches the model's floor (min cosine 0.99, infercore.json 'int8_quality_floor'); a model's "
        "infercore.json 'quantize' overrides it", choices=QUANTIZATIONS,
    )
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY'", check=_text_or_none)
    # A model's budget is never below its own input limit, so one input always fits.
    max_batch_tokens: int | None = setting(
        None, "token budget of one model batch (default: 4096 on CPU, 16384 on CUDA; never below a model's "
        "input limit)", parse=positive_int,
    )
    max_batch_requests: int | None = setting(None, "cap on inputs per model batch", parse=positive_int)
    # Admission bound per model, in queued tokens; None: QUEUED_BATCHES_DEFAULT batches' worth per
    # device the model runs on.
    max_queued_tokens: int | None = setting(
        None, "tokens that may wait per model before requests get 429 "
        "(default: 8 batches' worth on CPU, 32 per GPU on CUDA)", parse=positive_int,
    )
    max_concurrent_requests: int = setting(
        512, "requests in progress at once before new ones get 429", parse=positive_int,
    )
    request_timeout_s: float = setting(
        60.0, "seconds a request may take when it sends no X-Request-Timeout header; later: 503",
        name="request-timeout", parse=float, check=_positive_seconds,
    )
    drain_timeout_s: float = setting(
        30.0, "after SIGTERM, seconds admitted requests may take to finish before the process exits",
        name="drain-timeout", parse=float, check=_positive_seconds,
    )
    # Elasticsearch's openai service sends up to 2048 inputs per request.
    max_client_batch_size: int = setting(2048, "inputs per request; more gets 413", parse=positive_int)
    max_input_tokens: int | None = setting(None, "lower every model's token limit to N", parse=positive_int)
    auto_truncate: bool = setting(
        False, "truncate over-long inputs when a request does not say (default: refuse them with 413)", switch=True,
    )
    payload_limit_bytes: int = setting(
        8 * 1024 * 1024, "largest request body in bytes", name="payload-limit", parse=positive_int,
    )
    # Bounds on a JSON request body, checked before it is decoded (server/json_limits.py).
    json_max_depth: int = setting(
        DEFAULT_MAX_DEPTH,
        f"nesting levels a JSON request body may have; deeper gets 400 (at most {MAX_DEPTH_CEILING})",
        parse=int, check=_json_depth,
    )
    json_max_elements: int = setting(
        DEFAULT_MAX_ELEMENTS, "JSON values (strings, numbers, arrays, objects) a request body may hold; more gets 413",
        parse=positive_int,
    )
    tokenization_workers: int = setting(
        max(1, (os.cpu_count() or 2) - 1), "threads that tokenize requests off the event loop (and, in a pool "
        "of their own of the same size, that decode images)", parse=positive_int,
    )
    # Image input (models that take images, e.g. jina-clip-v2). Each image is also bounded on its own
    # (20 MiB encoded, 40 megapixels from its header, aspect ratio 32:1: models/images.py ImageLimits).
    max_image_request_bytes: int = setting(
        32 * 1024 * 1024, "encoded image bytes one request may carry, all its images together; more gets 413",
        parse=positive_int,
    )
    # A decoded image holds a few bytes per pixel (the file's mode, then RGB) until it is resized to
    # the tower's input; this bounds what all decoding threads hold at once. An image waits for room
    # (until its request's deadline); one larger than the bound on its own gets 413.
    max_decoding_pixels: int = setting(
        160_000_000, "pixels (width x height, from the images' headers) being decoded at once, all requests "
        "together", parse=positive_int,
    )
    image_url_hosts: tuple[str, ...] = setting(
        (), "hosts (host or host:port, comma-separated) whose http(s) image URLs the server fetches; default: "
        "none, image URLs are refused (fetching them would let clients make the server send requests)",
        parse=host_list, metavar="HOSTS",
    )
    image_url_timeout_s: float = setting(
        10.0, "seconds one image URL may take to fetch (connect and read together)", name="image-url-timeout",
        parse=float, check=_positive_seconds,
    )
    # CPU models run data-parallel: this many main executors per model, each with ``cpu_threads``
    # intra-op threads. On the 2-core machine, two single-threaded workers gave 1.1x the batch
    # throughput of one two-threaded worker when idle and 2.3x next to another busy process
    # (benchmarks/bench_cpu_threads.py).
    cpu_workers: int | None = setting(
        None, "parallel executors per CPU model (default: one per core)", parse=positive_int,
    )
    cpu_threads: int = setting(1, "intra-op threads of each CPU executor", parse=positive_int)
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    access_log: bool = setting(
        True, "log one INFO line per request: method, route, model, status, tokens, duration, lane, trace id, "
        "mTLS subject; never input text (--no-access-log: none)", switch=True,
    )
    # gRPC front end (server/grpc_server.py) on --host.
    grpc_port: int | None = setting(
        None, "also serve the gRPC API (infercore.v1) on this port of --host (default: off; 0 picks a free port)",
        parse=int, check=_port_or_off,
    )
    # The server stops reading a stream beyond it.
    grpc_stream_max_in_flight: int = setting(
        32, "requests of one gRPC stream in progress at once; the server reads no further until one is answered",
        parse=positive_int,
    )
    # With a client CA, clients must present a certificate it signed (mutual TLS); see check_tls_files.
    tls_cert: Path | None = setting(
        None, "PEM certificate chain: HTTPS on the HTTP port, TLS on the gRPC port", parse=Path,
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert", parse=Path)
    tls_client_ca: Path | None = setting(
        None, "PEM CA bundle: HTTP and gRPC clients must present a certificate it signed (mutual TLS); "
        "its subject is logged as the request's tenant", parse=Path,
    )

    def batch_token_budget(self, device_type: str, max_input_tokens: int) -> int:
        return max(self.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS[device_type], max_input_tokens)

    def main_executors(self, device_type: str) -> int:
        if device_type != "cpu":
            return 1
        return self.cpu_workers or os.cpu_count() or 1

    def queued_token_limit(self, device_type: str, batch_token_budget: int, replicas: int = 1) -> int:
        return self.max_queued_tokens or QUEUED_BATCHES_DEFAULT[device_type] * batch_token_budget * replicas


# ---- command line and environment, generated from the fields above -------------------------------

def server_flags(names: Iterable[str] | None = None) -> Iterator[tuple[Field, Flag]]:
    """(field, flag) of every setting, or of the settings ``names`` (field names), in field order."""
    wanted = None if names is None else set(names)
    for f in fields(ServerConfig):
        flag = f.metadata.get("flag")
        if flag is not None and (wanted is None or f.name in wanted):
            yield f, flag


def flag_name(f: Field, flag: Flag) -> str:
    return "--" + (flag.name or f.name).replace("_", "-")


def env_name(f: Field, flag: Flag) -> str | None:
    """``INFERCORE_<FLAG>``; None for repeatable flags, which have no environment variable."""
    if flag.repeatable:
        return None
    return ENV_PREFIX + flag_name(f, flag).removeprefix("--").upper().replace("-", "_")


def add_server_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add the flags of every setting (or of ``names``) to ``parser``, with the environment's values as
    defaults."""
    for f, flag in server_flags(names):
        env = env_name(f, flag)
        from_env = os.environ.get(env) if env else None
        default = f.default_factory() if f.default is MISSING else f.default
        help = flag.help + (f" [env: {env}]" if env else "")
        name = flag_name(f, flag)
        options: dict[str, Any] = {"dest": f.name, "help": help}
        if flag.switch:
            options["action"] = argparse.BooleanOptionalAction
            options["default"] = default if from_env is None else from_env.lower() in _TRUE_WORDS
        else:
            if not flag.choices:  # argparse shows the choices themselves
                options["metavar"] = flag.metavar or name.removeprefix("--").upper().replace("-", "_")
            if flag.repeatable:
                options.update(action="append", default=[])
            else:
                # argparse runs ``parse`` on a string default too: a bad environment value is refused
                # as a bad flag value would be.
                options.update(default=default if from_env is None else from_env, type=flag.parse,
                               choices=flag.choices)
        parser.add_argument(name, **options)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` that parsed flags describe; ValueError naming the flag of a bad value."""
    values = {}
    for f, flag in server_flags():
        value = getattr(args, f.name)
        values[f.name] = flag.check(value, flag_name(f, flag)) if flag.check else value
    config = ServerConfig(**values)
    check_tls_files(config)
    return config


def check_tls_files(config: ServerConfig) -> None:
    """--tls-cert and --tls-key together, a client CA only with them, every file present."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(config, name)
        if path is not None and not path.is_file():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
