"""GPU benchmark suite: the device's own ceilings, then infercore's runners against them and against
sentence-transformers on the same models and inputs, in one run.

    python benchmarks/bench_gpu.py [--only bert-base-mlm,bert-base,...] [--seconds 1.5] [--out DIR]
    python benchmarks/bench_gpu.py --dry-run      # the whole suite on CPU, tiny configs, < 1 minute

Sections of the JSON (``benchmarks/results/bench_gpu.json``; the dry run writes
``bench_gpu_dry_run.json``) and of the plot (the same name, ``.png``):

- ``device``:   GPU name, memory, SM count, versions.
- ``ceilings``: dense matmul TFLOP/s (bf16 and fp16 square GEMMs of several sizes, the best
  kept) and host↔device copy GB/s (pinned both ways, pageable H2D).
- ``models``:   per model (random weights at the real configs, ``MODELS``), loaded with infercore's
  ``load_model`` and driven through its runner (``runner.run(packed_batch, options)``, which
  includes pooling / SPLADE expansion and the copy of results to the host):
  - for each length mix (``MIXES``: queries ~16 tokens, passages ~330, 512-token documents),
    batches cut at the default CUDA token budget, tokens/s two ways: ``tokens_per_s`` packs each
    batch (pinned) then runs it, one after the other, as one executor thread does without
    overlap; ``tokens_per_s_prepacked`` runs batches already on the device (what overlapping the
    next batch's packing and copy with the forward approaches);
  - model FLOP utilisation: matmul FLOPs per token of that mix (``flops_per_token``: every
    projection, the attention products QK^T and AV over each sequence's own length, causal ones
    counted over the lower triangle, and the SPLADE head's transform and vocabulary product) times
    tokens/s, over the measured matmul rate of the model's dtype;
  - ``sentence_transformers``: ``SentenceTransformer`` / ``SparseEncoder`` on the same folder and
    texts (fp16 for BERT-family models as the issue's target says, bf16 where infercore runs bf16),
    ``encode`` with a batch size of the same token budget; ``ratio_vs_st`` = infercore / ST;
  - ``latency_single_query``: p50 / p99 of one 16-token query (pack + run), and ST's ``encode``
    of the same query;
  - ``onnx``: the same model on ``--backend onnx`` (fp32; the CUDA execution provider with I/O
    binding on a GPU, which needs the ``onnx-gpu`` extra): tokens/s per mix through the backend's
    padded length groups, ``ratio_vs_torch`` over the serial torch figure, the min cosine of its
    outputs against the torch runner's; families it does not serve (decoders) are ``skipped``;
  - ``fused_kernels_off``: the passages mix again with the fused layer kernels switched off
    (``kernels.fused_norm.enabled``): what they buy end to end;
  - ``kernels_switched_off``: kernels the start-up self-check (``kernels.self_check``, run as the
    server runs it) found failing or disagreeing with their reference on this GPU, and why.
- ``sparse_vs_dense``: the SPLADE runner (``bert-base-mlm``) over the dense runner of the same
  encoder weights (``bert-base``), per mix.
- ``kernels``: each Triton kernel against its torch reference at serving shapes (the sample cases
  of ``kernels.registry``, drawn at those sizes): time, speedup, max abs difference (and for SPLADE
  the peak extra memory of each).
- ``targets``: issue 9's targets evaluated on the figures above.

Inputs: text from ``corpus.passage_pool`` cut to a drawn token length under the WordPiece tokenizer
every model folder carries (``bench_tokenizer.py``: built from the corpus, since GPU hosts have no
registry to install a tokenizer package from; ids below every vocabulary size here), identical for
infercore and sentence-transformers (``st_token_count_matches`` checks the count). Random
weights time like trained ones, except that a random masked-LM head would activate half the
vocabulary: its bias is set to -2.0, which gives a SPLADE-like ~60 terms per query and ~300 per
passage (``mean_terms`` records it). Checkpoints are written once (bf16) under
``.cache/bench_gpu/`` and reused.

The dry run builds tiny configs of the same families in a temporary folder, runs everything on CPU
in fp32 (the Triton kernels under ``TRITON_INTERPRET=1``, on small shapes) and writes the same
sections. Its timings mean nothing; it exists so the suite cannot rot
(``tests/test_bench_gpu_dry_run.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "bench_gpu"
# From a plain checkout (a GPU host without a registry to install from): the root makes ``infercore``
# importable, and infercore/__init__.py maps its subpackages to the top-level folders, which carry no
# __init__.py and so never shadow an installed ``kernels`` (transformers >= 5.25 imports it).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# The masked-LM head's bias in the random SPLADE checkpoint (see the module docstring).
SPLADE_HEAD_BIAS = -2.0
QUERY_TOKENS = 16  # the single-query latency probe


@dataclass(frozen=True)
class LengthMix:
    """Token lengths (with [CLS]/[SEP]) drawn uniformly from [low, high]; ``inputs`` of them."""

    low: int
    high: int
    inputs: int


# About 8 token budgets (16384) of input per mix.
MIXES = {
    "queries": LengthMix(10, 22, 8192),
    "passages": LengthMix(250, 410, 400),
    "documents": LengthMix(512, 512, 256),
}
DRY_MIXES = {
    "queries": LengthMix(10, 22, 24),
    "passages": LengthMix(250, 410, 3),
    "documents": LengthMix(512, 512, 2),
}


@dataclass(frozen=True)
class ModelSpec:
    """A random checkpoint at a real config. ``weights_from``: reuse another spec's weights (same
    encoder, another head). ``st_pooling``: write sentence-transformers files with this pooling
    (None: the folder is read by ``SparseEncoder`` as a masked-LM model)."""

    label: str
    task: str
    hf_class: str
    hf_config: str
    config: dict[str, Any]
    tiny_config: dict[str, Any]
    st_pooling: str | None = "mean"
    weights_from: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _real(name: str) -> dict[str, Any]:
    from real_size_checkpoints import SPECS

    return dict(SPECS[name]["config_args"])


TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=512)


def model_specs() -> dict[str, ModelSpec]:
    return {
        "bert-base-mlm": ModelSpec(
            "BERT-base MLM, SPLADE (ELSER's shape)", "sparse_embedding", "BertForMaskedLM", "BertConfig",
            _real("bert-base-mlm"), TINY_BERT, st_pooling=None,
        ),
        "bert-base": ModelSpec(
            "BERT-base dense, mean (same weights)", "text_embedding", "BertForMaskedLM", "BertConfig",
            _real("bert-base-mlm"), TINY_BERT, weights_from="bert-base-mlm",
        ),
        "minilm-l6": ModelSpec(
            "MiniLM-L6 size dense, mean (all-MiniLM-L6-v2's shape)", "text_embedding", "BertModel", "BertConfig",
            dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512),
            dict(TINY_BERT, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48),
        ),
        "xlm-roberta-large": ModelSpec(
            "XLM-R large dense, mean (multilingual-e5-large's shape)", "text_embedding", "XLMRobertaModel",
            "XLMRobertaConfig", _real("xlm-roberta-large"),
            dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 layer_norm_eps=1e-5),
        ),
        "qwen3-0.6b": ModelSpec(
            "Qwen3-0.6B dense, last token (jina-embeddings-v5-text-small's backbone)", "text_embedding",
            "Qwen3Model", "Qwen3Config", _real("qwen3-0.6b"),
            dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, intermediate_size=64, max_position_embeddings=1024, rms_norm_eps=1e-6),
            st_pooling="last",
        ),
    }


# ---- checkpoints ---------------------------------------------------------------------------------


def build_checkpoint(name: str, spec: ModelSpec, root: Path, tiny: bool, build_device: str) -> Path:
    """The model folder (weights, the suite's tokenizer, sentence-transformers files, infercore.json);
    skipped when complete (infercore.json is written last)."""
    import bench_tokenizer
    import torch
    import transformers

    from tests.tiny_checkpoints import write_sentence_transformers_files

    target = root / name
    if (target / "infercore.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, spec.hf_config)(**(spec.tiny_config if tiny else spec.config))
    if spec.weights_from is not None:
        source = build_checkpoint(spec.weights_from, model_specs()[spec.weights_from], root, tiny, build_device)
        for item in source.iterdir():
            if item.is_file() and item.name not in ("infercore.json", "modules.json"):
                (target / item.name).unlink(missing_ok=True)
                (target / item.name).symlink_to(item.resolve())
    else:
        torch.manual_seed(0)
        with torch.device(build_device):
            model = getattr(transformers, spec.hf_class)(config).eval()
        if spec.task == "sparse_embedding" and not tiny:  # a tiny head stays dense: more to compare
            with torch.no_grad():
                model.cls.predictions.bias.fill_(SPLADE_HEAD_BIAS)
        if not tiny:
            model = model.to(torch.bfloat16)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer = bench_tokenizer.build(root / "tokenizer")
        for file in bench_tokenizer.FILES:
            shutil.copy(tokenizer / file, target / file)
        del model
    if spec.st_pooling is not None:
        write_sentence_transformers_files(target, config.hidden_size, spec.st_pooling, max_seq_length=512)
    (target / "infercore.json").write_text(json.dumps({"task": spec.task, **spec.settings}))
    return target


# ---- inputs --------------------------------------------------------------------------------------


def make_texts(tokenizer_file: Path, mix: LengthMix, seed: int) -> list[str]:
    """``mix.inputs`` texts whose token count (with [CLS]/[SEP]) is drawn from the mix: windows of
    corpus words, cut at the character where the drawn length's token starts."""
    import corpus
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    words = " ".join(corpus.passage_pool()).split()
    rng = random.Random(seed)
    lengths = [rng.randint(mix.low, mix.high) for _ in range(mix.inputs)]
    drafts = []
    for n in lengths:  # every word is at least one token, so n words always reach n tokens
        start = rng.randrange(len(words) - n)
        drafts.append(" ".join(words[start : start + n]))
    texts = []
    for draft, encoding, n in zip(drafts, tokenizer.encode_batch(drafts, add_special_tokens=False), lengths):
        content = n - 2
        if len(encoding.ids) > content:
            draft = draft[: encoding.offsets[content][0]].rstrip()
        texts.append(draft)
    return texts


def budget_batches(ids: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive inputs grouped up to ``budget`` tokens, as the scheduler forms batches."""
    batches: list[list[list[int]]] = [[]]
    tokens = 0
    for seq in ids:
        if batches[-1] and tokens + len(seq) > budget:
            batches.append([])
            tokens = 0
        batches[-1].append(seq)
        tokens += len(seq)
    return batches


# ---- FLOPs ---------------------------------------------------------------------------------------


def flops_per_sequence(encoder: Any, task: str, vocab_size: int, length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sequence of ``length`` tokens through the encoder and
    head. Bidirectional attention: each token's query meets ``length`` keys; causal: position i
    meets i + 1, so length (length + 1) / 2 pairs in all. Norms, activations, softmax and
    embeddings are not counted (standard MFU convention)."""
    from infercore.models.bert import BertConfig
    from infercore.models.llama_like import LlamaLikeConfig

    cfg = encoder.config
    h = cfg.hidden_size
    if isinstance(cfg, BertConfig):
        q_width = kv_width = h
        mlp = 2 * 2 * h * cfg.intermediate_size
        causal = False
    elif isinstance(cfg, LlamaLikeConfig):
        q_width = cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        mlp = 2 * 3 * h * cfg.intermediate_size  # gate, up, down
        causal = cfg.causal
    else:
        raise TypeError(f"no FLOP count for {type(cfg).__name__}")
    per_token = 2 * h * (q_width + 2 * kv_width) + 2 * q_width * h + mlp
    pairs = length * (length + 1) / 2 if causal else length * length
    # QK^T and AV: 2 FLOPs x head_dim per (query, key) pair and head, twice.
    attention = 2 * 2 * q_width * pairs
    total = cfg.num_hidden_layers * (per_token * length + attention)
    if task == "sparse_embedding":  # MLM transform, then every token's logits over the vocabulary
        total += length * (2 * h * h + 2 * h * vocab_size)
    return total


# ---- timing --------------------------------------------------------------------------------------


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op_ms(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms (CUDA: events around each call)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: Any, dry_run: bool) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"matmul_tflops": {}, "copy_gbps": {}}
    sizes = (256,) if dry_run else (4096, 8192, 16384)
    for dtype in (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16, torch.float32):
        per_size = {}
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            ms = time_op_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device, repeats=3 if dry_run else 20)
            per_size[str(n)] = 2 * n**3 / (ms / 1e3) / 1e12
            del a, b, c
        out["matmul_tflops"][str(dtype).removeprefix("torch.")] = {"by_size": per_size, "best": max(per_size.values())}
    if device.type != "cuda":
        out["copy_gbps"] = {"note": "no CUDA device: host-device copies not measured"}
        return out
    nbytes = 256 << 20
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for name, fn in (
        ("h2d_pinned", lambda: on_device.copy_(pinned, non_blocking=True)),
        ("d2h_pinned", lambda: pinned.copy_(on_device, non_blocking=True)),
        ("h2d_pageable", lambda: on_device.copy_(pageable)),
    ):
        out["copy_gbps"][name] = nbytes / (time_op_ms(fn, device, repeats=10) / 1e3) / 1e9
    return out


