"""ONNX Runtime backend: padded, length-grouped batches through an exported (or shipped) graph.

- Batches (``PaddedBatch``): the inputs are sorted by task adapter and length and cut into groups,
  each padded only to its own longest input; a group closes when one more input would make it pad
  more than ``MAX_PADDING_SHARE`` of its tokens, or pad at all once the group holds
  ``MIN_PADDED_GROUP_TOKENS`` real tokens, or exceed the per-call token cap (SPLADE's graph
  holds [tokens, vocab] logits inside ONNX Runtime, so its calls stay small; on CPU every call keeps
  its FFN activations cache-sized, ``call_token_cap``). One ``run`` per group;
  results go back in input order. A group without padding runs through the model's unpadded graph
  when it has one (no mask: ONNX Runtime's flash attention).
- Heads: sparse and rerank graphs end in the head (``[batch, vocab]`` term weights, ``[batch]``
  logits), so only those cross out of the runtime; dense graphs return the hidden states and the
  torch path's own pooling code pools them (same pooling modes, prompt skipping, Dense layers,
  truncation and normalisation as ``--backend torch``).
- Threads: ``for_executor(threads)`` gives an executor sessions with that many intra-op threads,
  one set per thread count shared by the executors running with it (spinning off: the cores are
  shared with the other executors, tokenizers and the loop; on in a session on every core, which
  only runs lone batches, and then only while a call runs).
- CUDA (``onnxruntime-gpu``): the CUDA execution provider with I/O binding; inputs are copied to the
  device once per call and only the graph's output comes back.

``load_onnx_backend`` is what the loader calls for ``backend: onnx``: it refuses families and heads
the graphs do not cover, finds or builds the graph (``onnx_export``), opens it, and runs the parity
probe (``onnx_quality``) against the torch path before anything is served.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError
from .onnx_export import BASE, DEFAULT_INT8_OUTLIERS, ONNX_FAMILIES, ExportedGraphs, exported_graphs
from .onnx_graph import OUTPUT_NAMES
from .onnx_quality import (
    CALIBRATION_TEXTS,
    DEFAULT_INT8_FLOOR,
    FP32_FLOOR,
    QUALITY_PASSAGES,
    QUALITY_QUERIES,
    measure,
)
from .packing import pack_sequences
from .sparse import extract_sparse

log = logging.getLogger("infercore.models.onnx")

# A group of a padded batch pads at most this share of its tokens (else it is split in two).
MAX_PADDING_SHARE = 0.25
# ... and takes a longer input (padding the others) only while it holds fewer real tokens than this:
# past it, a call is long enough that padding costs more than another call. Measured on BERT-base
# (8 passages of 260-420 tokens, one thread, fp32): one group padded 25 % 23.2 s, groups padded 10 %
# 20.3 s, every input alone (no padding: the unpadded graph) 18.3 s, torch packed 20.0 s.
MIN_PADDED_GROUP_TOKENS = 256
# Padded tokens per ONNX Runtime call. SPLADE's graph materialises [tokens, vocab] float32 logits
# inside the runtime (1024 × 30522 × 4 B = 125 MB), so its calls are capped lower.
MAX_CALL_TOKENS = {"text_embedding": 8192, "rerank": 8192, "sparse_embedding": 1024}
# On CPU, a call's FFN activations (tokens × intermediate_size floats) are kept within this many
# elements (~6 MB) so that they stay in cache while every core computes. `make bench-onnx-call-size`
# (int8, both cores at once, tokens/s by rows of 256 tokens per call 1 / 2 / 4 / 8 / 16): MiniLM
# 20.5k / 20.5k / 19.7k / 19.1k / 17.8k, BERT-base 3.50k / 3.48k / 3.37k / 3.21k / 3.01k; the machine's
# speed moves between runs, the slope stays. Served (int8 MiniLM passages over HTTP, `make
# bench-cpu`), int8 ran at 13.4-15.1k tokens/s at 1-8 clients with calls of up to 8,192 tokens (9-14
# passages per batch under load) and at 15.8-18.3k in three runs with this cap. A longer input
# still runs whole.
CPU_CALL_FFN_ACTIVATIONS = 1_600_000
# Output names of graphs exported by others (sentence-transformers / optimum) for dense models.
SHIPPED_DENSE_OUTPUTS = ("last_hidden_state", "token_embeddings")


@dataclass(frozen=True)
class PaddedGroup:
    """Inputs ``rows`` of a batch, right-padded to the group's longest: [len(rows), seq] int64."""

    rows: tuple[int, ...]
    variant: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    seq_lens: tuple[int, ...]


