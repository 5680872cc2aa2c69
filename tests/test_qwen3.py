"""The packed Qwen3 encoder computes what transformers' Qwen3Model computes, and its task adapters what
the same model computes with that adapter merged into its weights.

The tiny checkpoint has grouped-query attention (4 query / 2 key-value heads), a head_dim (24) that
is not hidden / heads, q/k norms and RMSNorm weights that are not ones, and a non-default rotary
base. Three PEFT adapters differ in rank, scale, targets and layers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM, Qwen3Model

from infercore.models.checkpoint import CheckpointError
from infercore.models.embedding import EmbedOptions
from infercore.models.llama_like import Qwen3Encoder
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from tests import tiny_llama_like as tiny

TOLERANCE = 1e-4
MAX_POSITIONS = tiny.QWEN3_CONFIG["max_position_embeddings"]
# task → (rank, alpha, targets, layers)
ADAPTERS = {
    "retrieval": (4, 8.0, tiny.ALL_TARGETS, None),
    "text-matching": (2, 4.0, ("q_proj", "v_proj"), (1,)),
    "clustering": (8, 4.0, ("k_proj", "o_proj", "up_proj", "down_proj"), None),
}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    path = tiny.build_qwen3(tmp_path_factory.mktemp("qwen3") / "qwen3-tiny", seed=0)
    base = Qwen3Model.from_pretrained(path)
    for i, (task, (rank, alpha, targets, layers)) in enumerate(ADAPTERS.items()):
        tiny.write_lora_adapter(path, task, base, seed=10 + i, rank=rank, alpha=alpha, targets=targets, layers=layers)
    (path / "infercore.json").write_text('{"default_task": "retrieval"}')
    return path


@pytest.fixture(scope="module")
def reference(qwen3_dir) -> Qwen3Model:
    # Eager attention: a path independent of the SDPA calls our encoder makes.
    return Qwen3Model.from_pretrained(qwen3_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def merged(qwen3_dir, reference) -> dict[str, Qwen3Model]:
    return {task: tiny.merged_reference(reference, qwen3_dir / "adapters" / task) for task in ADAPTERS}


@pytest.fixture(scope="module")
def served(qwen3_dir):
    return load_model("qwen3-tiny", qwen3_dir, device="cpu")


@pytest.fixture(scope="module")
def encoder(served) -> Qwen3Encoder:
    return served.runner.encoder


def _mixed_lengths() -> list[int]:
    return [7, 1, MAX_POSITIONS, 2, 33, MAX_POSITIONS - 1, 1, 16, 67]


def test_packed_batch_of_mixed_lengths_matches_transformers_on_every_token(encoder, reference):
    assert isinstance(encoder, Qwen3Encoder)
    ids = tiny.random_ids(_mixed_lengths(), seed=1)
    diff = tiny.max_abs_diff(tiny.packed_hidden(encoder, ids), tiny.reference_hidden(reference, ids))
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g}"


def test_config_facts_reach_the_encoder(encoder):
    cfg = encoder.config
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 4, 2)
    assert cfg.rope_theta == 123456.0 and cfg.causal and cfg.qk_norm
    assert encoder.max_positions == MAX_POSITIONS


def test_attention_is_causal(encoder):
    ids = tiny.random_ids([20], seed=2)[0]
    changed = [*ids[:-1], (ids[-1] + 1) % 30522]
    before, after = tiny.packed_hidden(encoder, [ids, changed])
    assert torch.equal(before[:-1], after[:-1])
    assert not torch.equal(before[-1], after[-1])


@pytest.mark.parametrize("length", [1, 5, 12, 40])
def test_hidden_states_are_bit_identical_alone_and_inside_a_batch(length, encoder):
    target = tiny.random_ids([length], seed=100 + length)[0]
    others = tiny.random_ids([5, 90, 1, 31], seed=8)
    alone = tiny.packed_hidden(encoder, [target])[0]
    for position in (0, 2, 4):
        batched = tiny.packed_hidden(encoder, [*others[:position], target, *others[position:]])[position]
        assert torch.equal(alone, batched), f"position {position}: {(alone - batched).abs().max().item():.3g}"


def test_last_token_embeddings_through_the_runner_match_transformers(served, reference):
    assert served.runner.pooling == "last"
    ids = tiny.random_ids([3, 1, 50, 9], seed=3)
    vectors = served.runner.run(pack_sequences(ids), [EmbedOptions()] * len(ids))
    for vector, hidden in zip(vectors, tiny.reference_hidden(reference, ids), strict=True):
        expected = F.normalize(hidden[-1], dim=0).numpy()
        np.testing.assert_allclose(vector, expected, atol=TOLERANCE)


def test_checkpoint_with_model_prefix_loads_and_ignores_lm_head(tmp_path, caplog):
    path = tiny.build_qwen3(tmp_path / "causal-lm", seed=3, causal_lm=True, tie_word_embeddings=False)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "lm_head.weight" in keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    with caplog.at_level(logging.WARNING, logger="infercore.models"):
        served = load_model("causal", path, device="cpu")
    assert not [r for r in caplog.records if "unused" in r.getMessage()]
    reference = Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").model.eval()
    ids = tiny.random_ids([4, 1, 60], seed=4)
    diff = tiny.max_abs_diff(tiny.packed_hidden(served.runner.encoder, ids), tiny.reference_hidden(reference, ids))
    assert diff <= TOLERANCE


# ---- task adapters ----------------------------------------------------------------------------

def test_loader_exposes_every_adapter_as_a_task(served, encoder):
    assert encoder.adapter_names == ("clustering", "retrieval", "text-matching")
    assert served.tasks == {"clustering": "", "retrieval": "", "text-matching": ""}
    assert served.default_task == "retrieval"


@pytest.mark.parametrize("task", list(ADAPTERS))
def test_each_task_matches_transformers_with_that_adapter_merged(task, encoder, merged, reference):
    ids = tiny.random_ids([9, 1, MAX_POSITIONS, 30], seed=5)
    ours = tiny.packed_hidden(encoder, ids, [task] * len(ids))
    diff = tiny.max_abs_diff(ours, tiny.reference_hidden(merged[task], ids))
    assert diff <= TOLERANCE, f"{task}: max abs diff {diff:.3g}"
    # The adapter changed something: the base model's output is far from it.
    assert tiny.max_abs_diff(ours, tiny.reference_hidden(reference, ids)) > 1e-2


@pytest.mark.parametrize("tasks", [
    ["retrieval", None, "text-matching", "retrieval", "clustering", None, "text-matching", "retrieval"],
    # groups under 16 rows, contiguous and scattered
    [None, "clustering", "retrieval", "clustering", "text-matching", "text-matching", None, None],
], ids=["long-groups", "short-groups"])
def test_mixed_task_batch_is_bit_identical_to_the_single_task_runs(tasks, encoder):
    """Each input of a mixed-task batch gets exactly what it gets in a batch of its own; inputs
    without a task get exactly the base model's output."""
    lengths = [6, 3, 1, 40, 17, 1, 25, 8] if "retrieval" in tasks[:1] else [4, 2, 5, 3, 1, 6, 2, 9]
    ids = tiny.random_ids(lengths, seed=6)
    mixed = tiny.packed_hidden(encoder, ids, tasks)
    for i, (seq, task) in enumerate(zip(ids, tasks, strict=True)):
        alone = tiny.packed_hidden(encoder, [seq], [task])[0]
        assert torch.equal(mixed[i], alone), f"input {i} ({task}): {(mixed[i] - alone).abs().max().item():.3g}"
        if task is None:
            assert torch.equal(alone, tiny.packed_hidden(encoder, [seq])[0])