def release_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- one model -----------------------------------------------------------------------------------


@dataclass
class MixInputs:
    texts: list[str]
    ids: list[list[int]]
    batches: list[list[list[int]]]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def run_throughput(model: Any, batches: list[list[list[int]]], seconds: float, prepacked: bool) -> float:
    """Tokens/s of ``runner.run`` over the batches, cycled for at least ``seconds`` and one full pass."""
    from infercore.models.packing import pack_sequences

    device = model.device
    pin = device.type == "cuda"
    options = model.runner.default_options()

    def pack(batch: list[list[int]]) -> Any:
        return pack_sequences(batch, device=device, pin_memory=pin)

    packed = [pack(b) for b in batches] if prepacked else None

    def step(i: int) -> None:
        model.runner.run(packed[i] if prepacked else pack(batches[i]), [options] * len(batches[i]))

    for i in range(min(2, len(batches))):  # warm-up: kernels compiled, allocator grown
        step(i)
    synchronize(device)
    return cycled_tokens_per_s(batches, seconds, step)


def cycled_tokens_per_s(batches: list[list[list[int]]], seconds: float, step: Callable[[int], Any]) -> float:
    """Tokens/s of ``step(i)`` (computing batch i, results on the host) over the batches, cycled for
    at least ``seconds`` and one full pass."""
    tokens = 0
    i = 0
    started = time.perf_counter()
    while i < len(batches) or time.perf_counter() - started < seconds:
        step(i % len(batches))
        tokens += sum(len(s) for s in batches[i % len(batches)])
        i += 1
    return tokens / (time.perf_counter() - started)


