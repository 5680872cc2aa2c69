"""Random checkpoints at the catalog models' real sizes, for speed and memory benchmarks.

    python benchmarks/real_size_checkpoints.py [--out .cache/checkpoints] [--only bert-base-mlm,...]

Writes, in the published layouts (transformers' own classes, safetensors, never committed):

- ``bert-base-mlm``   BertForMaskedLM 12 x 768, vocab 30522 (ELSER's shape)
- ``xlm-roberta-large`` XLMRobertaModel 24 x 1024, vocab 250002 (multilingual-e5-large's shape)
- ``qwen3-0.6b``      Qwen3Model 28 x 1024, GQA 16/8, head_dim 128, vocab 151936
                      (jina-embeddings-v5-text-small / jina-reranker-v3 backbone)

Each folder gets the MiniLM WordPiece tokenizer (ids below 30522, fine for timing) and an
``infercore.json`` naming the task. A folder that is already complete is skipped. The weights are
random: these checkpoints measure speed and memory, never quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "checkpoints"

SPECS: dict[str, dict] = {
    "bert-base-mlm": {
        "class": "BertForMaskedLM", "config": "BertConfig", "task": "sparse_embedding",
        "config_args": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=512),
    },
    "xlm-roberta-large": {
        "class": "XLMRobertaModel", "config": "XLMRobertaConfig", "task": "text_embedding",
        "config_args": dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
    },
    "qwen3-0.6b": {
        "class": "Qwen3Model", "config": "Qwen3Config", "task": "text_embedding",
        "config_args": dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                            max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=True),
        "settings": {"pooling": "last"},
    },
}


def build(name: str, out: Path) -> Path:
    import torch
    import transformers

    from tests.tiny_checkpoints import copy_tokenizer

    target = out / name
    if (target / "infercore.json").is_file():
        print(f"{name}: already at {target}")
        return target
    spec = SPECS[name]
    started = time.perf_counter()
    torch.manual_seed(0)
    config = getattr(transformers, spec["config"])(**spec["config_args"])
    model = getattr(transformers, spec["class"])(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.0f}M parameters built in {time.perf_counter() - started:.0f}s; saving", flush=True)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    copy_tokenizer(target)
    settings = {"task": spec["task"], **spec.get("settings", {})}
    (target / "infercore.json").write_text(json.dumps(settings))  # last: marks the folder complete
    print(f"{name}: written to {target} in {time.perf_counter() - started:.0f}s", flush=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default=",".join(SPECS), help=f"comma-separated subset of {', '.join(SPECS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        parser.error(f"unknown checkpoints {unknown}; known: {', '.join(SPECS)}")
    for name in names:
        build(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
