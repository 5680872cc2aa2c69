"""Throughput of 1, 2 and 4 ``infercore serve`` processes on one host behind a round-robin proxy
(tests/replica_proxy.py), the same workload each time: how much a replica adds, and what it costs.

Each replica serves all-MiniLM-L6-v2 (the starter weights) on CPU with its share of the host's cores
(``--cpu-workers max(1, cores // replicas)``, one intra-op thread each, one tokenizer thread), the
way pods split a node. The workload is the ingest one of bench_grpc.py: closed loop, requests of 16
corpus passages (``truncate: true``), ``--concurrency`` clients from loadgen.py's worker processes,
through the proxy; the first ``--warmup`` seconds of each phase are left out.

Printed per replica count: inputs/s, tokens/s (counted with the model's tokenizer), p50/p99,
resident memory per replica, and

- scaling factor: inputs/s over the 1-replica inputs/s (the ideal on N free hosts would be N; on one
  host the cores are shared, so the ideal is 1.0 and anything below is overhead);
- throughput overhead per added replica: (1 - scaling factor) / (N - 1);
- tokens per server CPU-second: tokens answered over the CPU time all replicas spent in the phase.
  On a machine shared with other work, N processes can take a larger share of the cores than one
  (the kernel shares CPU per thread), so inputs/s may even grow with N; CPU per token does not
  depend on that, and its drop with N is the real cost of a replica;
- memory per replica: resident set of each idle-warm process (weights, torch, tokenizer).

A 1-replica phase without the proxy runs first, so the proxy's own cost is on record too. With
``--ray`` the same phases run against Ray Serve (1 and 2 replicas, through Ray's HTTP proxy); their
scaling factor is against the 1-process phase behind the proxy.

    python benchmarks/bench_replicas.py [--quick]     (make bench-replicas)
    .venv-ray/bin/python benchmarks/bench_replicas.py --ray      (after make test-ray)

Writes benchmarks/results/bench_replicas.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import corpus  # noqa: E402
import loadgen  # noqa: E402
import peers  # noqa: E402

from tests.replica_proxy import RoundRobinProxy  # noqa: E402
from tests.tiny_checkpoints import minilm_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PASSAGES_PER_REQUEST = 16
REPLICA_COUNTS = (1, 2, 4)
RAY_REPLICA_COUNTS = (1, 2)
MODEL_MAX_TOKENS = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length
READY_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (about 4 minutes in all)")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 60, quick 20)")
    parser.add_argument("--warmup", type=float, help="seconds left out at the start of a phase (default 10, quick 4)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--replicas", type=int, nargs="*", default=list(REPLICA_COUNTS))
    parser.add_argument("--ray", type=int, nargs="*", metavar="N",
                        help="also Ray Serve with these replica counts (default 1 2 when given bare; needs the "
                             "`ray` extra: run with .venv-ray/bin/python, see make test-ray)")
    args = parser.parse_args()
    if args.ray == []:
        args.ray = list(RAY_REPLICA_COUNTS)
    args.duration = args.duration or (20.0 if args.quick else 60.0)
    args.warmup = args.warmup if args.warmup is not None else (4.0 if args.quick else 10.0)
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def request_inputs() -> list[list[str]]:
    passages = corpus.passages(PASSAGES_PER_REQUEST * 64)
    return [passages[i:i + PASSAGES_PER_REQUEST] for i in range(0, len(passages), PASSAGES_PER_REQUEST)]


def requests() -> tuple[loadgen.HttpRequest, ...]:
    return tuple(loadgen.json_request("/embed", {"inputs": inputs, "truncate": True}, tag=i)
                 for i, inputs in enumerate(request_inputs()))


def tokens_per_request() -> list[int]:
    """Tokens the model computes for each request (special tokens included, cut at its 256 limit),
    counted with the model's own tokenizer, so that throughput can be given in tokens/s."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    return [sum(len(ids) for ids in tokenizer(inputs, truncation=True, max_length=MODEL_MAX_TOKENS)["input_ids"])
            for inputs in request_inputs()]