def single_query(queries: MixInputs) -> list[int]:
    """The latency probe: the first query of QUERY_TOKENS tokens (else the first query)."""
    return next((ids for ids in queries.ids if len(ids) == QUERY_TOKENS), queries.ids[0])


def run_latency(model: Any, query_ids: list[int], repeats: int) -> dict[str, float]:
    from infercore.models.packing import pack_sequences

    options = [model.runner.default_options()]
    pin = model.device.type == "cuda"
    times = []
    for i in range(repeats + 10):
        started = time.perf_counter()
        model.runner.run(pack_sequences([query_ids], device=model.device, pin_memory=pin), options)
        if i >= 10:
            times.append((time.perf_counter() - started) * 1e3)
    return percentiles(times)


def percentiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "n": len(ordered)}


def load_sentence_transformers(path: Path, task: str, device: Any, dtype: Any) -> Any:
    import transformers
    from sentence_transformers import SentenceTransformer, SparseEncoder

    cls = SparseEncoder if task == "sparse_embedding" else SentenceTransformer
    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = cls(str(path), device=str(device), model_kwargs={dtype_key: dtype}, local_files_only=True)
    model.max_seq_length = 512
    return model


def st_encode(st_model: Any, texts: list[str], batch_size: int) -> Any:
    kwargs = {"batch_size": batch_size, "show_progress_bar": False}
    if type(st_model).__name__ == "SparseEncoder":
        return st_model.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False, **kwargs)
    return st_model.encode(texts, convert_to_tensor=True, **kwargs)