@dataclass(frozen=True)
class PaddedBatch:
    groups: tuple[PaddedGroup, ...]
    num_inputs: int

    @property
    def padded_tokens(self) -> int:
        return sum(g.input_ids.size for g in self.groups)


def group_by_length(lengths: Sequence[int], variants: Sequence[str], max_call_tokens: int) -> list[list[int]]:
    """Row indices grouped: same variant, sorted by length, each group padding at most
    MAX_PADDING_SHARE of its tokens and at most ``max_call_tokens`` padded tokens (a single longer
    input still runs, alone). A group of MIN_PADDED_GROUP_TOKENS real tokens or more takes only inputs
    of its own length (no more padding): long inputs run in groups without padding."""
    order = sorted(range(len(lengths)), key=lambda i: (variants[i], lengths[i]))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        group = groups[-1] if groups else None
        if group is not None and variants[group[0]] == variants[i]:
            padded = (len(group) + 1) * lengths[i]  # sorted: this input is the group's longest
            pads_more = lengths[i] > lengths[group[-1]]
            if (padded <= max_call_tokens and padded - (real + lengths[i]) <= MAX_PADDING_SHARE * padded
                    and not (pads_more and real >= MIN_PADDED_GROUP_TOKENS)):
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def _variant(option: Any) -> str:
    return getattr(option, "task", None) or BASE