def test_task_option_of_each_input_picks_its_adapter_through_the_runner(served, merged):
    tasks = ["clustering", "retrieval", None, "text-matching"]
    ids = tiny.random_ids([5, 11, 2, 1], seed=7)
    options = [EmbedOptions(task=t) for t in tasks]
    vectors = served.runner.run(pack_sequences(ids), options)
    base = Qwen3Model.from_pretrained(served.path, attn_implementation="eager").eval()
    for vector, seq, task in zip(vectors, ids, tasks, strict=True):
        model = merged[task] if task else base
        expected = F.normalize(tiny.reference_hidden(model, [seq])[0][-1], dim=0).numpy()
        np.testing.assert_allclose(vector, expected, atol=TOLERANCE)


def test_unknown_task_in_a_batch_is_refused(encoder):
    with pytest.raises(ValueError, match="no task adapter 'separation'"):
        tiny.packed_hidden(encoder, [[1, 2, 3]], ["separation"])


def test_peft_saved_adapter_matches_peft_forward(qwen3_dir, tmp_path):
    """The folder PEFT itself writes loads, and gives what PEFT's unmerged forward gives (rsLoRA scale)."""
    peft = pytest.importorskip("peft")
    path = _model_dir_without_adapters(qwen3_dir, tmp_path / "peft")
    base = Qwen3Model.from_pretrained(path, attn_implementation="eager").eval()
    targets = list(tiny.ALL_TARGETS)
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, lora_dropout=0.0, target_modules=targets)
    model = peft.get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                param.normal_(0, 0.3)
    model.save_pretrained(path / "adapters" / "peft-task")
    encoder = load_model("peft", path, device="cpu").runner.encoder
    assert encoder.adapter_names == ("peft-task",)
    ids = tiny.random_ids([7, 1, 33], seed=9)
    with torch.inference_mode():
        expected = [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in ids]
    assert tiny.max_abs_diff(tiny.packed_hidden(encoder, ids, ["peft-task"] * 3), expected) <= TOLERANCE