def min_cosine(ours: Any, theirs: Any) -> float:
    import torch

    a = torch.as_tensor(ours, dtype=torch.float64)
    b = torch.as_tensor(theirs, dtype=torch.float64, device="cpu")
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def dense_rows(results: list[Any], width: int) -> Any:
    """Runner results (vectors, or SparseVectors) as a [N, width] float tensor."""
    import numpy as np
    import torch

    rows = np.zeros((len(results), width), dtype=np.float32)
    for i, r in enumerate(results):
        if hasattr(r, "ids"):
            rows[i, r.ids] = r.weights
        else:
            rows[i, : len(r)] = r
    return torch.from_numpy(rows)


def bench_model(
    name: str, spec: ModelSpec, path: Path, mixes: dict[str, MixInputs], peak_tflops: dict[str, float],
    args: argparse.Namespace, device: Any, budget: int,
) -> dict[str, Any]:
    from infercore.kernels import fused_norm, triton_support
    from infercore.models.loader import load_model
    from infercore.models.packing import pack_sequences

    model = load_model(name, path, device=str(device), dtype=args.dtype)
    if device.type == "cuda":  # what the server does at start: kernels that fail here are switched off
        model.check_kernels()
    encoder = model.runner.encoder
    dtype_name = str(model.dtype).removeprefix("torch.")
    peak = peak_tflops.get(dtype_name) or max(peak_tflops.values())
    vocab = model.runner.dimensions if spec.task == "sparse_embedding" else 0
    entry: dict[str, Any] = {
        "label": spec.label,
        "task": spec.task,
        "family": model.family,
        "dtype": dtype_name,
        "parameters_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "config": {k: v for k, v in vars(encoder.config).items() if isinstance(v, int | float | bool)},
        "matmul_ceiling_tflops": peak,
        # Kernels the start-up self-check switched off in this process (the reference runs instead).
        "kernels_switched_off": triton_support.disabled(),
        "mixes": {},
    }
    ours_for_check: dict[str, list[Any]] = {}
    for mix_name, inputs in mixes.items():
        flops = sum(flops_per_sequence(encoder, spec.task, vocab, len(s)) for s in inputs.ids) / inputs.tokens
        serial = run_throughput(model, inputs.batches, args.seconds, prepacked=False)
        prepacked = run_throughput(model, inputs.batches, args.seconds, prepacked=True)
        row: dict[str, Any] = {
            "inputs": len(inputs.ids),
            "tokens": inputs.tokens,
            "mean_tokens": inputs.tokens / len(inputs.ids),
            "batches": len(inputs.batches),
            "flops_per_token": flops,
            "tokens_per_s": serial,
            "tokens_per_s_prepacked": prepacked,
            "mfu": serial * flops / (peak * 1e12),
            "mfu_prepacked": prepacked * flops / (peak * 1e12),
        }
        check = inputs.batches[0][: min(16, len(inputs.batches[0]))]
        results = model.runner.run(pack_sequences(check, device=device), [model.runner.default_options()] * len(check))
        ours_for_check[mix_name] = results
        if spec.task == "sparse_embedding":
            row["mean_terms"] = sum(len(r) for r in results) / len(results)
        entry["mixes"][mix_name] = row
        print(f"  {name:<18} {mix_name:<9} {serial:>11,.0f} tok/s  prepacked {prepacked:>11,.0f}  "
              f"MFU {row['mfu']:6.1%} / {row['mfu_prepacked']:6.1%}", flush=True)

    query = single_query(mixes["queries"])
    entry["latency_single_query"] = {"tokens": len(query), **run_latency(model, query, 5 if args.dry_run else 300)}

    previous = fused_norm.enabled
    fused_norm.enabled = False
    try:
        off = run_throughput(model, mixes["passages"].batches, args.seconds, prepacked=True)
    finally:
        fused_norm.enabled = previous
    on = entry["mixes"]["passages"]["tokens_per_s_prepacked"]
    entry["fused_kernels_off"] = {"mix": "passages", "tokens_per_s_prepacked": off, "speedup_from_fused": on / off,
                                  "applies": device.type == "cuda"}
    del model, encoder
    release_memory(device)

    try:
        entry["onnx"] = bench_onnx(name, path, mixes, entry, ours_for_check, args, device)
    except Exception as exc:  # the torch figures stand without it
        entry["onnx"] = {"error": describe(exc)}
        print(f"  {name:<18} onnx FAILED: {describe(exc)}", flush=True)
    release_memory(device)

    try:
        entry["sentence_transformers"] = bench_sentence_transformers(
            spec, path, mixes, entry, ours_for_check, args, device, budget
        )
    except Exception as exc:  # infercore's figures stand without the comparison
        entry["sentence_transformers"] = {"error": describe(exc)}
        print(f"  {name:<18} sentence-transformers FAILED: {describe(exc)}", flush=True)
    release_memory(device)
    return entry


def run_backend_throughput(model: Any, batches: list[list[list[int]]], seconds: float) -> float:
    """Tokens/s of the model's backend (``make_batch`` then ``run``: for ONNX Runtime, padded
    length groups) over the batches, cycled for at least ``seconds`` and one full pass."""
    backend = model.backend
    options = model.runner.default_options()

    def step(i: int) -> None:
        batch = batches[i]
        backend.run(backend.make_batch(batch, None, [options] * len(batch)), [options] * len(batch))

    for i in range(min(2, len(batches))):  # warm-up: sessions' first-run allocations
        step(i)
    return cycled_tokens_per_s(batches, seconds, step)