class OnnxBackend:
    """One model's ONNX graphs (a variant per task adapter) and this executor's sessions on them."""

    name = "onnx"
    is_padded = True

    def __init__(self, task: str, graphs: ExportedGraphs, runner: Any, device: torch.device,
                 uses_token_types: bool, threads: int | None = None,
                 shared: dict[int, OnnxBackend] | None = None, max_call_tokens: int | None = None):
        self.task = task
        self.graphs = graphs
        self.precision = graphs.precision
        self.runner = runner  # the torch runner: dense pooling head, default options, dimensions
        self.device = device
        self.uses_token_types = uses_token_types
        self.threads = threads or os.cpu_count() or 1
        self.max_call_tokens = max_call_tokens or MAX_CALL_TOKENS[task]
        self._sessions: dict[tuple[str, bool], Any] = {}  # (variant, unpadded) → session
        self._output: str | None = None
        self._inputs: dict[tuple[str, bool], set[str]] = {}
        # False: every group runs through the masked graph (the parity probe checks both ways)
        self.use_unpadded = True
        # Every instance of this model, by intra-op thread count (see for_executor).
        self._shared = {} if shared is None else shared
        self._shared.setdefault(self.threads, self)
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()

    # ---- sessions ------------------------------------------------------------------------------

    def session(self, variant: str, unpadded: bool = False):
        """This instance's session on ``variant``'s graph (``unpadded``: its graph for groups without
        padding), opened on first use."""
        key = (variant, unpadded)
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._session_lock:  # executors sharing this instance open a graph once
            if key not in self._sessions:
                path = (self.graphs.unpadded if unpadded else self.graphs.files).get(variant)
                if path is None:
                    known = ", ".join(repr(v or "(base)") for v in self.graphs.files)
                    raise ValueError(f"task adapter {variant!r} has no ONNX graph (graphs: {known})")
                session = open_session(path, self.device, self.threads)
                self._output = check_graph(session, path, self.task, self.uses_token_types, unpadded)
                self._inputs[key] = {i.name for i in session.get_inputs()}
                self._sessions[key] = session
            return self._sessions[key]

    def open_all(self) -> None:
        """Open every graph of the model now (a graph that does not load fails at load)."""
        for variant in self.graphs.files:
            self.session(variant)
        for variant in self.graphs.unpadded:
            self.session(variant, unpadded=True)

    def for_executor(self, threads: int | None) -> OnnxBackend:
        """The instance whose sessions run with ``threads`` intra-op threads (None: every core),
        opened and warmed once per count and shared by the executors that run with that count.

        Sharing is safe and does not oversubscribe: ONNX Runtime runs concurrent calls of one session
        independently, and a session with one intra-op thread computes on the calling thread, so two
        single-threaded executors on one session still use one core each. It keeps one copy of the
        weights per thread count (on 2 cores: 1 and 2 threads) instead of one per executor. Called on
        the executor's thread (CPU: it sets that thread's torch thread count too)."""
        key = threads or os.cpu_count() or 1
        if self.device.type == "cpu":
            # What this executor still computes in torch (dense pooling on the host, an image tower)
            # runs with the same count; torch's thread count is per calling thread.
            torch.set_num_threads(key)
        with self._lock:
            instance = self._shared.get(key)
            if instance is None:
                instance = OnnxBackend(self.task, self.graphs, self.runner, self.device, self.uses_token_types, key,
                                       self._shared, self.max_call_tokens)
                instance.warm_up()
        return instance

    def warm_up(self) -> None:
        """Open the first graph's sessions and run a small batch through each (one without padding,
        one with), so the first request this instance serves pays neither a session's creation nor
        its first-run allocations."""
        variant = next(iter(self.graphs.files))
        options = [self.runner.default_options()] * 2
        if variant:
            options = [type(options[0])(task=variant)] * 2
        for lengths in ((8, 8), (8, 7)):
            self.run(self.make_batch([[1] * n for n in lengths], None, options), options)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """ONNX Runtime's allocation failures, and torch's: dense pooling and an image tower still run
        in torch beside the graph."""
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        message = str(exc)
        return ("Failed to allocate memory" in message or "out of memory" in message.lower()
                or "can't allocate memory" in message)

    # ---- batches -------------------------------------------------------------------------------

    def make_batch(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None,
                   options: Sequence[Any]) -> PaddedBatch:
        if not ids:
            raise ValueError("cannot pad an empty batch")
        lengths = [len(s) for s in ids]
        variants = [_variant(o) for o in options] if options else [BASE] * len(ids)
        groups = []
        for rows in group_by_length(lengths, variants, self.max_call_tokens):
            width = max(lengths[i] for i in rows)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            types = np.zeros((len(rows), width), dtype=np.int64) if self.uses_token_types else None
            for r, i in enumerate(rows):
                input_ids[r, : lengths[i]] = ids[i]
                mask[r, : lengths[i]] = 1
                if types is not None and type_ids is not None:
                    types[r, : lengths[i]] = type_ids[i]
            groups.append(PaddedGroup(tuple(rows), variants[rows[0]], input_ids, mask, types,
                                      tuple(lengths[i] for i in rows)))
        return PaddedBatch(tuple(groups), len(ids))

    def computed_tokens(self, batch: PaddedBatch) -> int:
        return batch.padded_tokens

    # ---- compute -------------------------------------------------------------------------------

    def run(self, batch: PaddedBatch, options: Sequence[Any]) -> list[Any]:
        results: list[Any] = [None] * batch.num_inputs
        for group in batch.groups:
            output = self._run_group(group)
            group_options = [options[i] for i in group.rows]
            for row, value in zip(group.rows, self._head(output, group, group_options)):
                results[row] = value
        return results

    def _run_group(self, group: PaddedGroup) -> np.ndarray:
        # A group whose inputs all have its width has no padding: the unpadded graph (no mask) runs it.
        unpadded = (self.use_unpadded and group.variant in self.graphs.unpadded
                    and min(group.seq_lens) == group.input_ids.shape[1])
        session = self.session(group.variant, unpadded)
        inputs = self._inputs[group.variant, unpadded]
        feeds = {"input_ids": group.input_ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = group.attention_mask
        if group.token_type_ids is not None and "token_type_ids" in inputs:
            feeds["token_type_ids"] = group.token_type_ids
        if self.device.type == "cuda":
            return _run_bound(session, feeds, self._output, self.device)
        return session.run([self._output], feeds)[0]

    def _head(self, output: np.ndarray, group: PaddedGroup, options: list[Any]) -> list[Any]:
        if self.task == "sparse_embedding":
            return extract_sparse(torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32)), options)
        if self.task == "rerank":
            return np.asarray(output, dtype=np.float32).reshape(len(group.rows)).tolist()
        hidden = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))
        return self.runner.pool_padded(hidden, group.seq_lens, options)


