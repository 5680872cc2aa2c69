"""The packed BertEncoder computes what transformers' BertModel computes, token for token.

Every tiny variant is checked on packed batches that mix lengths from 1 token to the position limit,
on pair inputs with token type 1, on checkpoints saved by head classes (weights under ``bert.``) and
on checkpoints with the old ``LayerNorm.gamma/beta`` names. A sequence's hidden states must not
depend on what it was batched with.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from tests import tiny_checkpoints

VARIANTS = list(tiny_checkpoints.BERT_VARIANTS)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert-parity")
    return {name: tiny_checkpoints.build_bert(root / name, name) for name in VARIANTS}


@pytest.fixture(scope="module")
def reference_models(variant_dirs) -> dict[str, BertModel]:
    # Eager attention: a path independent of the SDPA calls our encoder makes.
    return {
        name: BertModel.from_pretrained(path, attn_implementation="eager").eval()
        for name, path in variant_dirs.items()
    }


@pytest.fixture(scope="module")
def our_models(variant_dirs):
    return {name: load_model(name, path, device="cpu") for name, path in variant_dirs.items()}


def _random_ids(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _mixed_lengths(max_positions: int) -> list[int]:
    """1 token up to the position limit, in no particular order."""
    return [7, 1, max_positions, 2, 33, max_positions - 1, 1, 16, max_positions // 2 + 3]


@torch.inference_mode()
def _ours(model, ids, type_ids=None) -> list[torch.Tensor]:
    batch = pack_sequences(ids, type_ids)
    hidden = model.runner.encoder(batch)
    cu = batch.cu_seqlens.tolist()
    return [hidden[cu[i] : cu[i + 1]] for i in range(len(ids))]


@torch.inference_mode()
def _reference(model: BertModel, ids, type_ids=None) -> list[torch.Tensor]:
    out = []
    for i, seq in enumerate(ids):
        types = None if type_ids is None else torch.tensor([type_ids[i]])
        out.append(model(input_ids=torch.tensor([seq]), token_type_ids=types).last_hidden_state[0])
    return out


def _assert_every_token_close(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a.shape == b.shape, f"sequence {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = (a - b).abs().max().item()
        assert diff <= TOLERANCE, f"sequence {i} (length {a.shape[0]}): max abs diff {diff:.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_batch_of_mixed_lengths_matches_transformers_on_every_token(variant, our_models, reference_models):
    cfg = tiny_checkpoints.BERT_VARIANTS[variant]
    max_positions = cfg.get("max_position_embeddings", 512)
    ids = _random_ids(_mixed_lengths(max_positions), 30522, seed=1)
    _assert_every_token_close(_ours(our_models[variant], ids), _reference(reference_models[variant], ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_token_batch_of_one_matches_transformers(variant, our_models, reference_models):
    ids = [[101]]
    _assert_every_token_close(_ours(our_models[variant], ids), _reference(reference_models[variant], ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pair_inputs_with_token_type_ids_match_transformers(variant, our_models, reference_models):
    type_vocab = tiny_checkpoints.BERT_VARIANTS[variant].get("type_vocab_size", 2)
    max_positions = tiny_checkpoints.BERT_VARIANTS[variant].get("max_position_embeddings", 512)
    # The longest pair fills the position limit: [CLS] a [SEP] b [SEP].
    firsts = _random_ids([3, 1, 20, max_positions // 2 - 1], 30522, seed=2)
    seconds = _random_ids([4, 1, 9, max_positions - max_positions // 2 - 2], 30522, seed=3)
    ids, type_ids = [], []
    for a, b in zip(firsts, seconds, strict=True):
        ids.append([101, *a, 102, *b, 102])
        second_type = 1 if type_vocab > 1 else 0
        type_ids.append([0] * (len(a) + 2) + [second_type] * (len(b) + 1))
    # A single-segment input in the same batch carries only type 0.
    ids.append([101, 2023, 102])
    type_ids.append([0, 0, 0])
    ours = _ours(our_models[variant], ids, type_ids)
    _assert_every_token_close(ours, _reference(reference_models[variant], ids, type_ids))
    if type_vocab > 1:
        # The type ids really reached the embeddings: ignoring them gives other hidden states.
        ignored = _ours(our_models[variant], ids)
        assert (ignored[0] - ours[0]).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def head_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, BertModel]]:
    """Checkpoints saved by head classes: encoder under ``bert.``, plus cls./classifier./pooler. weights."""
    import transformers

    root = tmp_path_factory.mktemp("bert-heads")
    out = {}
    for head, variant in [("BertForMaskedLM", "bert-tiny"), ("BertForSequenceClassification", "bert-tiny-gelu-new")]:
        path = tiny_checkpoints.build_bert_with_head(root / head, head, variant, seed=5)
        # The architecture alone says 'rerank' / 'sparse_embedding'; the settings file is how a user
        # serves such a checkpoint as dense embeddings.
        (path / "infercore.json").write_text('{"task": "text_embedding"}')
        full = getattr(transformers, head).from_pretrained(path, attn_implementation="eager").eval()
        out[head] = (path, full.bert)
    return out


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_checkpoint_with_bert_prefix_loads_as_embedding_encoder(head, head_checkpoints, caplog):
    from safetensors import safe_open

    path, reference = head_checkpoints[head]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("bert.", "cls.", "classifier.")) for k in keys), keys[:5]
    assert any(k.startswith(("cls.", "classifier.")) for k in keys)

    with caplog.at_level(logging.WARNING, logger="infercore.models"):
        model = load_model("head", path, device="cpu")
    # cls./classifier./pooler. weights are expected in such a checkpoint, not a sign of a wrong family.
    assert not [r for r in caplog.records if "unused" in r.getMessage()]

    ids = _random_ids([1, 12, 64, 5], 30522, seed=6)
    _assert_every_token_close(_ours(model, ids), _reference(reference, ids))


def test_old_gamma_beta_layer_norm_names_load(variant_dirs, reference_models, tmp_path):
    source = variant_dirs["bert-tiny-gelu-new"]
    old = tmp_path / "old-names"
    shutil.copytree(source, old)
    tiny_checkpoints.rename_layer_norm_to_gamma_beta(old)
    from safetensors import safe_open

    with safe_open(str(old / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("LayerNorm.gamma") for k in keys)
    assert not any(k.endswith("LayerNorm.weight") for k in keys)

    model = load_model("old", old, device="cpu")
    ids = _random_ids([3, 1, 40], 30522, seed=7)
    _assert_every_token_close(_ours(model, ids), _reference(reference_models["bert-tiny-gelu-new"], ids))


@pytest.mark.parametrize("length", [1, 3, 7, 12, 40, 200])
def test_hidden_states_are_bit_identical_alone_and_inside_a_batch(length, our_models):
    """CPU promise from DESIGN.md: same input, same output, whatever it was batched with."""
    model = our_models["bert-tiny"]
    target = _random_ids([length], 30522, seed=100 + length)[0]
    others = _random_ids([5, 90, 1, 31], 30522, seed=8)
    alone = _ours(model, [target])[0]
    for position in (0, 2, 4):
        batch = [*others[:position], target, *others[position:]]
        batched = _ours(model, batch)[position]
        assert torch.equal(alone, batched), (
            f"{length}-token input at batch position {position} differs from the same input alone "
            f"by up to {(alone - batched).abs().max().item():.3g}"
        )