def bench_onnx(
    name: str, path: Path, mixes: dict[str, MixInputs], entry: dict[str, Any], ours: dict[str, list[Any]],
    args: argparse.Namespace, device: Any,
) -> dict[str, Any]:
    """The same model on ``--backend onnx`` (fp32; on a GPU the CUDA execution provider with I/O
    binding): tokens/s per mix through the backend, over the torch runner's serial figure
    (``ratio_vs_torch``), and the min cosine of its outputs against the torch runner's. Families
    the ONNX backend does not serve are reported as skipped, with the loader's reason."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (the 'onnx' extra; 'onnx-gpu' on a CUDA host)"}
    providers = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in providers:
        return {"skipped": f"this onnxruntime build has no CUDA provider ({', '.join(providers)}): "
                           "install the 'onnx-gpu' extra (locks/cuda.txt)"}
    from infercore.models.checkpoint import CheckpointError
    from infercore.models.loader import load_model

    started = time.perf_counter()
    try:
        model = load_model(name, path, device=str(device), dtype=args.dtype, backend="onnx")
    except CheckpointError as exc:
        if "not served by the onnx backend" in str(exc):
            print(f"  {name:<18} onnx: skipped ({exc})", flush=True)
            return {"skipped": str(exc)}
        raise
    # The provider the base graph's session runs on (a CUDA build may list TensorRT first; we ask for CUDA).
    provider = model.backend.session(next(iter(model.backend.graphs.files))).get_providers()[0]
    result: dict[str, Any] = {"precision": model.backend.precision, "provider": provider,
                              "load_s": time.perf_counter() - started, "quality_at_load": model.quality, "mixes": {}}
    for mix_name, inputs in mixes.items():
        rate = run_backend_throughput(model, inputs.batches, args.seconds)
        torch_rate = entry["mixes"][mix_name]["tokens_per_s"]
        result["mixes"][mix_name] = {"tokens_per_s": rate, "ratio_vs_torch": rate / torch_rate}
        print(f"  {name:<18} {mix_name:<9} onnx {rate:>11,.0f} tok/s  x torch {rate / torch_rate:5.2f}", flush=True)
    cosines = []
    options = model.runner.default_options()
    for mix_name, theirs in ours.items():
        check = mixes[mix_name].batches[0][: len(theirs)]
        mine = model.backend.run(model.backend.make_batch(check, None, [options] * len(check)),
                                 [options] * len(check))
        width = model.runner.dimensions if hasattr(mine[0], "ids") else len(mine[0])
        cosines.append(min_cosine(dense_rows(mine, width), dense_rows(theirs, width)))
    result["min_cosine_vs_torch"] = min(cosines)
    del model
    return result


def bench_sentence_transformers(
    spec: ModelSpec, path: Path, mixes: dict[str, MixInputs], entry: dict[str, Any],
    ours_for_check: dict[str, list[Any]], args: argparse.Namespace, device: Any, budget: int,
) -> dict[str, Any]:
    import torch

    # fp16 for BERT-family models (the issue's comparison); bf16 where infercore itself runs bf16
    # (Qwen-family models are unstable in fp16).
    dtype = torch.bfloat16 if entry["dtype"] == "bfloat16" else torch.float16
    if device.type != "cuda":
        dtype = torch.float32
    try:
        st_model = load_sentence_transformers(path, spec.task, device, dtype)
    except Exception as exc:  # report, keep benchmarking the rest
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "mixes": {}}
    cosines = []
    for mix_name, inputs in mixes.items():
        longest = max(len(s) for s in inputs.ids)
        batch_size = max(1, budget // longest)  # the same token budget, counted with padding
        st_encode(st_model, inputs.texts[: 2 * batch_size], batch_size)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        st_encode(st_model, inputs.texts, batch_size)
        synchronize(device)
        elapsed = time.perf_counter() - started
        tokens_per_s = inputs.tokens / elapsed
        st_counts = [len(x) for x in st_model.tokenizer(inputs.texts, truncation=True, max_length=512)["input_ids"]]
        ours = entry["mixes"][mix_name]
        out["mixes"][mix_name] = {
            "batch_size": batch_size,
            "seconds": elapsed,
            "tokens_per_s": tokens_per_s,
            "st_token_count_matches": sum(st_counts) == inputs.tokens,
        }
        ours["ratio_vs_st"] = ours["tokens_per_s"] / tokens_per_s
        ours["ratio_vs_st_prepacked"] = ours["tokens_per_s_prepacked"] / tokens_per_s
        check = ours_for_check[mix_name]
        theirs = st_encode(st_model, inputs.texts[: len(check)], len(check))
        width = theirs.shape[1]
        cosines.append(min_cosine(dense_rows(check, width), theirs.float().cpu()))
    out["min_cosine_vs_infercore"] = min(cosines)
    query = st_model.tokenizer.decode(single_query(mixes["queries"])[1:-1])  # without [CLS] / [SEP]
    times = []
    for i in range(10 + (5 if args.dry_run else 100)):
        started = time.perf_counter()
        st_encode(st_model, [query], 1)
        synchronize(device)
        if i >= 10:
            times.append((time.perf_counter() - started) * 1e3)
    out["latency_single_query"] = percentiles(times)
    del st_model
    return out


# ---- kernels -------------------------------------------------------------------------------------


def kernel_cases(device: Any, dry_run: bool) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(JSON name, registry case, Triton tuning options): the sample cases of ``kernels.registry``
    drawn at serving shapes (dry run: tiny), each in the dtype its models run."""
    import torch

    from infercore.kernels.registry import SPECS
    from infercore.kernels.spec import SampleShapes

    half = torch.float16 if device.type == "cuda" else torch.float32
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = (12,) if dry_run else (16384,)
    # SPLADE: 48 passages of ~330 tokens through BERT-base's vocabulary product. Small blocks under
    # the interpreter, so a tiny case still spans several of each.
    splade = (SampleShapes(32, 0, 0, 300, lengths=(5, 17, 3)) if dry_run
              else SampleShapes(768, 0, 0, 30522, lengths=(330,) * 48))
    splade_blocks = {"block_t": 16, "block_v": 64, "block_k": 16} if dry_run else {}
    # Segment pooling fused with truncation + L2: 50 passages of ~330 tokens, hidden 1024.
    pooling = SampleShapes(40, 0, 0, lengths=(4, 1, 9)) if dry_run else SampleShapes(1024, 0, 0, lengths=(330,) * 50)
    # add_layer_norm and bias + GELU at BERT-base's widths in fp16; the RMSNorms at Qwen3's in bf16.
    bert = SampleShapes(24, 40, 8, lengths=tokens) if dry_run else SampleShapes(768, 3072, 64, lengths=tokens)
    qwen3 = (SampleShapes(32, 0, 8, lengths=tokens) if dry_run
             else SampleShapes(1024, 0, 128, lengths=tokens, heads=16))
    rows = [  # (kernel, registry case, JSON name, shapes, dtype, Triton options)
        ("splade_pool", "splade_pool", "splade_pool", splade, half, splade_blocks),
        ("segment_pool", "segment_pool_mean_normalize", "segment_pool_mean_normalize", pooling, bf16, {}),
        ("segment_pool", "segment_pool_last_normalize", "segment_pool_last_normalize", pooling, bf16, {}),
        ("fused_norm", "add_layer_norm", "add_layer_norm", bert, half, {}),
        ("fused_norm", "add_rms_norm", "add_rms_norm", qwen3, bf16, {}),
        ("fused_norm", "rms_norm_heads", "rms_norm_heads", qwen3, bf16, {}),
        ("bias_gelu", "bias_gelu_none", "bias_gelu", bert, half, {}),
    ]
    specs = {spec.name: spec for spec in SPECS}
    generator = torch.Generator().manual_seed(0)
    for kernel, case_name, json_name, shapes, dtype, options in rows:
        cases = {case.name: case for case in specs[kernel].sample_cases(shapes, device, dtype, generator)}
        yield json_name, cases[case_name], options