def _run_bound(session, feeds: dict[str, np.ndarray], output: str, device: torch.device) -> np.ndarray:
    """One call with I/O binding on a CUDA device: inputs copied once, the output allocated on the
    device by the runtime and copied back alone."""
    import onnxruntime as ort

    binding = session.io_binding()
    index = device.index or 0
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", index))
    binding.bind_output(output, "cuda", index)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


# ONNX Runtime fusions left out on CPU. SkipLayerNormFusion: the CPU kernel of the fused residual add
# and LayerNorm is slower than the plain Add and LayerNormalization it replaces (int8 MiniLM, 4 × 256
# tokens, one thread: 111.6 ms a call without it, 117.3 ms with it; bench_onnx_int8). Sessions on CUDA
# keep it (the fp32 export leaves the fusion to the session for that reason: onnx_export).
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion",)


def open_session(path: Path, device: torch.device, threads: int | None, optimized_model: Path | None = None):
    """An inference session on ``path``; CheckpointError naming the file and the remedy if the
    runtime cannot read it. ``optimized_model``: where to write the graph as the runtime runs it
    (after its fusions), for inspection."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    cores = os.cpu_count() or 1
    options.intra_op_num_threads = threads or cores
    # Idle intra-op threads sleep instead of spinning: the cores are shared (OMP_WAIT_POLICY=PASSIVE
    # does the same for torch; see server/cli.py). Except in a session on every core, which runs only
    # a batch no other executor competes with (server/executor.py: a lone batch takes the idle
    # executors' threads): there, waking sleeping threads at each of the graph's ~100 parallel
    # sections cost 12-14 % of an int8 MiniLM call (8 × 256 tokens, 2 cores).
    spinning = options.intra_op_num_threads >= cores > 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # ... and only while a call runs: by default they go on spinning after it returns, taking the cores
    # from the HTTP side, the tokenizers and the next batch (bench-cpu's single queries; README).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    if device.type == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise CheckpointError(
                f"{path}: device {device} asks for ONNX Runtime's CUDA provider, which this onnxruntime build "
                f"lacks (providers: {', '.join(available)}); install the 'onnx-gpu' extra (onnxruntime-gpu), "
                "not 'onnx'"
            )
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    disabled = list(CPU_DISABLED_FUSIONS) if device.type == "cpu" else None
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                    disabled_optimizers=disabled)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: ONNX Runtime cannot load this graph ({type(exc).__name__}: {str(exc).strip()[:300]}); "
            "delete the file to have it exported again (or run `infercore models export-onnx`), or serve the "
            "model with --backend torch"
        ) from None


def check_graph(session, path: Path, task: str, uses_token_types: bool, unpadded: bool = False) -> str:
    """The graph's inputs and output fit this model and task; returns the output name to fetch."""
    inputs = {i.name for i in session.get_inputs()}
    wanted = {"input_ids", "attention_mask"} | ({"token_type_ids"} if uses_token_types else set())
    # A graph may lack token_type_ids where the model has an all-zero table row (and an unpadded
    # graph its attention_mask, unless its head uses it); it may not ask for inputs we do not have.
    needed = {"input_ids"} if unpadded else {"input_ids", "attention_mask"}
    if not needed <= inputs or inputs - wanted:
        raise CheckpointError(
            f"{path}: graph inputs {sorted(inputs)} do not match the model (expected {sorted(wanted)}); the file "
            "belongs to another model or export: delete it, or serve with --backend torch"
        )
    outputs = [o.name for o in session.get_outputs()]
    expected = OUTPUT_NAMES[task]
    accepted = (expected, *SHIPPED_DENSE_OUTPUTS) if task == "text_embedding" else (expected,)
    for name in accepted:
        if name in outputs:
            return name
    raise CheckpointError(
        f"{path}: graph outputs {outputs} have none of {list(accepted)} for a {task} model; a sparse or rerank "
        "model's graph must end in its head: export it with `infercore models export-onnx` (or delete the file)"
    )


