"""Sparse (SPLADE / ELSER) expansion: peak memory and tokens/s, fused against naive, one run.

The step measured turns the MLM head's transformed hidden states of a packed batch into [B, V]
term weights, ``max over tokens of log1p(relu(hidden · decoder_weight + bias))``. Paths, all on the
same random inputs (hidden [T, H], decoder weight [V, H], bias [V], written once to a file that
every path loads):

- fused:        ``kernels.splade_pool.splade_pool``: the tiled reference on CPU, the Triton kernel
                on CUDA. Holds at most a tile of logits.
- naive packed: ``F.linear`` over the packed tokens → [T, V] logits, then sentence-transformers'
                ``SpladePooling`` on those flat logits (its unpadded path: relu → log1p → max per
                sequence), which is also what TEI's flash path does.
- naive padded: the batch laid out as [B, S, H] → ``F.linear`` → [B, S, V] logits (what
                transformers' ``BertForMaskedLM`` returns), then ``SpladePooling`` on the padded
                logits and attention mask (mask multiply, relu_, log1p_, max over S).

Each path runs in its own fresh subprocess: load inputs, one untimed full-size warm-up call (thread
pools, BLAS kernels, Triton compilation), then the baseline is taken and the path is timed
``--repeats`` times (median reported). Peak memory is the growth over that baseline: on CPU the peak
RSS (VmHWM, reset to the current RSS through /proc/self/clear_refs) minus the RSS at the baseline; on
CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``. On CPU the subprocesses run with
glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``), so blocks the warm-up freed leave the RSS
instead of being reused unseen by the timed runs. Inputs themselves (including the padded copy) are
in the baseline; the [B, V] result is in every path's growth. Tokens/s counts real tokens, padding
excluded. "vs fused" columns are path / fused (memory: how many times more; tokens/s: below 1 is
slower). Outputs must agree with the fused path's.

Default shape: 64 sequences x 512 tokens (all full length, so the padded layout has no padding;
``--min-len`` mixes lengths), vocab 30522 and hidden 768 (ELSER / BERT-base). The naive paths hold
[T, V] fp32 logits: 4 GiB at this shape, about twice that for the padded form.

    python benchmarks/bench_sparse_memory.py [--quick] [--device auto|cpu|cuda] [--threads N]
        [--repeats 3] [--seqs 64] [--seq-len 512] [--min-len N] [--vocab 30522] [--hidden 768]

Writes benchmarks/results/bench_sparse_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("fused", "naive packed", "naive padded")
QUICK = {"seqs": 16, "seq_len": 128, "repeats": 2}
# Blocks from 64 KiB up are mmapped and returned on free (glibc's default threshold adapts upward).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
MAX_ABS_DIFF = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
MIB = 1 << 20
NOISY_SPREAD = 1.3  # slowest / fastest repeat of one path above this: the machine was not quiet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller shapes: {QUICK}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(MAX_ABS_DIFF), default="float32", help="hidden and weight dtype")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    parser.add_argument("--seqs", type=int, default=64, help="sequences in the batch")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (the longest)")
    parser.add_argument("--min-len", type=int, default=None, help="shortest sequence (default: all --seq-len)")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    # One path in this process (the parent starts these).
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# ---- one path, in a fresh process ----------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Sets VmHWM back to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_child(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from infercore.kernels.splade_pool import splade_pool

    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    device = torch.device(inputs["device"])
    hidden = inputs["hidden"].to(device)
    weight = inputs["weight"].to(device)
    bias = inputs["bias"].to(device)
    lengths: list[int] = inputs["lengths"]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    cu_seqlens = cu_seqlens.to(device)

    if args.child == "fused":
        def run() -> torch.Tensor:
            return splade_pool(hidden, weight, bias, cu_seqlens)
    else:
        from sentence_transformers.sparse_encoder.modules import SpladePooling

        pooling = SpladePooling(pooling_strategy="max").eval()
        if args.child == "naive packed":
            def run() -> torch.Tensor:
                logits = F.linear(hidden, weight, bias).unsqueeze(0)  # [1, T, V]
                return pooling({"token_embeddings": logits, "cu_seq_lens_q": cu_seqlens})["sentence_embedding"]
        else:
            # The padded layout, [B, S, H] zero-padded on the right, and the [B, S] 0/1 attention mask.
            width = max(lengths)
            slots = torch.cat([torch.arange(i * width, i * width + n) for i, n in enumerate(lengths)]).to(device)
            padded = hidden.new_zeros(len(lengths) * width, hidden.shape[1])
            padded[slots] = hidden
            padded = padded.view(len(lengths), width, -1)
            mask = torch.zeros(len(lengths) * width, dtype=torch.int64, device=device)
            mask[slots] = 1
            mask = mask.view(len(lengths), width)

            def run() -> torch.Tensor:
                logits = F.linear(padded, weight, bias)  # [B, S, V]
                return pooling({"token_embeddings": logits, "attention_mask": mask})["sentence_embedding"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        run()  # warm-up
        sync()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            peak_reset = True
        else:
            peak_reset = _reset_peak_rss()
            baseline = _status_kib("VmRSS") * 1024
        times, out = [], None
        for _ in range(args.repeats):
            out = None  # the previous result is not part of this run's peak
            started = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - started)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _status_kib("VmHWM") * 1024
    torch.save(out.float().cpu(), args.result)
    print(json.dumps({"times_s": times, "peak_growth_bytes": peak - baseline, "baseline_bytes": baseline,
                      "peak_reset": peak_reset}))
    return 0


# ---- the parent: inputs, one subprocess per path, table, JSON ------------------------------

def main() -> int:
    args = parse_args()
    if args.child:
        return run_child(args)

    import torch

    from infercore.kernels import splade_pool as splade_module

    load_at_start = os.getloadavg()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    min_len = args.min_len if args.min_len is not None else args.seq_len
    lengths = torch.randint(min_len, args.seq_len + 1, (args.seqs,), generator=gen).tolist()
    tokens = sum(lengths)
    # Logits ~ N(-3, 1): most terms of a sequence stay at weight 0, as with trained SPLADE heads.
    inputs = {
        "device": device,
        "lengths": lengths,
        "hidden": torch.randn(tokens, args.hidden, generator=gen).to(dtype),
        "weight": (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(dtype),
        "bias": (torch.randn(args.vocab, generator=gen) * 0.1 - 3.0).to(dtype),
    }

    sides: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="bench_sparse_") as tmp:
        inputs_file = Path(tmp) / "inputs.pt"
        torch.save(inputs, inputs_file)
        del inputs
        for path in PATHS:
            result_file = Path(tmp) / f"{path.replace(' ', '_')}.pt"
            command = [
                sys.executable, str(Path(__file__).resolve()), "--child", path, "--inputs", str(inputs_file),
                "--result", str(result_file), "--threads", str(args.threads), "--repeats", str(args.repeats),
            ]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
            if done.returncode != 0:
                print(f"{path}: failed (exit {done.returncode})\n{done.stderr[-4000:]}", file=sys.stderr)
                return 1
            side = json.loads(done.stdout.strip().splitlines()[-1])
            median = statistics.median(side["times_s"])
            side.update(median_s=median, min_s=min(side["times_s"]), tokens_per_s=tokens / median,
                        peak_growth_mib=side["peak_growth_bytes"] / MIB)
            sides[path] = side
            outputs[path] = torch.load(result_file)

    fused = sides["fused"]
    for path, side in sides.items():
        side["max_abs_diff_vs_fused"] = float((outputs[path] - outputs["fused"]).abs().max())
        side["memory_vs_fused"] = side["peak_growth_bytes"] / max(fused["peak_growth_bytes"], 1)
        side["tokens_per_s_vs_fused"] = side["tokens_per_s"] / fused["tokens_per_s"]
    agree = all(side["max_abs_diff_vs_fused"] <= MAX_ABS_DIFF[args.dtype] for side in sides.values())
    fused_impl = (
        "Triton kernel" if device == "cuda"
        else f"tiled reference, {splade_module.CHUNK_TOKENS} tokens x {splade_module.VOCAB_BLOCK} terms"
    )

    print(f"sparse expansion on {device} ({args.dtype}): {args.seqs} sequences, {tokens} tokens "
          f"(lengths {min(lengths)}-{max(lengths)}), vocab {args.vocab}, hidden {args.hidden}, "
          f"threads={args.threads}, repeats={args.repeats}; fused = {fused_impl}")
    print(f"{'path':<14} {'peak MiB':>10} {'vs fused':>9} {'median s':>9} {'tokens/s':>10} {'vs fused':>9} "
          f"{'max|diff|':>10}   runs (s)")
    for path, side in sides.items():
        runs = ", ".join(f"{t:.2f}" for t in side["times_s"])
        print(f"{path:<14} {side['peak_growth_mib']:>10.1f} {side['memory_vs_fused']:>8.1f}x "
              f"{side['median_s']:>9.3f} {side['tokens_per_s']:>10.0f} {side['tokens_per_s_vs_fused']:>8.2f}x "
              f"{side['max_abs_diff_vs_fused']:>10.2e}   {runs}")
    if not all(side["peak_reset"] for side in sides.values()):
        print("WARNING: could not reset the peak RSS (/proc/self/clear_refs); CPU peaks include loading the inputs")
    print(f"outputs agree (max |diff| <= {MAX_ABS_DIFF[args.dtype]}): {'ok' if agree else 'FAIL'}")
    spread = max(max(side["times_s"]) / min(side["times_s"]) for side in sides.values())
    if spread > NOISY_SPREAD:
        print(f"WARNING: repeats of one path differ by {spread:.2f}x: other processes were competing for the cores "
              "(the fused path's many short parallel regions stall worst when a worker is descheduled); "
              "rerun on a quiet machine")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {os.cpu_count()} cores")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_sparse_memory.json"
    out.write_text(json.dumps({
        "benchmark": "bench_sparse_memory",
        "device": device,
        "dtype": args.dtype,
        "fused_implementation": fused_impl,
        "seqs": args.seqs,
        "lengths": lengths,
        "tokens": tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "paths": sides,
        "outputs_agree": agree,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "load_average_at_start": load_at_start,
            "load_average_at_end": load,
            "worst_repeat_spread": spread,
        },
    }, indent=2))
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