def bench_kernels(device: Any, dry_run: bool) -> dict[str, Any]:

    out: dict[str, Any] = {"timing_meaningful": device.type == "cuda", "cases": {}}
    for name, case, options in kernel_cases(device, dry_run):
        try:
            out["cases"][name] = bench_kernel(
                name, case.shape, lambda c=case, o=options: c.run_triton(**o), case.run_reference, device, dry_run
            )
        except Exception as exc:  # report, time the other kernels
            out["cases"][name] = {"shape": case.shape, "error": describe(exc)}
            print(f"  kernel {name:<28} FAILED: {describe(exc)}", flush=True)
        release_memory(device)
    return out


def bench_kernel(
    name: str, shape: dict[str, Any], triton_call: Callable, reference_call: Callable, device: Any, dry_run: bool,
) -> dict[str, Any]:
    import torch

    expected, got = reference_call(), triton_call()
    case: dict[str, Any] = {
        "shape": shape,
        "max_abs_diff": float((got.float() - expected.float()).abs().max()),
        "max_abs_reference": float(expected.float().abs().max()),
    }
    repeats = 1 if dry_run else 20
    case["triton_ms"] = time_op_ms(triton_call, device, repeats, warmup=0 if dry_run else 3)
    case["reference_ms"] = time_op_ms(reference_call, device, repeats, warmup=0 if dry_run else 3)
    case["speedup"] = case["reference_ms"] / case["triton_ms"]
    if device.type == "cuda" and name == "splade_pool":
        for side, call in (("triton", triton_call), ("reference", reference_call)):
            release_memory(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            call()
            case[f"{side}_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    print(f"  kernel {name:<28} triton {case['triton_ms']:8.3f} ms  torch {case['reference_ms']:8.3f} ms  "
          f"x{case['speedup']:5.2f}  max diff {case['max_abs_diff']:.2e}", flush=True)
    return case


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:2000]}"


# ---- targets, output -----------------------------------------------------------------------------


def evaluate_targets(models: dict[str, Any], sparse_vs_dense: dict[str, Any]) -> dict[str, Any]:
    """Issue 9's targets on this run's figures; None where the model was not run."""
    dense = models.get("bert-base", {}).get("mixes", {}).get("passages", {})
    ratio = sparse_vs_dense.get("mixes", {}).get("passages", {}).get("ratio")
    latency = models.get("bert-base", {}).get("latency_single_query", {}).get("p50_ms")

    def target(measured: float | None, goal: float, higher_is_better: bool = True) -> dict[str, Any]:
        met = None if measured is None else (measured >= goal if higher_is_better else measured <= goal)
        return {"target": goal, "measured": measured, "met": met}

    return {
        "bert_base_passages_mfu": target(dense.get("mfu"), 0.45),
        "bert_base_passages_mfu_prepacked": target(dense.get("mfu_prepacked"), 0.45),
        "bert_base_passages_ratio_vs_st_fp16": target(dense.get("ratio_vs_st"), 3.0),
        "splade_over_dense_passages": target(ratio, 0.75),
        "single_query_p50_ms": target(latency, 3.0, higher_is_better=False),
    }