def replica_args(replicas: int) -> list[str]:
    cores = os.cpu_count() or 1
    return ["--model", f"all-minilm-l6-v2={minilm_dir()}", "--cpu-workers", str(max(1, cores // replicas)),
            "--cpu-threads", "1", "--tokenization-workers", "1"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(port: int, args, tokens: list[int], server_pids: list[int]) -> dict:
    stream = loadgen.Stream("ingest", requests(), concurrency=args.concurrency)
    cpu_before = sum(cpu_seconds(pid) for pid in server_pids)
    result = loadgen.run("127.0.0.1", port, [stream], args.duration, timeout_s=CALL_TIMEOUT_S, workers=args.workers)
    server_cpu_s = sum(cpu_seconds(pid) for pid in server_pids) - cpu_before
    summary = loadgen.summarize(result.records, (args.warmup, args.duration))
    tokens_answered = sum(tokens[r.tag] for r in result.records if r.status == 200)
    return {
        "inputs_per_s": summary["ok_per_s"] * PASSAGES_PER_REQUEST,
        "tokens_per_s": sum(tokens[tag] * share for tag, share in summary["ok_shares"]) / (args.duration - args.warmup),
        "requests_per_s": summary["ok_per_s"],
        "p50_ms": None if summary["p50_s"] is None else summary["p50_s"] * 1e3,
        "p99_ms": None if summary["p99_s"] is None else summary["p99_s"] * 1e3,
        "statuses": summary["statuses"],
        "requests_measured": summary["requests"],
        "client_cpu_cores": result.client_cpu_cores,
        # Whole phase, every answered request: the servers' CPU per token does not depend on how
        # much of the machine other processes took, the throughput does.
        "server_cpu_s": server_cpu_s,
        "tokens_per_server_cpu_s": tokens_answered / server_cpu_s if server_cpu_s else None,
        "errors": result.errors,
    }


def measure(replicas: int, args, tokens: list[int], direct: bool = False) -> dict:
    """Start ``replicas`` servers, wait until all are ready, run the phase through the proxy (or
    straight at the one server with ``direct``), stop them."""
    with ExitStack() as stack:
        servers = []
        for index in range(replicas):
            server = peers.infercore_server(peers.free_port(), RESULTS / "logs" / f"bench_replicas_{index}.log",
                                            replica_args(replicas))
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_ready(READY_TIMEOUT_S)
        rss = [server.rss_bytes() or 0 for server in servers]
        if direct:
            phase = run_phase(servers[0].port, args, tokens, [servers[0].pid])
            answered = None
        else:
            proxy = stack.enter_context(RoundRobinProxy([f"http://127.0.0.1:{s.port}" for s in servers]))
            phase = run_phase(proxy.port, args, tokens, [s.pid for s in servers])
            answered = [proxy.answered[u] for u in proxy.upstreams]
    return {"replicas": replicas, "direct": direct, "rss_mib_per_replica": statistics.fmean(rss) / 2**20,
            "answered_per_replica": answered, **phase}


def print_table(phases: list[dict]) -> None:
    print()
    header = (f"{'replicas':<15} {'inputs/s':>9} {'tokens/s':>9} {'scaling':>8} {'overhead/added':>15} "
              f"{'tokens/CPU-s':>12} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB/replica':>16}  statuses")
    print(header)
    print("-" * len(header))
    for p in phases:
        suffix = " (no proxy)" if p["direct"] else " (Ray Serve)" if p.get("ray") else ""
        label = f"{p['replicas']}{suffix}"
        scaling = "" if p["scaling_factor"] is None else f"{p['scaling_factor']:.2f}x"
        overhead = p["throughput_overhead_per_added_replica"]
        overhead_text = "" if overhead is None else f"{overhead * 100:.1f} %"
        print(f"{label:<15} {p['inputs_per_s']:9.1f} {p['tokens_per_s']:9.0f} {scaling:>8} {overhead_text:>15} "
              f"{p['tokens_per_server_cpu_s'] or 0:12.0f} {p['p50_ms'] or 0:8.0f} {p['p99_ms'] or 0:8.0f} "
              f"{p['rss_mib_per_replica']:16.0f}  "
              f"{json.dumps(p['statuses'])}")


def serve_actor_pids() -> dict[int, str]:
    """pid → process title of the Ray Serve actors (replicas, proxy, controller) this process started
    (descendants of it only, so another Ray instance on the machine is left out)."""
    me = os.getpid()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")):
                continue
            pid = int(entry.name)
            ancestor = pid
            while ancestor > 1 and ancestor != me:
                ancestor = int((Path("/proc") / str(ancestor) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if ancestor == me:
            found[pid] = title
    return found


def measure_ray(replicas: int, args, tokens: list[int]) -> dict:
    """The same phase against Ray Serve (infercore/ray_serve.py) on a local Ray instance: ``replicas``
    replicas with the cores split as for the processes, requests through Ray's HTTP proxy. The CPU
    counted is every Serve actor's (replicas, proxy, controller): Ray's proxy is part of the cost."""
    import shlex

    import ray
    from ray import serve

    from infercore.ray_serve import build_app

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        port = peers.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "serve_flags": shlex.join(replica_args(replicas)),
            "options": {"num_replicas": replicas, "autoscaling_config": None,
                        "ray_actor_options": {"num_cpus": cores / replicas}},
        })
        serve.run(app, name="infercore", route_prefix="/")
        actors = serve_actor_pids()
        replica_pids = [pid for pid, title in actors.items() if title.startswith("ray::ServeReplica")]
        assert len(replica_pids) == replicas, actors
        phase = run_phase(port, args, tokens, list(actors))
        rss = [peers.rss_bytes(pid) or 0 for pid in replica_pids]
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"replicas": replicas, "direct": False, "ray": True, "rss_mib_per_replica": statistics.fmean(rss) / 2**20,
            "answered_per_replica": None, **phase}


def main() -> int:
    args = parse_args()
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; replicas share them: on one host the "
        "ideal scaling factor is 1.0")
    tokens = tokens_per_request()
    phases = [measure(1, args, tokens, direct=True)]
    log(f"1 replica, no proxy: {phases[0]['inputs_per_s']:.1f} inputs/s")
    for replicas in args.replicas:
        phase = measure(replicas, args, tokens)
        log(f"{replicas} replica(s) behind the proxy: {phase['inputs_per_s']:.1f} inputs/s, "
            f"answered per replica {phase['answered_per_replica']}, statuses {phase['statuses']}")
        phases.append(phase)
    for replicas in args.ray or ():
        phase = measure_ray(replicas, args, tokens)
        log(f"Ray Serve, {replicas} replica(s): {phase['inputs_per_s']:.1f} inputs/s, statuses {phase['statuses']}")
        phases.append(phase)

    base = next((p for p in phases if p["replicas"] == 1 and not p["direct"] and not p.get("ray")), None)
    for p in phases:
        measured = base and base["inputs_per_s"] and not p["direct"]
        scaling = p["inputs_per_s"] / base["inputs_per_s"] if measured else None
        p["scaling_factor"] = scaling
        p["throughput_overhead_per_added_replica"] = (
            (1 - scaling) / (p["replicas"] - 1) if scaling is not None and p["replicas"] > 1 else None
        )
    print_table(phases)
    direct = phases[0]
    if base and direct["inputs_per_s"]:
        print(f"proxy cost at 1 replica: {100 * (1 - base['inputs_per_s'] / direct['inputs_per_s']):.1f} % of inputs/s")
    # One run per phase, no repeats: the load average is the only sign of how quiet the machine was.
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {os.cpu_count()} cores")
    report = {
        "benchmark": "bench_replicas",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": load},
        "settings": vars(args),
        "phases": phases,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_replicas.json").write_text(json.dumps(report, indent=2))
    log(f"results: {RESULTS / 'bench_replicas.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
