"""The ``infercore`` command line: ``models list``, ``models verify`` and the ways ``serve`` refuses a
configuration it cannot serve.

The console script runs as a real process where the process matters (the entry point itself,
``serve``); the checks behind ``models`` run through ``cli.main`` in-process, because every fresh
process pays seconds of torch import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from infercore.server import cli
from tests.server_process import INFERCORE, ServerProcess, offline_env

CLI_TIMEOUT_S = 120


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(INFERCORE), *args], cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``infercore ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def broken_copy(tiny_bert_dir, tmp_path):
    """A fresh copy of the tiny BERT directory for a test to break."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(tiny_bert_dir, tmp_path / name))

    return make


def test_models_list_shows_the_starter_model(tmp_path):
    result = run_cli("models", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert lines[0][:3] == ["all-minilm-l6-v2", "text_embedding", "ok"], result.stdout


def test_models_list_shows_every_configured_model(capsys, tiny_bert_dir, minilm_dir):
    models = ["--model", f"tiny={tiny_bert_dir}", "--model", f"mini={minilm_dir}"]
    code, out, err = run_main(capsys, "models", "list", *models)
    assert code == 0, out + err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert set(rows) == {"tiny", "mini"}
    assert rows["tiny"][1:3] == ["text_embedding", "ok"]
    assert rows["mini"][1:3] == ["text_embedding", "ok"]
    assert "all-minilm-l6-v2" not in out  # configured models replace the starter set


def test_models_list_flags_a_model_that_cannot_load(capsys, tiny_bert_dir, broken_copy):
    broken = broken_copy("no-tokenizer")
    (broken / "tokenizer.json").unlink()
    code, out, _ = run_main(capsys, "models", "list", "--model", f"good={tiny_bert_dir}", "--model", f"bad={broken}")
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip() and not line.startswith(" ")}
    assert " ok " in rows["good"]
    assert "NOT LOADABLE" in rows["bad"]
    assert "problem:" in out and "tokenizer.json" in out


def test_models_verify_accepts_a_good_directory(capsys, tiny_bert_dir):
    code, out, err = run_main(capsys, "models", "verify", str(tiny_bert_dir))
    assert code == 0, out + err
    assert "OK" in out
    assert "text_embedding" in out and "bert" in out
    assert "forward pass" in out


def _only_pickled_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"never unpickled")


def _no_tokenizer_json(path: Path) -> None:
    (path / "tokenizer.json").unlink()


def _unsupported_model_type(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2Model"]
    (path / "config.json").write_text(json.dumps(config))


def _corrupt_safetensors(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x00" * 64)


def _no_config(path: Path) -> None:
    (path / "config.json").unlink()


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (_only_pickled_weights, ["pytorch_model.bin", "safetensors"]),
        (_no_tokenizer_json, ["tokenizer.json"]),
        (_unsupported_model_type, ["'gpt2'", "not supported", "bert"]),
        (_corrupt_safetensors, ["model.safetensors", "not a readable safetensors file"]),
        (_no_config, ["config.json", "not found"]),
    ],
    ids=["only_pytorch_model_bin", "missing_tokenizer_json", "unsupported_model_type", "corrupt_weights", "no_config"],
)
def test_models_verify_refuses_a_broken_directory_with_a_plain_reason(capsys, broken_copy, break_it, reason):
    broken = broken_copy(break_it.__name__.strip("_"))
    break_it(broken)
    code, out, err = run_main(capsys, "models", "verify", str(broken))
    assert code == 1, out + err
    assert "NOT SERVABLE" in out
    for fragment in reason:
        assert fragment in out, (fragment, out)


def test_models_verify_of_a_missing_path_says_it_is_not_a_directory(capsys, tmp_path):
    code, out, _ = run_main(capsys, "models", "verify", str(tmp_path / "missing"))
    assert code == 1
    assert "not a directory" in out


def test_serve_with_a_nonexistent_model_path_exits_with_a_clear_message(tmp_path):
    result = run_cli(
        "serve", "--host", "127.0.0.1", "--port", "0", "--model", "x=/nonexistent/model-dir", cwd=tmp_path
    )
    output = result.stdout + result.stderr
    # A configuration error: refused before the port is bound, like every other bad option.
    assert result.returncode == 2, output
    assert "/nonexistent/model-dir" in output and "not a directory" in output
    assert "Uvicorn running" not in output
    assert "Traceback" not in output


def test_cli_makes_idle_openmp_workers_sleep_unless_told_otherwise(tmp_path):
    """Spinning OpenMP workers make a CPU server that shares its cores 10-30x slower."""
    probe = "import os, infercore.server.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = offline_env()
    env.pop("OMP_WAIT_POLICY", None)
    python = str(INFERCORE.with_name("python"))
    default = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert default.stdout.strip() == "PASSIVE", default.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    chosen = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert chosen.stdout.strip() == "ACTIVE", chosen.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "=nowhere"],
        ["--max-client-batch-size", "0"],
        ["--payload-limit", "-5"],
        ["--dtype", "float64"],
        ["--backend", "tensorrt"],
        ["--quantize", "int4"],
    ],
    ids=["model_without_id", "zero_batch_size", "negative_payload_limit", "unknown_dtype", "unknown_backend",
         "unknown_quantization"],
)
def test_serve_rejects_invalid_options_before_starting(capsys, monkeypatch, args):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep the test process's logging
    monkeypatch.setattr("uvicorn.Server.run", lambda self: pytest.fail("serve started a server"))
    code, _, err = run_main(capsys, "serve", "--host", "127.0.0.1", "--port", "0", *args)
    assert code == 2
    assert "error" in err


def test_serve_drains_and_exits_on_sigterm(tiny_bert_dir, tmp_path):
    server = ServerProcess(["--model", f"tiny={tiny_bert_dir}"], tmp_path / "serve.log", cwd=tmp_path)
    server.start()
    try:
        response = httpx.post(server.url + "/embed", json={"inputs": "still here"}, trust_env=False, timeout=30)
        assert response.status_code == 200
    finally:
        server.stop()
    assert not server.killed, server.log()
    assert "Application shutdown complete" in server.log()


def test_backend_and_quantize_flags_and_their_environment_variables_reach_the_config(monkeypatch):
    args = cli.build_parser().parse_args(["serve", "--backend", "onnx", "--quantize", "int8"])
    config = cli.config_from_args(args)
    assert (config.backend, config.quantize) == ("onnx", "int8")
    assert (cli.config_from_args(cli.build_parser().parse_args(["serve"])).backend) == "torch"
    monkeypatch.setenv("INFERCORE_BACKEND", "onnx")
    assert cli.config_from_args(cli.build_parser().parse_args(["serve"])).backend == "onnx"
