"""The packed EuroBERT encoder computes what transformers' EuroBertModel computes (bidirectional, no
q/k norm, biases where the config asks for them), its task adapters what the model computes with the
adapter merged, and jina-embeddings-v5 configs reach the right backbone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EuroBertModel, Qwen3Model

from infercore.models.catalog import lookup
from infercore.models.checkpoint import CheckpointError
from infercore.models.embedding import EmbedOptions
from infercore.models.llama_like import EuroBertEncoder, Qwen3Encoder
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from tests import tiny_llama_like as tiny

TOLERANCE = 1e-4
MAX_POSITIONS = tiny.EUROBERT_CONFIG["max_position_embeddings"]
TASKS = ("retrieval", "text-matching", "classification", "clustering")


@pytest.fixture(scope="module")
def eurobert_dir(tmp_path_factory) -> Path:
    path = tiny.build_eurobert(tmp_path_factory.mktemp("eurobert") / "eurobert-tiny", seed=1)
    base = EuroBertModel.from_pretrained(path)
    for i, task in enumerate(TASKS):
        tiny.write_lora_adapter(path, task, base, seed=20 + i, rank=2 + i, alpha=4.0)
    return path


@pytest.fixture(scope="module")
def reference(eurobert_dir) -> EuroBertModel:
    return EuroBertModel.from_pretrained(eurobert_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def served(eurobert_dir):
    return load_model("eurobert-tiny", eurobert_dir, device="cpu")


@pytest.fixture(scope="module")
def encoder(served) -> EuroBertEncoder:
    return served.runner.encoder


def test_packed_batch_of_mixed_lengths_matches_transformers_on_every_token(encoder, reference):
    assert isinstance(encoder, EuroBertEncoder) and not encoder.config.causal
    ids = tiny.random_ids([7, 1, MAX_POSITIONS, 2, 33, MAX_POSITIONS - 1, 1, 16], seed=1)
    diff = tiny.max_abs_diff(tiny.packed_hidden(encoder, ids), tiny.reference_hidden(reference, ids))
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g}"


def test_attention_is_bidirectional(encoder):
    ids = tiny.random_ids([20], seed=2)[0]
    changed = [*ids[:-1], (ids[-1] + 1) % 30522]
    before, after = tiny.packed_hidden(encoder, [ids, changed])
    assert (before[0] - after[0]).abs().max().item() > 1e-4


@pytest.mark.parametrize("length", [1, 9, 40])
def test_hidden_states_are_bit_identical_alone_and_inside_a_batch(length, encoder):
    target = tiny.random_ids([length], seed=100 + length)[0]
    others = tiny.random_ids([5, 60, 1], seed=8)
    alone = tiny.packed_hidden(encoder, [target])[0]
    for position in (0, 3):
        batched = tiny.packed_hidden(encoder, [*others[:position], target, *others[position:]])[position]
        assert torch.equal(alone, batched)


def test_each_task_and_a_mixed_batch_match_transformers_with_the_adapter_merged(encoder, reference, eurobert_dir):
    assert encoder.adapter_names == tuple(sorted(TASKS))
    merged = {task: tiny.merged_reference(reference, eurobert_dir / "adapters" / task) for task in TASKS}
    tasks = ["clustering", "retrieval", None, "text-matching", "classification", "retrieval", None]
    ids = tiny.random_ids([5, 11, 2, 1, MAX_POSITIONS, 30, 4], seed=3)
    ours = tiny.packed_hidden(encoder, ids, tasks)
    for i, (seq, task) in enumerate(zip(ids, tasks, strict=True)):
        expected = tiny.reference_hidden(merged[task] if task else reference, [seq])
        diff = tiny.max_abs_diff([ours[i]], expected)
        assert diff <= TOLERANCE, f"input {i} ({task}): {diff:.3g}"
        assert torch.equal(ours[i], tiny.packed_hidden(encoder, [seq], [task])[0])


def test_adapter_deltas_equal_merged_weights_in_float64(eurobert_dir):
    """The fp32 differences above are rounding, not formula: in float64 (and SDPA, whose float64 path
    has no fp32 softmax) the factored deltas give what the merged weights give."""
    from infercore.models.checkpoint import open_weights
    from infercore.models.layers import WeightReader

    config = json.loads((eurobert_dir / "config.json").read_text())
    reader = WeightReader(open_weights(eurobert_dir), torch.device("cpu"), torch.float64, model_dir=eurobert_dir)
    encoder = EuroBertEncoder.from_checkpoint(config, reader)
    base = EuroBertModel.from_pretrained(eurobert_dir, attn_implementation="sdpa", dtype=torch.float64).eval()
    ids = tiny.random_ids([6, 1, 40], seed=9)
    merged = tiny.merged_reference(base, eurobert_dir / "adapters" / "clustering")
    diff = tiny.max_abs_diff(tiny.packed_hidden(encoder, ids, ["clustering"] * 3), tiny.reference_hidden(merged, ids))
    assert diff <= 1e-6


def test_last_token_embeddings_through_the_runner_match_transformers(served, reference):
    ids = tiny.random_ids([3, 1, 50], seed=4)
    vectors = served.runner.run(pack_sequences(ids), [EmbedOptions()] * len(ids))
    for vector, hidden in zip(vectors, tiny.reference_hidden(reference, ids), strict=True):
        np.testing.assert_allclose(vector, F.normalize(hidden[-1], dim=0).numpy(), atol=TOLERANCE)


# ---- jina-embeddings-v5 configs -----------------------------------------------------------------

def _as_jina_v5(source: Path, out: Path, **config_changes) -> Path:
    """``source`` relabelled the way the jina-embeddings-v5 repos label themselves."""
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == "config.json":
            continue
        os.symlink(item, out / item.name, target_is_directory=item.is_dir())
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="jina_embeddings_v5", architectures=["JinaEmbeddingsV5Model"], task_names=list(TASKS),
                  **config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_jina_v5_nano_config_runs_the_eurobert_backbone_with_the_catalog_facts(eurobert_dir, reference, tmp_path):
    path = _as_jina_v5(eurobert_dir, tmp_path / "nano", is_decoder=False)
    served = load_model("jina-embeddings-v5-text-nano", path, device="cpu")
    assert isinstance(served.runner.encoder, EuroBertEncoder)
    assert served.family == "jina-embeddings-v5"
    assert served.runner.pooling == "last"
    assert served.tasks == dict.fromkeys(TASKS, "") and served.default_task == "retrieval"
    assert served.prompts == {"query": "Query: ", "document": "Document: "}
    assert served.default_prompt_name == "document"
    ids = tiny.random_ids([6, 1], seed=5)
    diff = tiny.max_abs_diff(tiny.packed_hidden(served.runner.encoder, ids), tiny.reference_hidden(reference, ids))
    assert diff <= TOLERANCE


def test_jina_v5_small_config_runs_the_qwen3_backbone(tmp_path):
    qwen3 = tiny.build_qwen3(tmp_path / "qwen3", seed=2, pooling=None)
    path = _as_jina_v5(qwen3, tmp_path / "small")
    served = load_model("jina-embeddings-v5-text-small", path, device="cpu")
    assert isinstance(served.runner.encoder, Qwen3Encoder)
    assert served.runner.pooling == "last"  # from the catalog: this directory has no pooling config
    reference = Qwen3Model.from_pretrained(qwen3, attn_implementation="eager").eval()
    ids = tiny.random_ids([6, 1], seed=6)
    diff = tiny.max_abs_diff(tiny.packed_hidden(served.runner.encoder, ids), tiny.reference_hidden(reference, ids))
    assert diff <= TOLERANCE


def test_jina_v5_config_whose_weights_contradict_is_decoder_is_refused(eurobert_dir, tmp_path):
    path = _as_jina_v5(eurobert_dir, tmp_path / "contradiction", is_decoder=True)
    with pytest.raises(CheckpointError, match="lack q/k norms"):
        load_model("contradiction", path, device="cpu")


def test_catalog_entries_for_jina_v5():
    small, nano = lookup("jina-embeddings-v5-text-small"), lookup("jina-embeddings-v5-text-nano")
    assert (small.family, nano.family) == ("qwen3", "eurobert")
    assert small.matryoshka_dimensions[-1] == 1024 and nano.matryoshka_dimensions[-1] == 768
    for entry in (small, nano):
        assert entry.task == "text_embedding" and entry.pooling == "last"
        assert entry.matryoshka_dimensions[0] == 32
        assert set(entry.tasks) == set(TASKS) and entry.default_task == "retrieval"