# ---- load ---------------------------------------------------------------------------------------


def quality_inputs(task: str, tokenizer, queries: Sequence[str] = QUALITY_QUERIES,
                   passages: Sequence[str] = QUALITY_PASSAGES) -> tuple[list[Any], list[int]]:
    """The probe's tokenized inputs (rerank: every (query, passage) pair) and rerank group sizes."""
    if task == "rerank":
        pairs, groups = [], []
        for query in queries:
            encoded = tokenizer.encode_pairs(query, list(passages), max(8, tokenizer.max_input_tokens // 4),
                                             windows=False, overlap_tokens=0, max_windows=1, truncate=True)
            pairs += [p.tokens for p in encoded]
            groups.append(len(encoded))
        return pairs, groups
    return tokenizer.encode_batch([*queries, *passages], truncate=True), []


def calibration_inputs(task: str, tokenizer) -> list[tuple[list[int], list[int] | None]]:
    """(ids, type ids) of CALIBRATION_TEXTS as ``task`` sees them (rerank: the first three texts as
    queries against the others), for an int8 export's outlier channels."""
    queries, passages = CALIBRATION_TEXTS[:3], CALIBRATION_TEXTS[3:]
    if task != "rerank":
        queries, passages = (), CALIBRATION_TEXTS
    inputs, _ = quality_inputs(task, tokenizer, queries, passages)
    return [(list(t.ids), list(t.type_ids) if t.type_ids is not None else None) for t in inputs]


def probe_quality(task: str, backend: OnnxBackend, runner: Any, tokenizer, vocab: int, variants: Sequence[str]):
    """The parity report of ``backend`` against the torch ``runner`` (the worst over variants)."""
    inputs, groups = quality_inputs(task, tokenizer)
    ids = [t.ids for t in inputs]
    types = [t.type_ids for t in inputs]
    worst = None
    for variant in variants:
        base = runner.default_options()
        opts = [type(base)(task=variant or None)] * len(ids) if variant else [base] * len(ids)

        expected = list(runner.run(pack_sequences(ids, types), opts))  # once for both graphs

        def reference(_, expected=expected):
            return expected

        # groups without padding on the unpadded graph (when the model has one); every group padded
        for unpadded in (True, False) if backend.graphs.unpadded else (False,):

            def candidate(_, opts=opts, unpadded=unpadded):
                backend.use_unpadded = unpadded
                try:
                    # alone, every input is a group without padding; together, most are padded
                    if unpadded:
                        return [backend.run(backend.make_batch([i], [t], [o]), [o])[0]
                                for i, t, o in zip(ids, types, opts)]
                    return backend.run(backend.make_batch(ids, types, opts), opts)
                finally:
                    backend.use_unpadded = True

            report = measure(task, backend.precision, vocab, reference, candidate, inputs, groups)
            if worst is None or report.min_cosine < worst.min_cosine:
                worst = report
    return worst


def call_token_cap(task: str, device: torch.device, intermediate_size: int | None) -> int:
    """Padded tokens per ONNX Runtime call: MAX_CALL_TOKENS, and on CPU at most what keeps the FFN's
    activations within CPU_CALL_FFN_ACTIVATIONS (MiniLM, 1,536: 1,041 tokens; BERT-base, 3,072: 520)."""
    cap = MAX_CALL_TOKENS[task]
    if device.type == "cpu" and intermediate_size:
        cap = min(cap, max(CPU_CALL_FFN_ACTIVATIONS // intermediate_size, 64))
    return cap


def load_onnx_backend(model_id: str, model_dir: Path, task: str, family: str, runner: Any, tokenizer,
                      device: torch.device, quantize: str, int8_floor: float | None,
                      int8_outliers: str | None = None, unpadded_graph: bool = True):
    """The model's ONNX backend, checked against its torch runner; returns (backend, quality report).
    ``unpadded_graph`` False: the unmasked graphs are neither opened nor probed (every group padded).

    Raises CheckpointError: a family or head the graphs do not cover, no runtime, a graph that cannot
    be exported or loaded, or one whose figures are below the floor (int8) / FP32_FLOOR (fp32)."""
    if family not in ONNX_FAMILIES:
        raise CheckpointError(
            f"model {model_id}: the {family} family is not served by the onnx backend (onnx serves "
            f"{', '.join(ONNX_FAMILIES)}; torch serves every family): use --backend torch for it"
        )
    if runner.listwise:  # the contract's flag (models/contract.py)
        raise CheckpointError(
            f"model {model_id}: listwise rerankers are not served by the onnx backend (torch serves them): "
            "use --backend torch for it"
        )
    encoder = runner.encoder
    uses_token_types = getattr(getattr(encoder, "embeddings", None), "token_type", None) is not None and \
        getattr(encoder, "family", "") != "jina-xlm-roberta"
    outliers = int8_outliers or DEFAULT_INT8_OUTLIERS
    graphs = exported_graphs(model_dir, task, runner, quantize, lambda: calibration_inputs(task, tokenizer), outliers)
    if not unpadded_graph:  # still exported and cached (the cache does not depend on this setting)
        graphs = dataclasses.replace(graphs, unpadded={})
    intermediate = getattr(getattr(encoder, "config", None), "intermediate_size", None)
    backend = OnnxBackend(task, graphs, runner, device, uses_token_types,
                          max_call_tokens=call_token_cap(task, device, intermediate))
    backend.open_all()  # a graph that does not load fails here, at load
    vocab = getattr(runner, "dimensions", 0)
    report = probe_quality(task, backend, runner, tokenizer, vocab, tuple(graphs.files))
    floor = FP32_FLOOR if graphs.precision == "float32" else (int8_floor or DEFAULT_INT8_FLOOR)
    where = ", ".join(str(p) for p in graphs.files.values())
    if report.min_cosine < floor:
        if graphs.precision == "float32":
            raise CheckpointError(
                f"model {model_id}: the ONNX graph {where} does not compute this model's weights "
                f"({report.describe()} against the torch path; at least {floor} expected): delete it to export "
                "again, or serve with --backend torch"
            )
        more = ("" if graphs.outliers in (None, "all") else
                'set "int8_outliers": "all" in its infercore.json (every outlier treatment; the default), or ')
        raise CheckpointError(
            f"model {model_id}: int8 refused, its quality is below the floor: {report.describe()} against fp32 "
            f"(floor: min cosine {floor}, int8_quality_floor in infercore.json); {more}serve it with --quantize none"
        )
    log.info("model %s: onnx %s from %s (%s), parity with torch fp32: %s%s", model_id, graphs.precision,
             graphs.source, where, report.describe(),
             f"; outlier treatment ({graphs.outliers}): {graphs.outlier_counts}" if graphs.outliers else "")
    if device.type == "cpu":
        _release_torch_weights(runner, task)
    return backend, report


def _release_torch_weights(runner: Any, task: str) -> None:
    """The ONNX graph serves from now on: the torch encoder (and a sparse or rerank head, which is in
    the graph) need not stay in memory. Dense models keep their pooling and Dense layers."""
    runner.encoder = None
    if task != "text_embedding":
        runner.head = None
