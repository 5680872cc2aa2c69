"""How many tokens one ONNX Runtime call should hold on CPU: int8 tokens/s by rows of full-window
(256-token) inputs per call, one executor alone and one per core at once.

With every core computing, calls whose activations leave the cache run slower per token; the CPU
call cap (``models/onnx_backend.py``, ``CPU_CALL_FFN_ACTIVATIONS``) is set from this. Each model's
served int8 graph without padding, sessions of one intra-op thread as the executors run them, the
workers on threads of this process (a one-thread session computes on its caller's thread), the
better of two timings per point; the cap itself is bypassed (the graph is called directly).

    python benchmarks/bench_onnx_call_size.py [--models minilm,bert-base] [--rows 1,2,4,8,16]

Models as bench_cpu builds them (all-MiniLM-L6-v2's real weights; a random BERT-base-size encoder).
Writes benchmarks/results/bench_onnx_call_size.json (``make bench-onnx-call-size``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu

RESULTS = Path(__file__).resolve().parent / "results" / "bench_onnx_call_size.json"
WINDOW = 256
TOKENS_PER_POINT = {"minilm": 32 * WINDOW, "bert-base": 8 * WINDOW}  # per worker and timing


def rates(model_dir: Path, rows: list[int], tokens_per_point: int) -> dict[str, dict[int, float]]:
    import numpy as np
    import torch

    from infercore.models.loader import load_model
    from infercore.models.onnx_backend import open_session

    model = load_model("int8", model_dir, "cpu", backend="onnx", quantize="int8")
    graphs = model.backend.graphs
    path = graphs.unpadded.get("") or graphs.files[""]
    session = open_session(path, torch.device("cpu"), 1)
    names = {i.name for i in session.get_inputs()}
    generator = np.random.default_rng(0)
    out: dict[str, dict[int, float]] = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        out[str(workers)] = {}
        for n in rows:
            ids = generator.integers(1000, 20000, size=(n, WINDOW), dtype=np.int64)
            feeds = {"input_ids": ids}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            if "attention_mask" in names:
                feeds["attention_mask"] = np.ones_like(ids)
            session.run(None, feeds)
            calls = max(2, tokens_per_point // (n * WINDOW))

            def work(calls=calls, feeds=feeds):
                for _ in range(calls):
                    session.run(None, feeds)

            best = 0.0
            for _ in range(2):
                threads = [threading.Thread(target=work) for _ in range(workers)]
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                best = max(best, workers * calls * n * WINDOW / (time.perf_counter() - started))
            out[str(workers)][n] = best
            print(f"  {workers} worker(s), {n:2d} x {WINDOW} tokens per call: {best:8.0f} tok/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--rows", default="1,2,4,8,16")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    report = {"machine": {"cores": os.cpu_count(), "load_average_before": list(os.getloadavg())}, "models": {}}
    for name, model_dir in bench_cpu.model_dirs(args.models.split(",")).items():
        print(f"{name}: int8, tokens/s by rows per call", flush=True)
        report["models"][name] = rates(model_dir, rows, TOKENS_PER_POINT.get(name, 8 * WINDOW))
    report["machine"]["load_average_after"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