# ---- refusals ---------------------------------------------------------------------------------

def _model_dir_without_adapters(source: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "infercore.json":
            os.symlink(item, out / item.name)
        elif item.is_dir() and item.name != "adapters":
            os.symlink(item, out / item.name, target_is_directory=True)
    return out


def _break_config(key, value):
    def mutate(adapter: Path) -> None:
        import json

        config = json.loads((adapter / "adapter_config.json").read_text())
        config[key] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return mutate


def _break_weights(rename=None, reshape=None):
    def mutate(adapter: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(adapter / "adapter_model.safetensors"))
        key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
        if rename:
            weights[rename] = weights.pop(key)
        if reshape:
            weights[key] = weights[key][:, :reshape].contiguous()
        save_file(weights, str(adapter / "adapter_model.safetensors"))
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (_break_config("target_modules", ["q_proj", "embed_tokens"]), "embed_tokens"),
    (_break_weights(rename="base_model.model.layers.0.self_attn.q_norm.lora_A.weight"), "self_attn.q_norm"),
    (_break_weights(rename="base_model.model.embed_tokens.lora_embedding_A"), "unexpected adapter weight"),
    (_break_weights(reshape=10), "do not fit a projection"),
    (_break_config("r", 3), "rank r=3"),
    (_break_config("use_dora", True), "use_dora"),
    (_break_config("bias", "all"), "bias"),
], ids=["target-module", "target-weight", "embedding-lora", "shape", "rank", "dora", "bias"])
def test_adapters_infercore_cannot_compute_exactly_are_refused(mutate, message, qwen3_dir, tmp_path):
    import shutil

    path = _model_dir_without_adapters(qwen3_dir, tmp_path / "model")
    adapter = shutil.copytree(qwen3_dir / "adapters" / "retrieval", path / "adapters" / "retrieval")
    mutate(adapter)
    with pytest.raises(CheckpointError, match=message):
        load_model("broken", path, device="cpu")


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_configs_it_would_compute_wrongly_are_refused(change, message):
    config = {**tiny.QWEN3_CONFIG, "model_type": "qwen3", **change}
    with pytest.raises(CheckpointError, match=message):
        Qwen3Encoder.config_from_hf(config)


def test_rope_theta_of_a_pre_transformers_5_config_is_read():
    config = {k: v for k, v in tiny.QWEN3_CONFIG.items() if k != "rope_parameters"}
    assert Qwen3Encoder.config_from_hf({**config, "rope_theta": 3500000, "rope_scaling": None}).rope_theta == 3.5e6