def sparse_over_dense(models: dict[str, Any]) -> dict[str, Any]:
    sparse, dense = models.get("bert-base-mlm"), models.get("bert-base")
    if not sparse or not dense:
        return {"note": "needs both bert-base-mlm and bert-base"}
    mixes = {}
    for mix in sparse["mixes"]:
        s, d = sparse["mixes"][mix]["tokens_per_s"], dense["mixes"][mix]["tokens_per_s"]
        mixes[mix] = {"sparse_tokens_per_s": s, "dense_tokens_per_s": d, "ratio": s / d}
    return {"sparse": "bert-base-mlm", "dense": "bert-base", "mixes": mixes}


def plot(results: dict[str, Any], path: Path) -> str | None:
    """One PNG: tokens/s vs ST, MFU, kernel speedups, single-query latency. None when it was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    models = measured(results["models"])
    mixes = list(next(iter(models.values()))["mixes"]) if models else []
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    title = f"infercore on {results['device']['name']}" + (" (DRY RUN: tiny CPU models)" if results["dry_run"] else "")
    fig.suptitle(title)
    width = 0.8 / max(1, 2 * len(mixes))
    ax = axes[0][0]
    for j, mix in enumerate(mixes):
        xs = [i - 0.4 + (2 * j + 0.5) * width for i in range(len(models))]
        ax.bar(xs, [m["mixes"][mix]["tokens_per_s"] for m in models.values()], width, label=f"infercore {mix}")
        st = [m["sentence_transformers"].get("mixes", {}).get(mix, {}).get("tokens_per_s", 0) for m in models.values()]
        ax.bar([x + width for x in xs], st, width, label=f"ST {mix}", alpha=0.5)
    ax.set_xticks(range(len(models)), list(models), rotation=15)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.set_title("throughput at saturation (pack + run) vs sentence-transformers")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[0][1]
    for j, mix in enumerate(mixes):
        step = 0.8 / len(mixes)
        xs = [i - 0.4 + (j + 0.5) * step for i in range(len(models))]
        ax.bar(xs, [m["mixes"][mix]["mfu"] for m in models.values()], step, label=mix)
    ax.axhline(0.45, color="red", linestyle="--", label="target 45%")
    ax.set_xticks(range(len(models)), list(models), rotation=15)
    ax.set_ylabel("model FLOP utilisation")
    ax.set_title("MFU (useful FLOPs / measured matmul rate)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    cases = {name: c for name, c in results["kernels"]["cases"].items() if "error" not in c}
    ax.barh(list(cases), [c["speedup"] for c in cases.values()])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of the Triton kernel over its torch reference")
    ax.set_title("kernels" + ("" if results["kernels"]["timing_meaningful"] else " (interpreter: not meaningful)"))
    ax = axes[1][1]
    names = list(models)
    p50 = [models[n]["latency_single_query"]["p50_ms"] for n in names]
    p99 = [models[n]["latency_single_query"]["p99_ms"] for n in names]
    st50 = [models[n]["sentence_transformers"].get("latency_single_query", {}).get("p50_ms", 0) for n in names]
    xs = range(len(names))
    ax.bar([x - 0.25 for x in xs], p50, 0.25, label="infercore p50")
    ax.bar(list(xs), p99, 0.25, label="infercore p99")
    ax.bar([x + 0.25 for x in xs], st50, 0.25, label="ST p50", alpha=0.5)
    ax.axhline(3.0, color="red", linestyle="--", label="target p50 3 ms")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("ms")
    ax.set_title(f"one {QUERY_TOKENS}-token query")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def print_table(results: dict[str, Any]) -> None:
    print()
    print(f"{'model':<18} {'mix':<9} {'tok/s':>11} {'prepacked':>11} {'MFU':>6} {'ST tok/s':>10} {'x ST':>6}")
    models = measured(results["models"])
    for name, m in models.items():
        for mix, row in m["mixes"].items():
            st = m["sentence_transformers"].get("mixes", {}).get(mix, {}).get("tokens_per_s")
            st_text = f"{st:>10,.0f}" if st else f"{'-':>10}"
            ratio = row.get("ratio_vs_st")
            print(f"{name:<18} {mix:<9} {row['tokens_per_s']:>11,.0f} {row['tokens_per_s_prepacked']:>11,.0f} "
                  f"{row['mfu']:>6.1%} {st_text} {ratio if ratio else 0:>6.2f}")
    print()
    print(f"{'model':<18} {'mix':<9} {'onnx tok/s':>11} {'x torch':>8} {'min cos':>9}  (--backend onnx, fp32)")
    for name, m in models.items():
        onnx = m.get("onnx", {})
        if "mixes" not in onnx:
            print(f"{name:<18} {'-':<9} {(onnx.get('skipped') or onnx.get('error') or '-')[:90]}")
            continue
        for mix, row in onnx["mixes"].items():
            print(f"{name:<18} {mix:<9} {row['tokens_per_s']:>11,.0f} {row['ratio_vs_torch']:>8.2f} "
                  f"{onnx['min_cosine_vs_torch']:>9.6f}")
    print()
    print(f"{'model':<18} {'query p50 ms':>12} {'p99 ms':>8} {'ST p50 ms':>10} {'fused on/off':>13}")
    for name, m in models.items():
        lat, off = m["latency_single_query"], m["fused_kernels_off"]
        st = m["sentence_transformers"].get("latency_single_query", {}).get("p50_ms", float("nan"))
        print(f"{name:<18} {lat['p50_ms']:>12.2f} {lat['p99_ms']:>8.2f} {st:>10.2f} {off['speedup_from_fused']:>13.2f}")
    print()
    for name, t in results["targets"].items():
        value = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"target {name:<38} goal {t['target']:<5} measured {value:<8} met {t['met']}")


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on CPU, few inputs (checks the suite)")
    parser.add_argument("--only", default=None, help="comma-separated subset of the models")
    parser.add_argument("--seconds", type=float, default=None, help="minimum seconds per throughput measurement")
    parser.add_argument("--dtype", default="auto", help="infercore's dtype (auto: each family's CUDA default)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="token budget (default: the CUDA default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder of the random checkpoints (full run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.0 if args.dry_run else 1.5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.dry_run:
        # CPU only: the Triton kernels run under the interpreter (before any kernel is compiled).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import sentence_transformers
    import torch
    import transformers

    from infercore.server.config import DEFAULT_MAX_BATCH_TOKENS

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: run with --dry-run, or on a GPU host", file=sys.stderr)
        return 2
    if args.dry_run:
        args.dtype = "float32"
        # Tiny models gain nothing from intra-op threads, and spinning OpenMP workers on a busy
        # machine (CI) cost more than the work.
        torch.set_num_threads(1)
    budget = args.max_batch_tokens or (1024 if args.dry_run else DEFAULT_MAX_BATCH_TOKENS["cuda"])
    specs = model_specs()
    names = [n.strip() for n in (args.only or ",".join(specs)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(specs))
    if unknown:
        print(f"unknown models {unknown}; known: {', '.join(specs)}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_info = {"name": props.name, "memory_gib": props.total_memory / 2**30,
                       "multiprocessors": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        device_info = {"name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    device_info["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "sentence_transformers": sentence_transformers.__version__}
    out = args.out / ("bench_gpu_dry_run.json" if args.dry_run else "bench_gpu.json")
    results: dict[str, Any] = {
        "benchmark": "bench_gpu", "dry_run": args.dry_run, "device": device_info,
        "max_batch_tokens": budget, "seconds_per_measurement": args.seconds,
    }
    print(f"device: {device_info['name']}; token budget {budget}", flush=True)

    results["ceilings"] = measure_ceilings(device, args.dry_run)
    peak = {k: v["best"] for k, v in results["ceilings"]["matmul_tflops"].items()}
    print(f"  matmul TFLOP/s: {', '.join(f'{k} {v:.1f}' for k, v in peak.items())}; "
          f"copy GB/s: {results['ceilings']['copy_gbps']}", flush=True)

    with contextlib.ExitStack() as stack:
        if args.dry_run:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-dry-")))
        else:
            root = args.cache
        # The onnx side's exported graphs: beside the checkpoints (reused by the next run), unless set.
        os.environ.setdefault("INFERCORE_CACHE_DIR", str(root / "infercore-cache"))
        build_device = "cuda" if device.type == "cuda" else "cpu"
        paths = {n: build_checkpoint(n, specs[n], root, args.dry_run, build_device) for n in names}
        tokenizer_file = paths[names[0]] / "tokenizer.json"
        mix_specs = DRY_MIXES if args.dry_run else MIXES
        texts = {m: make_texts(tokenizer_file, spec, args.seed + i) for i, (m, spec) in enumerate(mix_specs.items())}
        results["mixes"] = {m: vars(s) for m, s in mix_specs.items()}

        from infercore.models.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_file(tokenizer_file, 512)
        mixes = {}
        for mix, mix_texts in texts.items():
            ids = [t.ids for t in tokenizer.encode_batch(mix_texts, truncate=True)]
            mixes[mix] = MixInputs(mix_texts, ids, budget_batches(ids, budget))

        results["models"] = {}
        for name in names:
            print(f"{name}: {specs[name].label}", flush=True)
            try:
                results["models"][name] = bench_model(name, specs[name], paths[name], mixes, peak, args, device,
                                                      budget)
            except Exception as exc:  # report it in the JSON, benchmark the other models
                results["models"][name] = {"label": specs[name].label, "error": describe(exc)}
                print(f"  {name:<18} FAILED: {describe(exc)}", flush=True)
                release_memory(device)
            write_json(results, out, started)  # a run cut short still leaves what it measured
    models = measured(results["models"])
    results["sparse_vs_dense"] = sparse_over_dense(models)
    print("kernels (Triton vs torch reference):", flush=True)
    results["kernels"] = bench_kernels(device, args.dry_run)
    results["targets"] = evaluate_targets(models, results["sparse_vs_dense"])
    failed = sorted([n for n, m in results["models"].items() if "error" in m] +
                    [f"kernel {n}" for n, c in results["kernels"]["cases"].items() if "error" in c])
    results["failed"] = failed

    png = out.with_suffix(".png")
    plot_error = plot(results, png) if models else "no model was measured"
    results["plots"] = [] if plot_error else [png.name]
    if plot_error:
        results["plots_error"] = plot_error
    write_json(results, out, started)
    print_table(results)
    print(f"wrote {out}{'' if plot_error else f' and {png.name}'} in {results['elapsed_s']:.0f}s")
    if failed:
        print(f"FAILED: {', '.join(failed)} (errors in the JSON)", file=sys.stderr)
        return 1
    return 0


def measured(models: dict[str, Any]) -> dict[str, Any]:
    """The models whose benchmark ran to the end (failed ones carry only label and error)."""
    return {name: m for name, m in models.items() if "error" not in m}


def write_json(results: dict[str, Any], path: Path, started: float) -> None:
    results["elapsed_s"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
