"""A tiny random jina-reranker-v3 checkpoint in the published layout (``JinaForRanking``).

- config.json: a Qwen3 config with ``architectures: ["JinaForRanking"]`` and the remote-code
  ``auto_map``, bos/eos naming the tokenizer's ``<|endoftext|>`` / ``<|im_end|>``;
- model.safetensors: the Qwen3 backbone under ``model.`` and ``projector.0.weight`` [H/2, H],
  ``projector.2.weight`` [E, H/2] (E = 24 here, not the published 512, so the size must be read from
  the weights); no lm_head;
- tokenizer.json: a small byte-level BPE with Qwen2's pre-tokenizer split, trained here on a fixed
  text, plus Qwen's chat tokens and the two ranking tokens (``<|embed_token|>``,
  ``<|rerank_token|>``) as added special tokens. Their ids follow from the tokenizer file
  (``special_token_ids``), as the published ones (151670, 151671) follow from Qwen's.

Shapes as in tests/tiny_llama_like.py: grouped-query attention, head_dim not hidden / heads, RMSNorm
weights that are not ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_llama_like import QWEN3_CONFIG

DOC_EMBED_TOKEN = "<|embed_token|>"
QUERY_EMBED_TOKEN = "<|rerank_token|>"
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/Qwen3).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_POSITIONS = 4096
LISTWISE_CONFIG = {
    **QWEN3_CONFIG,
    "max_position_embeddings": MAX_POSITIONS,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
}
PROJECTOR_OUTPUT = 24
TRAINING_TEXT = [
    "You are a search relevance expert who can determine a ranking of the passages based on how relevant they "
    "are to the query. If the query is a question, how relevant a passage is depends on how well it answers the "
    "question. If not, try to analyze the intent of the query and assess how well each passage satisfies the "
    "intent. If an instruction is provided, you should follow the instruction when determining the ranking.",
    "I will provide you with 12 passages, each indicated by a numerical identifier. Rank the passages based on "
    "their relevance to query: ",
    '<passage id="0">\n</passage>\n<passage id="1">\n</passage>\n<query>\n</query>\n',
    "assistant\n<think>\n\n</think>\n\n system user",
    "A lighthouse uses a rotating lamp and a Fresnel lens so that sailors see a flash pattern at night.",
    "Fog horns complement the light when visibility is poor; ships hear them from miles away.",
    "Sourdough bread needs a starter that is fed with flour and water every day.",
    "The keeper's cottage was painted white in 1902 and still stands on the cliff.",
    "Common swifts stay airborne for ten months and are thought to sleep on the wing.",
    "Frigatebirds sleep in flight, one brain hemisphere at a time, for seconds at once.",
]


def build_tokenizer(vocab_size: int = 600, ranking_tokens: bool = True):
    """A Qwen-like byte-level BPE: NFC, Qwen2 split + byte-level, no post-processor tokens; with the two
    ranking tokens added unless ``ranking_tokens`` is false."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(CHAT_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    if ranking_tokens:
        tokenizer.add_special_tokens([DOC_EMBED_TOKEN, QUERY_EMBED_TOKEN])
    return tokenizer


def special_token_ids(model_dir: Path) -> tuple[int, int]:
    """(document token id, query token id) of a checkpoint's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer.token_to_id(DOC_EMBED_TOKEN), tokenizer.token_to_id(QUERY_EMBED_TOKEN)


def build_listwise(out: Path, seed: int = 0, settings: dict | None = None) -> Path:
    """The checkpoint directory (+ ``infercore.json`` when ``settings``)."""
    from transformers import Qwen3Config, Qwen3Model

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": MAX_POSITIONS, "clean_up_tokenization_spaces": False,
    }))

    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {token: tokenizer.token_to_id(token) for token in CHAT_TOKENS}
    config = Qwen3Config(**{
        **LISTWISE_CONFIG, "vocab_size": vocab, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    })
    backbone = Qwen3Model(config).eval()
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in backbone.state_dict().items():
        if name.endswith("norm.weight"):  # transformers initialises them to ones, which hides misplaced norms
            param = 1.0 + 0.3 * torch.randn(param.shape, generator=gen)
        weights["model." + name] = param.contiguous()
    hidden = config.hidden_size
    weights["projector.0.weight"] = 0.2 * torch.randn(hidden // 2, hidden, generator=gen)
    weights["projector.2.weight"] = 0.2 * torch.randn(PROJECTOR_OUTPUT, hidden // 2, generator=gen)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    published = config.to_dict()
    published.update(architectures=["JinaForRanking"], auto_map={"AutoModel": "modeling.JinaForRanking"})
    (out / "config.json").write_text(json.dumps(published, indent=2))
    if settings:
        (out / "infercore.json").write_text(json.dumps(settings))
    return out
