"""Segment pooling, Matryoshka truncation and L2, against a padded reference and sentence-transformers.

``segment_pool`` works on packed tokens; the references here work on the padded [B, L, H] layout
that sentence-transformers' ``Pooling`` module sees, so a packing or offset mistake shows up as a
mismatch. The end-to-end tests check whole tiny checkpoints (tokenizer → encoder → pooling → L2)
against ``SentenceTransformer.encode``, prompts included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from infercore.kernels.segment_pool import POOLING_MODES, padded_pool, segment_pool, truncate_normalize
from infercore.models.embedding import EmbedOptions
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from tests import tiny_checkpoints

ST_MODE = {"cls": "cls", "mean": "mean", "max": "max", "last": "lasttoken", "mean_sqrt_len": "mean_sqrt_len_tokens"}
WIDTH = 24


def _packed(lengths: list[int], dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), WIDTH, generator=gen).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hidden, cu


def _padded(hidden: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H] zero-padded on the right, and the [B, L] 0/1 attention mask."""
    padded = torch.zeros(len(lengths), max(lengths), hidden.shape[1], dtype=hidden.dtype)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :n] = hidden[start : start + n]
        mask[i, :n] = 1
        start += n
    return padded, mask


def padded_reference(
    hidden: torch.Tensor, lengths: list[int], mode: str, skip: list[int] | None = None
) -> torch.Tensor:
    """The obvious padded computation, in float64: mask out padding and skipped leading tokens, reduce."""
    padded, mask = _padded(hidden.double(), lengths)
    if skip is not None:
        for i, s in enumerate(skip):
            mask[i, :s] = 0
    counted = mask.unsqueeze(-1).bool()
    out = []
    for i, n in enumerate(lengths):
        rows = padded[i][counted[i, :, 0]]
        if mode == "cls":
            out.append(rows[0])
        elif mode == "last":
            out.append(padded[i, n - 1])
        elif mode == "max":
            out.append(rows.max(dim=0).values)
        elif mode == "mean":
            out.append(rows.sum(dim=0) / rows.shape[0])
        elif mode == "mean_sqrt_len":
            out.append(rows.sum(dim=0) / rows.shape[0] ** 0.5)
    return torch.stack(out)


def st_pooling(hidden: torch.Tensor, lengths: list[int], mode: str, prompt_length: int = 0) -> torch.Tensor:
    """sentence-transformers' own Pooling module on the padded batch."""
    padded, mask = _padded(hidden, lengths)
    module = Pooling(WIDTH, pooling_mode=ST_MODE[mode], include_prompt=prompt_length == 0)
    features = {"token_embeddings": padded, "attention_mask": mask}
    if prompt_length:
        features["prompt_length"] = prompt_length
    return module(features)["sentence_embedding"]


