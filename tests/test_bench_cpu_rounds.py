"""bench_cpu's ``--rounds``: a side measured several times reports each point's best round, keeps
every round's figures, and a round that failed does not erase one that ran."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_cpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules (corpus, peers)
    try:
        spec = importlib.util.spec_from_file_location("bench_cpu_under_test", ROOT / "benchmarks" / "bench_cpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def point(clients: int, rate: float, p50: float) -> dict:
    return {"clients": clients, "tokens_per_s": rate, "p50_s": p50}


def test_each_point_keeps_its_best_round_and_every_round_is_recorded():
    best_of = bench_cpu().best_of
    first = {"ready_s": 3.0, "sweep": {"passages": [point(1, 100.0, 0.5), point(2, 180.0, 0.9)]}}
    second = {"ready_s": 9.0, "sweep": {"passages": [point(1, 90.0, 0.4), point(2, 200.0, 0.8)]}}
    merged = best_of(best_of(None, first), second)
    assert merged["sweep"]["passages"] == [point(1, 100.0, 0.5), point(2, 200.0, 0.8)]  # latency from that round
    assert merged["rounds"] == [first["sweep"], second["sweep"]]
    assert merged["ready_s"] == 3.0  # the first round's side facts

    failed = {"error": "RuntimeError: server died"}
    assert best_of(merged, failed) is merged
    assert best_of(None, failed) == failed
    assert best_of(failed, first)["sweep"] == first["sweep"]
