"""The ONNX backend's quality over HTTP, as a user sees it: the starter models served three times
(``--backend torch``, ``--backend onnx``, ``--backend onnx --quantize int8``), each a fresh server
process on 127.0.0.1.

- Dense (all-MiniLM-L6-v2, ``/embed``): held-out texts (every other one of bench_onnx_int8's 700
  corpus texts) plus short and odd inputs (single characters, whitespace, other scripts, code,
  repeated words, texts longer than the window, cut with ``truncate``), each against fp32
  sentence-transformers in this process: min cosine. Floors: fp32 0.99999, int8 0.99.
- Sparse (splade-tiny, ``/embed_sparse``): the first 64 of those texts; term sets against the torch
  backend's (fp32: identical sets expected) and the overlap of the top-20 terms (int8).

    python benchmarks/check_onnx_quality.py [--port 18181]

Prints one line per side and PASS/FAIL per floor; writes benchmarks/results/check_onnx_quality.json;
exits 1 when a floor is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_onnx_int8
import peers

RESULTS = Path(__file__).resolve().parent / "results" / "check_onnx_quality.json"
SIDES = {"torch": ["--backend", "torch"], "onnx": ["--backend", "onnx"],
         "onnx-int8": ["--backend", "onnx", "--quantize", "int8"]}
FLOORS = {"onnx": 0.99999, "onnx-int8": 0.99}
READY_TIMEOUT_S = 900
SPARSE_TEXTS = 64
ODD_TEXTS = [
    "?", "a", "hi", "42", "ok!!!", "I love you", "New York", "    ", "\n\n", "😀😀😀", "café naïve résumé",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "我喜欢吃苹果", "Привет, как дела?",
    "def f(x): return x * 2", "SELECT * FROM users WHERE id = 1;", "https://example.com/a/b?c=d",
    "1 2 3 4 5 6 7 8 9 10", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "THE QUICK BROWN FOX", "the quick brown fox",
    "What is the capital of France?", "How do I reset my password?", "Error: connection refused (errno 111)",
    "The " * 300, "lorem ipsum dolor sit amet " * 40,
]


def texts() -> list[str]:
    return bench_onnx_int8.held_out_texts()[::2] + ODD_TEXTS


def side(name: str, args: list[str], port: int, logs: Path, inputs: list[str]) -> tuple[list, list]:
    """One fresh ``infercore serve`` with ``args``: dense vectors of every input, sparse rows of the first
    SPARSE_TEXTS."""
    with peers.running(peers.infercore_server(port, logs / f"{name}.log", args), READY_TIMEOUT_S):
        dense = []
        for start in range(0, len(inputs), 32):
            dense += peers.embed_infercore(port, inputs[start:start + 32], timeout_s=300)
        status, _, sparse = peers.http_call(port, "POST", "/embed_sparse",
                                            {"inputs": inputs[:SPARSE_TEXTS], "truncate": True}, timeout_s=300)
        if status != 200:
            raise RuntimeError(f"infercore /embed_sparse answered {status}: {sparse}")
        return dense, sparse


def terms(row: list[dict], k: int | None = None) -> set[int]:
    ranked = sorted(row, key=lambda e: -e["value"])
    return {e["index"] for e in (ranked if k is None else ranked[:k])}


def main() -> int:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18181)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    inputs = texts()
    reference = SentenceTransformer(str(bench_onnx_int8.default_model_dir()), device="cpu").encode(inputs,
                                                                                                    batch_size=32)
    report: dict = {"texts": len(inputs), "sides": {}}
    sparse: dict[str, list] = {}
    failed = []
    with tempfile.TemporaryDirectory() as cache:  # every graph exported in this run, and only for it
        os.environ["INFERCORE_CACHE_DIR"] = cache  # the servers inherit it
        for name, flags in SIDES.items():
            dense, sparse[name] = side(name, flags, args.port, Path(cache) / "logs", inputs)
            cos = bench_onnx_int8.cosines(np.asarray(dense, dtype=np.float32), reference)
            worst = int(np.argmin(cos))
            entry = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                     "worst_text": inputs[worst][:40]}
            line = f"{name:10s} dense min cos {cos.min():.7f} (worst: {inputs[worst][:20]!r})"
            if name in FLOORS:
                ok = cos.min() >= FLOORS[name]
                entry["floor"], entry["pass"] = FLOORS[name], bool(ok)
                line += f"  floor {FLOORS[name]}: {'PASS' if ok else 'FAIL'}"
                failed += [] if ok else [f"{name} dense"]
            report["sides"][name] = entry
            print(line, flush=True)
    for name in ("onnx", "onnx-int8"):
        pairs = list(zip(sparse[name], sparse["torch"]))
        overlap = [len(terms(a, 20) & terms(b, 20)) / max(1, min(20, len(terms(b)))) for a, b in pairs]
        identical = sum(terms(a) == terms(b) for a, b in pairs)
        entry = {"identical_term_sets": identical, "texts": len(pairs), "min_top20_overlap": min(overlap),
                 "mean_top20_overlap": float(np.mean(overlap))}
        line = (f"{name:10s} sparse vs torch: identical term sets {identical}/{len(pairs)}, top-20 overlap "
                f"min {min(overlap):.2f} mean {np.mean(overlap):.3f}")
        if name == "onnx":
            ok = identical == len(pairs)
            entry["pass"] = ok
            line += f"  identical sets expected: {'PASS' if ok else 'FAIL'}"
            failed += [] if ok else ["onnx sparse"]
        report["sides"][name]["sparse"] = entry
        print(line, flush=True)
    report["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