LENGTHS = [1, 5, 1, 17, 3, 64, 2]


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_segment_pool_matches_padded_reference(mode):
    hidden, cu = _packed(LENGTHS)
    out = segment_pool(hidden, cu, mode)
    assert out.shape == (len(LENGTHS), WIDTH)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), padded_reference(hidden, LENGTHS, mode), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_segment_pool_matches_sentence_transformers_pooling(mode):
    hidden, cu = _packed(LENGTHS, seed=1)
    torch.testing.assert_close(segment_pool(hidden, cu, mode), st_pooling(hidden, LENGTHS, mode), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_skip_leading_matches_sentence_transformers_include_prompt_false(mode):
    lengths = [4, 9, 3, 30]  # every sequence longer than the prompt, as with a real prompt + [SEP]
    prompt_length = 2
    hidden, cu = _packed(lengths, seed=2)
    skip = torch.full((len(lengths),), prompt_length)
    torch.testing.assert_close(
        segment_pool(hidden, cu, mode, skip_leading=skip),
        st_pooling(hidden, lengths, mode, prompt_length),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_skip_leading_is_per_sequence(mode):
    lengths = [4, 9, 3, 30, 1]
    skip = [1, 5, 0, 29, 0]
    hidden, cu = _packed(lengths, seed=3)
    out = segment_pool(hidden, cu, mode, skip_leading=torch.tensor(skip))
    torch.testing.assert_close(out.double(), padded_reference(hidden, lengths, mode, skip), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_length_one_sequences_pool_to_their_only_token(mode):
    hidden, cu = _packed([1, 1, 1], seed=4)
    torch.testing.assert_close(segment_pool(hidden, cu, mode), hidden)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_batch_of_one_matches_reference(mode):
    hidden, cu = _packed([11], seed=5)
    out = segment_pool(hidden, cu, mode)
    assert out.shape == (1, WIDTH)
    torch.testing.assert_close(out.double(), padded_reference(hidden, [11], mode), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_half_precision_hidden_states_pool_in_float32(mode):
    hidden, cu = _packed(LENGTHS, dtype=torch.bfloat16, seed=6)
    out = segment_pool(hidden, cu, mode)
    assert out.dtype == torch.float32
    # Same bf16 values, reduced in float64: a bf16 accumulator would be off by ~1e-2 on 64 tokens.
    torch.testing.assert_close(out.double(), padded_reference(hidden, LENGTHS, mode), atol=1e-5, rtol=1e-5)


def _garbage_padded(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[B, L, H] with the padding positions full of large values: a pooling that lets padding in
    (any mode, max included) is visibly off."""
    padded, mask = _padded(hidden, lengths)
    return torch.where(mask.bool().unsqueeze(-1), padded, torch.full_like(padded, 1e4))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padded_pool_matches_the_reference_with_padding_and_prompts(mode):
    """The ONNX backend pools its padded output with ``padded_pool``: the same vectors as packing."""
    lengths = [4, 9, 3, 30, 1]
    hidden, _ = _packed(lengths, seed=7)
    padded = _garbage_padded(hidden, lengths)
    torch.testing.assert_close(padded_pool(padded, lengths, mode).double(), padded_reference(hidden, lengths, mode),
                               atol=1e-6, rtol=1e-6)
    skip = [1, 5, 0, 29, 0]
    torch.testing.assert_close(padded_pool(padded, lengths, mode, skip).double(),
                               padded_reference(hidden, lengths, mode, skip), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padded_pool_of_rows_without_padding_matches_the_reference(mode):
    lengths = [12, 12, 12]  # a group of one length: the shortcut over every position
    hidden, _ = _packed(lengths, seed=8)
    padded, _ = _padded(hidden, lengths)
    torch.testing.assert_close(padded_pool(padded, lengths, mode).double(), padded_reference(hidden, lengths, mode),
                               atol=1e-6, rtol=1e-6)


def test_segment_pool_rejects_unknown_mode():
    hidden, cu = _packed([2])
    with pytest.raises(ValueError, match="weightedmean"):
        segment_pool(hidden, cu, "weightedmean")


def test_truncate_then_normalize_keeps_leading_dims_and_unit_length():
    gen = torch.Generator().manual_seed(7)
    pooled = torch.randn(4, WIDTH, generator=gen)
    dims = torch.tensor([WIDTH, 8, 1, 3])
    normalize = torch.tensor([True, True, True, False])
    out = truncate_normalize(pooled, dims, normalize)
    assert out.shape == pooled.shape
    for i, d in enumerate(dims.tolist()):
        head = pooled[i, :d]
        expected = head / head.norm() if normalize[i] else head
        torch.testing.assert_close(out[i, :d], expected)
        assert torch.count_nonzero(out[i, d:]) == 0
    # Truncate first, then normalise: the kept prefix itself has unit length.
    torch.testing.assert_close(out[:3].norm(dim=1), torch.ones(3))


def test_normalize_off_returns_raw_pooled_vector():
    gen = torch.Generator().manual_seed(8)
    pooled = torch.randn(2, WIDTH, generator=gen) * 10
    out = truncate_normalize(pooled, torch.tensor([WIDTH, WIDTH]), torch.tensor([False, False]))
    torch.testing.assert_close(out, pooled)


# ---- end to end: tiny checkpoints against SentenceTransformer.encode ----

TEXTS = [
    "hello world",
    "a",
    "Fjords, glaciers and the long polar night.",
    "héllo wörld, ünïcode façade",
    "the quick brown fox jumps over the lazy dog " * 30,  # past the 128-token limit: truncated
]
PROMPTS = {"query": "query: ", "document": ""}


@pytest.fixture(scope="module")
def pooling_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per pooling mode, with prompts whose tokens pooling leaves out."""
    root = tmp_path_factory.mktemp("pooling")
    dirs = {
        mode: tiny_checkpoints.build_bert(root / mode, pooling=mode, prompts=PROMPTS, include_prompt=False)
        for mode in POOLING_MODES
    }
    dirs["mean+prompt"] = tiny_checkpoints.build_bert(
        root / "mean-include-prompt", pooling="mean", prompts=PROMPTS, include_prompt=True
    )
    return dirs


def _ours(model, texts: list[str], prompt_name: str | None = None, **options) -> np.ndarray:
    """What the engine does: prepend the prompt text, tokenize, pack, pool without the prompt's tokens."""
    prompt = model.prompts[prompt_name] if prompt_name else ""
    tokenized = model.tokenizer.encode_batch([prompt + t for t in texts], truncate=True)
    batch = pack_sequences([t.ids for t in tokenized], [t.type_ids for t in tokenized])
    opts = EmbedOptions(skip_leading=model.prompt_skip_tokens(prompt_name), **options)
    return np.stack(model.runner.run(batch, [opts] * len(texts)))


def _assert_same_vectors(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.99999, f"cosine per text: {cosine}"
    assert np.abs(ours - reference).max() <= 1e-5, f"max abs diff {np.abs(ours - reference).max():.3g}"


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_mode_matches_sentence_transformers_encode(mode, pooling_dirs):
    path = pooling_dirs[mode]
    model = load_model(mode, path, device="cpu")
    assert model.runner.pooling == mode
    _assert_same_vectors(_ours(model, TEXTS), SentenceTransformer(str(path), device="cpu").encode(TEXTS))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_prompt_left_out_of_pooling_matches_sentence_transformers(mode, pooling_dirs):
    path = pooling_dirs[mode]
    model = load_model(mode, path, device="cpu")
    assert not model.include_prompt
    assert model.prompt_skip_tokens("query") == 3  # [CLS] query :
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, prompt_name="query")
    _assert_same_vectors(_ours(model, TEXTS, "query"), reference)


def test_prompt_included_in_pooling_matches_sentence_transformers(pooling_dirs):
    path = pooling_dirs["mean+prompt"]
    model = load_model("mean+prompt", path, device="cpu")
    assert model.prompt_skip_tokens("query") == 0
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, prompt_name="query")
    _assert_same_vectors(_ours(model, TEXTS, "query"), reference)


def test_empty_prompt_leaves_no_token_out_of_pooling(pooling_dirs):
    """sentence-transformers 6 saves empty "query"/"document" prompts by default; an empty prompt adds
    no tokens, so with include_prompt=False nothing may be skipped (not even [CLS])."""
    path = pooling_dirs["mean"]
    model = load_model("mean", path, device="cpu")
    assert model.prompt_skip_tokens("document") == 0
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, prompt_name="document")
    _assert_same_vectors(_ours(model, TEXTS, "document"), reference)


def test_requested_dimensions_are_truncated_before_normalising(pooling_dirs):
    model = load_model("mean", pooling_dirs["mean"], device="cpu")
    full = _ours(model, TEXTS, normalize=False)
    short = _ours(model, TEXTS, dimensions=8)
    assert short.shape == (len(TEXTS), 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    # normalize=False gives the raw pooled vector, not a unit vector
    assert not np.allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-3)


class _TanhDense(torch.nn.Module):
    """A sentence-transformers Dense layer's shape (``linear`` + activation), random weights."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("with_dense", [False, True], ids=["pooling-only", "dense"])
def test_the_head_on_a_padded_layout_gives_what_it_gives_on_packed_tokens(with_dense):
    """``pool_padded`` (the ONNX backend's head) against ``pool`` on the same tokens packed, with a
    different option on every row: a prompt left out, a Matryoshka cut, no normalisation, per token."""
    from infercore.models.embedding import EmbeddingModel

    class Encoder:
        hidden_size = WIDTH

    torch.manual_seed(9)
    model = EmbeddingModel(Encoder(), "mean", [_TanhDense(WIDTH, 16)] if with_dense else [])
    lengths = [6, 3, 9, 9, 5]
    options = [EmbedOptions(), EmbedOptions(skip_leading=2), EmbedOptions(dimensions=8),
               EmbedOptions(normalize=False), EmbedOptions(per_token=True)]
    hidden, cu = _packed(lengths, seed=10)
    packed = model.pool(hidden, cu, options)
    padded = model.pool_padded(_garbage_padded(hidden, lengths), lengths, options)
    for ours, theirs in zip(padded, packed):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert padded[2].shape == (8,) and padded[4].shape == (lengths[4], WIDTH)
    assert abs(np.linalg.norm(padded[0]) - 1) < 1e-5 and abs(np.linalg.norm(padded[3]) - 1) > 1e-3
