"""Tiny random Qwen3 / EuroBERT checkpoints and PEFT task adapters, plus the merged-weight reference.

Shapes pick the settings implementations get wrong: grouped-query attention, a head_dim that is not
hidden / heads, a non-default rotary base, RMSNorm weights that are not all ones, biases (EuroBERT).
Weights come from transformers' own classes with a fixed seed and ``save_pretrained``; the tokenizer
is the MiniLM WordPiece one (vocabulary 30522), which is enough for numerics. Adapter folders are
written in PEFT's layout by hand (random A and B, so every delta is non-zero).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.tiny_checkpoints import copy_tokenizer, write_sentence_transformers_files

QWEN3_CONFIG = dict(
    vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=24, intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 123456.0}, initializer_range=0.1,
)
EUROBERT_CONFIG = dict(
    vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=80, max_position_embeddings=96, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, initializer_range=0.1,
    attention_bias=True, mlp_bias=True,
    # special ids inside the MiniLM vocabulary (EuroBERT's own are above 128000)
    pad_token_id=0, bos_token_id=101, eos_token_id=102, mask_token_id=103,
)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises RMSNorm weights to ones, which would hide a norm applied in the wrong place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))


def _save(model: torch.nn.Module, out: Path, pooling: str | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    if pooling is not None:
        write_sentence_transformers_files(out, model.config.hidden_size, pooling)
    return out


def build_qwen3(out: Path, seed: int = 0, causal_lm: bool = False, pooling: str | None = "last", **config) -> Path:
    """Qwen3Model (or Qwen3ForCausalLM: weights under ``model.`` plus ``lm_head``) with random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**QWEN3_CONFIG, **config})
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()
    _randomize_norms(model, seed)
    return _save(model, out, pooling)


def build_eurobert(out: Path, seed: int = 0, pooling: str | None = "last", **config) -> Path:
    """EuroBertModel with random weights."""
    from transformers import EuroBertConfig, EuroBertModel

    torch.manual_seed(seed)
    model = EuroBertModel(EuroBertConfig(**{**EUROBERT_CONFIG, **config})).eval()
    _randomize_norms(model, seed)
    return _save(model, out, pooling)


def write_lora_adapter(
    model_dir: Path,
    task: str,
    base: torch.nn.Module,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ALL_TARGETS,
    layers: tuple[int, ...] | None = None,
) -> Path:
    """``model_dir/adapters/<task>/`` in PEFT's layout for ``base`` (the transformers base model whose
    linear layers are adapted): random A [r, in] and B [out, r] for every target in ``layers``."""
    out = model_dir / "adapters" / task
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        if layers is not None and int(name.split(".")[1]) not in layers:
            continue
        weights[f"base_model.model.{name}.lora_A.weight"] = 0.15 * torch.randn(rank, module.in_features, generator=gen)
        weights[f"base_model.model.{name}.lora_B.weight"] = 0.15 * torch.randn(module.out_features, rank, generator=gen)
    save_file(weights, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.1, "target_modules": list(targets), "bias": "none", "use_dora": False,
        "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def merged_reference(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """A copy of ``base`` with the adapter merged the way vLLM and PEFT merge it: W += B @ A * alpha / r."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            weight = merged.get_submodule(name).weight
            weight += (scale * (b.double() @ a.double())).to(weight.dtype)
    return merged.eval()


def random_ids(lengths: list[int], seed: int, vocab_size: int = 30522) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def reference_hidden(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """transformers' last hidden states, one unpadded sequence at a time."""
    return [model(input_ids=torch.tensor([seq])).last_hidden_state[0] for seq in ids]


@torch.inference_mode()
def packed_hidden(
    encoder: torch.nn.Module, ids: list[list[int]], tasks: list[str | None] | None = None
) -> list[torch.Tensor]:
    """Our encoder's hidden states for ``ids`` packed into one batch, split back per sequence."""
    import dataclasses

    from infercore.models.packing import pack_sequences

    batch = pack_sequences(ids)
    if tasks is not None:
        batch = dataclasses.replace(batch, adapters=tuple(tasks))
    hidden = encoder(batch)
    cu = batch.cu_seqlens.tolist()
    return [hidden[cu[i] : cu[i + 1]] for i in range(len(ids))]


def max_abs_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
