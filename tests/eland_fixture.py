"""Tiny ELSER-style archives in the three-file layout Elasticsearch's air-gapped installs hold:
``NAME.pt`` (TorchScript), ``NAME.vocab.json`` and ``NAME.metadata.json``.

What eland writes for ``--task-type text_expansion`` (eland/ml/pytorch/transformers.py and
traceable_model.py): ``AutoModelForMaskedLM`` loaded with ``torchscript=True`` (tuple outputs, decoder
weights cloned from the word embeddings), traced as it is (no wrapper for BERT) on one example padded
to the tokenizer's max length with the four inputs ml-cpp passes (input_ids, attention_mask,
token_type_ids, position_ids; position_ids 1-D), then ``torch.jit.freeze`` and ``torch.jit.save``.
Its output is the raw MLM logits [batch, tokens, vocab]. ELSER's own archive returns one pooled vocab
vector per input (Elasticsearch reads ``result[0][i]``), so ``pooled=True`` wraps the model in a module
that does SPLADE pooling inside the trace. ``layout="traced"`` saves the plain trace (weights as named
attributes); ``layout="optimized"`` also runs ``torch.jit.optimize_for_inference``, which stores linear
weights pre-transposed for ``matmul`` + ``add``.

The fixture runs on transformers 5 (eland pins < 5): ``torchscript=True`` is gone there, so
``return_dict=False`` gives the tuple and the decoder is untied by hand, as 4.x's clone did.

Every weight is drawn at random, biases and LayerNorm included, so that no two tensors are equal and
a mapping that swaps two of them fails the tests. Building one archive takes well under a second.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    ".", ",", "!", "?", "'", "-", "(", ")", ":",
    "the", "a", "an", "is", "are", "was", "this", "that", "of", "to", "in", "on", "and", "for", "with",
    "example", "sentence", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "cat", "elastic",
    "search", "sparse", "dense", "vector", "model", "token", "text", "hello", "world", "cafe", "run",
    "play", "walk", "talk", "house", "car", "red", "blue", "green", "new", "york", "city", "port",
    "sky", "data", "index", "query", "learn", "machine", "un", "re", "el",
    "The", "Hello", "Elastic", "New", "York", "CAFE",
    "##s", "##ed", "##ing", "##er", "##ly", "##search", "##izer", "##ize", "##able", "##ness", "##a",
    "##e", "##i", "##o", "##n", "##t", "##x", "##y", "##z", "##st", "##ic",
]


def vocabulary() -> list[str]:
    """About a hundred WordPiece tokens, specials first, no duplicates."""
    seen: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for word in WORDS:
        seen.setdefault(word)
    return list(seen)


@dataclass(frozen=True)
class TinyElser:
    """One built archive: its three files, the HF model it was traced from, and a vocab.txt for
    ``BertTokenizerFast``."""

    pt: Path
    vocab_json: Path
    metadata_json: Path
    vocab_txt: Path
    model: nn.Module  # transformers.BertForMaskedLM, eval mode
    do_lower_case: bool
    max_sequence_length: int
    pooled: bool
    layout: str  # "frozen" (what eland writes), "traced" or "optimized"

    @property
    def directory(self) -> Path:
        return self.pt.parent


class SpladePooledMlm(nn.Module):
    """An ELSER-like wrapper: per input, max over its tokens of log(1 + relu(logits))."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self._model = mlm

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids):
        logits = self._model(input_ids, attention_mask, token_type_ids, position_ids)[0]
        weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
        return torch.max(weights, dim=1).values


