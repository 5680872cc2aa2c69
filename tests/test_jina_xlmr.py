"""Jina's rotary XLM-R with task LoRA (jina-embeddings-v3, jina-clip-v2's text tower) computes what
transformers' native JinaEmbeddingsV3Model computes with the task's adapter merged into its weights
(tests/jina_v3_reference.py), token for token, for every task and for none; mixed-task batches,
batch composition and memory; refusals; and the multilingual-e5 (absolute XLM-R) catalog entry.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from infercore.models.checkpoint import CheckpointError
from infercore.models.embedding import EmbedOptions
from infercore.models.families import family_for_config
from infercore.models.jina_xlmr import JinaXlmrEncoder
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from tests import tiny_jina
from tests.jina_v3_reference import reference_hidden, reference_model

TOLERANCE = 1e-4
TASKS: list[str | None] = [*tiny_jina.V3_TASKS, None]


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    return tiny_jina.build_jina_v3(tmp_path_factory.mktemp("jina") / "jina-v3")


@pytest.fixture(scope="module")
def v3(v3_dir):
    return load_model("jina-embeddings-v3", v3_dir, device="cpu")


@pytest.fixture(scope="module")
def v3_references(v3_dir):
    weights = load_file(str(v3_dir / "model.safetensors"))
    config = json.loads((v3_dir / "config.json").read_text())
    return {task: reference_model(weights, config, task) for task in TASKS}


def _random_ids(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tiny_jina.TINY_SIZES["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


LENGTHS = [7, 1, 130, 2, 33, 64, 1, 16]


@torch.inference_mode()
def _ours(encoder, ids: list[list[int]], adapters: list[str | None]) -> list[torch.Tensor]:
    batch = pack_sequences(ids)
    if any(adapters):
        batch = dataclasses.replace(batch, adapters=tuple(adapters))
    hidden = encoder(batch)
    cu = batch.cu_seqlens.tolist()
    return [hidden[cu[i] : cu[i + 1]] for i in range(len(ids))]


def _max_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    assert [a.shape for a in ours] == [b.shape for b in reference]
    return max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))


def test_rotary_xlm_roberta_and_jina_clip_configs_go_to_the_jina_family(v3_dir):
    config = json.loads((v3_dir / "config.json").read_text())
    assert family_for_config(config).name == "jina-xlm-roberta"
    assert family_for_config({"model_type": "jina_clip"}).name == "jina-xlm-roberta"
    absolute = {**config, "position_embedding_type": "absolute"}
    assert family_for_config(absolute).name == "xlm-roberta"
    assert family_for_config({"model_type": "xlm-roberta"}).name == "xlm-roberta"


def test_v3_loads_with_its_adapters_and_catalog_tasks(v3):
    encoder = v3.runner.encoder
    assert isinstance(encoder, JinaXlmrEncoder)
    assert v3.family == "jina-xlm-roberta"
    assert encoder.adapter_names == tuple(tiny_jina.V3_TASKS)
    assert v3.tasks == tiny_jina.V3_INSTRUCTIONS
    assert v3.default_task == "retrieval.passage"
    assert v3.runner.pooling == "mean"
    assert v3.max_input_tokens == 8192
    assert v3.matryoshka_dimensions == (32, 64, 128, 256, 512, 768, 1024)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t or "no-task")
def test_every_task_matches_transformers_port_with_the_adapter_merged(task, v3, v3_references):
    ids = _random_ids(LENGTHS, seed=1)
    ours = _ours(v3.runner.encoder, ids, [task] * len(ids))
    diff = _max_diff(ours, reference_hidden(v3_references[task], ids))
    assert diff <= TOLERANCE, f"task {task}: max abs diff {diff:.3g}"


def test_adapters_change_the_output(v3):
    """Guards the parity tests against adapters that are silently not applied."""
    ids = _random_ids([12], seed=2)
    outputs = {task: _ours(v3.runner.encoder, ids, [task])[0] for task in TASKS}
    for a in TASKS:
        for b in TASKS:
            if a != b:
                assert (outputs[a] - outputs[b]).abs().max().item() > 1e-2, (a, b)


def test_mixed_task_batch_gives_the_vectors_of_single_task_batches(v3):
    ids = _random_ids([*LENGTHS, 5, 40], seed=3)
    tasks = [TASKS[i % len(TASKS)] for i in range(len(ids))]
    mixed = _ours(v3.runner.encoder, ids, tasks)
    for task in TASKS:
        members = [i for i, t in enumerate(tasks) if t == task]
        alone = _ours(v3.runner.encoder, [ids[i] for i in members], [task] * len(members))
        for i, single in zip(members, alone, strict=True):
            assert torch.equal(mixed[i], single), f"input {i} (task {task}) differs from its single-task batch"


@pytest.mark.parametrize("task", ["retrieval.query", None], ids=lambda t: t or "no-task")
def test_a_sequence_alone_and_inside_a_batch_is_bit_identical(task, v3):
    ids = _random_ids([9, 30, 3, 17], seed=4)
    together = _ours(v3.runner.encoder, ids, ["separation", task, "text-matching", None])
    alone = _ours(v3.runner.encoder, [ids[1]], [task])[0]
    assert torch.equal(together[1], alone)


def test_embed_options_pick_the_adapter_and_pool_like_the_reference(v3, v3_references):
    """Through the embedding head: instruction prefix + adapter per input, mean pooling, L2, and a
    Matryoshka cut, all inputs in one batch."""
    texts = ["how do rotary embeddings work", "RoPE rotates query and key pairs by position.", "a b c"]
    tasks = ["retrieval.query", "retrieval.passage", None]
    prefixed = [v3.tasks[t] + s if t else s for t, s in zip(tasks, texts, strict=True)]
    ids = [t.ids for t in v3.tokenizer.encode_batch(prefixed, truncate=False)]
    options = [EmbedOptions(task=tasks[0]), EmbedOptions(task=tasks[1], dimensions=16), EmbedOptions(task=None)]
    vectors = v3.runner.run(pack_sequences(ids), options)
    for i, task in enumerate(tasks):
        hidden = reference_hidden(v3_references[task], [ids[i]])[0]
        pooled = hidden.mean(0)[: options[i].dimensions or hidden.shape[1]]
        expected = F.normalize(pooled, dim=0)
        assert vectors[i].shape == expected.shape
        assert (torch.from_numpy(vectors[i]) - expected).abs().max().item() <= TOLERANCE


def test_warmup_runs_a_full_length_input(v3):
    v3.warmup()  # 8192 tokens of RoPE positions


def test_loaded_model_keeps_one_copy_of_the_base_weights(v3):
    """Base weights once plus the rank-4 factors of every task; no merged per-task copies."""
    c = json.loads((v3.path / "config.json").read_text())
    h, inter, vocab, types, layers = (c["hidden_size"], c["intermediate_size"], c["vocab_size"],
                                      c["type_vocab_size"], c["num_hidden_layers"])
    width = len(c["lora_adaptations"]) * c["lora_rank"]
    linears = [(h, 3 * h), (h, h), (h, inter), (inter, h)]
    base = (vocab + types) * h + 2 * h + layers * (sum(i * o + o for i, o in linears) + 4 * h)
    lora = (vocab + types) * width + 2 * width * h + layers * sum(width * (i + o) for i, o in linears)
    encoder = v3.runner.encoder
    assert sum(p.numel() for p in encoder.parameters()) == base + lora
    assert sum(b.numel() for b in encoder.buffers()) < h


def test_request_for_an_adapter_the_model_lacks_is_refused(v3):
    with pytest.raises(ValueError, match="no task adapter 'summarization'"):
        _ours(v3.runner.encoder, _random_ids([4], seed=5), ["summarization"])


def _rewrite(source: Path, out: Path, config_changes: dict | None = None, weight_change=None) -> Path:
    shutil.copytree(source, out)
    if config_changes is not None:
        config = json.loads((out / "config.json").read_text())
        config.update(config_changes)
        (out / "config.json").write_text(json.dumps(config))
    if weight_change is not None:
        weights = load_file(str(out / "model.safetensors"))
        weight_change(weights)
        save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task_instructions": {**tiny_jina.V3_INSTRUCTIONS, "summarization": ""}}, "'summarization'.*not one of"),
        ({"lora_adaptations": ["retrieval.query", "retrieval.query", "separation", "classification", "x"]},
         "names a task twice"),
        ({"lora_adaptations": tiny_jina.V3_TASKS[:4], "task_instructions": None}, r"lora_A has shape .*expected \(4,"),
        ({"lora_rank": 8}, "expected"),
        ({"lora_adaptations": None, "task_instructions": None}, "no lora_adaptations"),
        ({"rotary_emb_interleaved": True}, "interleaved"),
    ],
    ids=["unknown-task", "duplicate-task", "task-count", "rank", "adapters-without-config", "interleaved"],
)
def test_inconsistent_config_is_refused_with_a_plain_error(changes, message, v3_dir, tmp_path):
    path = _rewrite(v3_dir, tmp_path / "bad", config_changes=changes)
    with pytest.raises(CheckpointError, match=message):
        load_model("bad", path, device="cpu")


def test_malformed_lora_tensor_is_refused_with_a_plain_error(v3_dir, tmp_path):
    name = "roberta.encoder.layers.1.mlp.fc1.parametrizations.weight.0.lora_B"

    def transpose_b(weights):
        weights[name] = weights[name].transpose(1, 2).contiguous()

    path = _rewrite(v3_dir, tmp_path / "bad", weight_change=transpose_b)
    with pytest.raises(CheckpointError, match=r"fc1\.parametrizations\.weight\.0\.lora_B has shape \(5, 4, 64\)"):
        load_model("bad", path, device="cpu")


def test_missing_lora_tensor_is_refused_with_a_plain_error(v3_dir, tmp_path):
    name = "roberta.embeddings.word_embeddings.parametrizations.weight.0.lora_A"
    path = _rewrite(v3_dir, tmp_path / "bad", weight_change=lambda w: w.pop(name))
    with pytest.raises(CheckpointError, match=r"has no .*word_embeddings\.parametrizations\.weight\.0\.lora_A"):
        load_model("bad", path, device="cpu")


# ---- jina-clip-v2 text tower -----------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_jina.build_jina_clip_v2(tmp_path_factory.mktemp("jina") / "jina-clip-v2")


def test_clip_text_tower_applies_its_adapter_with_or_without_a_task(clip_dir):
    model = load_model("jina-clip-v2", clip_dir, device="cpu")
    encoder = model.runner.encoder
    assert encoder.adapter_names == ("retrieval.query",)
    assert encoder.weight_prefix == tiny_jina.CLIP_TEXT_PREFIX
    assert model.tasks == {"retrieval.query": tiny_jina.V3_INSTRUCTIONS["retrieval.query"]}
    assert model.default_task is None
    weights = load_file(str(clip_dir / "model.safetensors"))
    reference = reference_model(weights, tiny_jina.clip_text_config(), "retrieval.query",
                                prefix=tiny_jina.CLIP_TEXT_PREFIX)
    ids = _random_ids([5, 21, 1, 48], seed=6)
    expected = reference_hidden(reference, ids)
    assert _max_diff(_ours(encoder, ids, [None] * len(ids)), expected) <= TOLERANCE
    assert _max_diff(_ours(encoder, ids, ["retrieval.query"] * len(ids)), expected) <= TOLERANCE


def test_clip_with_an_unknown_text_backbone_is_refused(clip_dir, tmp_path):
    config = json.loads((clip_dir / "config.json").read_text())
    config["text_config"]["hf_model_name_or_path"] = "jinaai/jina-bert-flash-implementation"
    path = _rewrite(clip_dir, tmp_path / "bad", config_changes={"text_config": config["text_config"]})
    with pytest.raises(CheckpointError, match=r"text tower .* is not supported"):
        load_model("bad", path, device="cpu")


# ---- multilingual-e5-large (XLM-R, absolute positions) ----------------------------------------


def test_multilingual_e5_catalog_entry_mean_pools_prompted_inputs_like_transformers(tmp_path):
    from transformers import XLMRobertaModel

    path = tiny_jina.build_multilingual_e5(tmp_path / "e5")
    model = load_model("microsoft-multilingual-e5-large", path, device="cpu")
    assert model.family == "xlm-roberta"
    assert model.runner.pooling == "mean"
    assert model.prompts == {"query": "query: ", "passage": "passage: "}
    assert model.default_prompt_name == "passage"
    assert model.max_input_tokens == 512
    reference = XLMRobertaModel.from_pretrained(path, attn_implementation="eager").eval()

    texts = [model.prompts["query"] + "how much protein should a female eat",
             model.prompts["passage"] + "As a general guideline, the CDC's average requirement of protein "
             "for women ages 19 to 70 is 46 grams per day. " * 24]
    encoded = model.tokenizer.encode_batch(texts, truncate=True)
    assert encoded[1].truncated and len(encoded[1].ids) == 512  # every position row used
    ids = [e.ids for e in encoded]
    assert all(1 not in seq for seq in ids)  # id 1 would count as padding for transformers
    vectors = model.runner.run(pack_sequences(ids), [EmbedOptions()] * len(ids))
    with torch.inference_mode():
        for seq, vector in zip(ids, vectors, strict=True):
            hidden = reference(input_ids=torch.tensor([seq])).last_hidden_state[0]
            expected = F.normalize(hidden.mean(0), dim=0)
            assert (torch.from_numpy(vector) - expected).abs().max().item() <= 1e-5