def build_mlm(num_heads: int = 2, seed: int = 0, tied_decoder: bool = True, hidden_size: int = 32,
              num_layers: int = 2, intermediate_size: int = 37, max_positions: int = 64,
              attn_implementation: str = "eager") -> nn.Module:
    """A random ``BertForMaskedLM`` over ``vocabulary()`` that returns tuples (what ``torchscript=True``
    gave eland's transformers 4.x). ``tied_decoder``: the decoder holds a copy of the word embeddings
    (eland's clone); otherwise its own random weights."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(vocabulary()), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, type_vocab_size=2, layer_norm_eps=1e-12,
        hidden_act="gelu", pad_token_id=0, return_dict=False,
    )
    config._attn_implementation = attn_implementation
    generator = torch.Generator().manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        word = model.bert.embeddings.word_embeddings.weight
        decoder = word.detach().clone() if tied_decoder else torch.randn(word.shape, generator=generator) * 0.5
        model.cls.predictions.decoder.weight = nn.Parameter(decoder)
    return model


def example_inputs(vocab: list[str], max_length: int) -> tuple[torch.Tensor, ...]:
    """eland's tracing example: one sentence padded to max_length, the four ml-cpp inputs."""
    ids = {t: i for i, t in enumerate(vocab)}
    tokens = ["[CLS]", "this", "is", "an", "example", "sentence", ".", "[SEP]"]
    input_ids = torch.full((1, max_length), ids["[PAD]"], dtype=torch.long)
    input_ids[0, : len(tokens)] = torch.tensor([ids[t] for t in tokens])
    attention_mask = (input_ids != ids["[PAD]"]).long()
    token_type_ids = torch.zeros_like(input_ids)
    position_ids = torch.arange(max_length, dtype=torch.long)
    return input_ids, attention_mask, token_type_ids, position_ids


LAYOUTS = ("frozen", "traced", "optimized")


def save_archive(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values baked into the trace
        traced = torch.jit.trace(module, inputs)
        if layout != "traced":
            traced = torch.jit.freeze(traced)
        if layout == "optimized":
            traced = torch.jit.optimize_for_inference(traced)
        torch.jit.save(traced, str(path))  # deprecated in favour of torch.export, but it is what eland uses


def write_vocab_json(path: Path, vocab: list[str]) -> None:
    path.write_text(json.dumps({"vocabulary": vocab}))


def write_metadata_json(path: Path, name: str, do_lower_case: bool, max_sequence_length: int) -> None:
    """The model-package metadata Elasticsearch downloads beside the archive (ModelPackageConfig),
    with the inference config eland writes for text_expansion."""
    metadata = {
        "packaged_model_id": name,
        "description": f"tiny test model {name}",
        "model_type": "pytorch",
        "minimum_version": "8.11.0",
        "size": 0,
        "sha256": "0" * 64,
        "tags": [],
        "vocabulary_file": f"{name}.vocab.json",
        "inference_config": {
            "text_expansion": {
                "tokenization": {
                    "bert": {
                        "do_lower_case": do_lower_case,
                        "with_special_tokens": True,
                        "max_sequence_length": max_sequence_length,
                        "truncate": "first",
                        "span": -1,
                    }
                }
            }
        },
        "metadata": {"per_deployment_memory_bytes": 0, "per_allocation_memory_bytes": 0},
    }
    path.write_text(json.dumps(metadata, indent=2))


def build_tiny_elser(out: Path, name: str = "tiny_elser", *, num_heads: int = 2, layout: str = "frozen",
                     pooled: bool = False, do_lower_case: bool = True, tied_decoder: bool = True,
                     seed: int = 0, max_sequence_length: int = 64,
                     attn_implementation: str = "eager") -> TinyElser:
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    model = build_mlm(num_heads=num_heads, seed=seed, tied_decoder=tied_decoder,
                      max_positions=max_sequence_length, attn_implementation=attn_implementation)
    traced_module = SpladePooledMlm(model).eval() if pooled else model
    pt = out / f"{name}.pt"
    save_archive(traced_module, example_inputs(vocab, max_sequence_length), pt, layout)
    vocab_json = out / f"{name}.vocab.json"
    write_vocab_json(vocab_json, vocab)
    metadata_json = out / f"{name}.metadata.json"
    write_metadata_json(metadata_json, name, do_lower_case, max_sequence_length)
    vocab_txt = out / "vocab.txt"  # for the reference BertTokenizerFast only; not part of the layout
    vocab_txt.write_text("\n".join(vocab) + "\n")
    return TinyElser(pt, vocab_json, metadata_json, vocab_txt, model, do_lower_case, max_sequence_length,
                     pooled, layout)
