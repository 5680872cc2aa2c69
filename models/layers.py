"""Building blocks shared by the model families: activations and weight-loading helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names for the activations our families use.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


# torch's ``approximate`` for each GELU name above: lets a layer hand its activation to the fused
# bias + GELU kernel (kernels/bias_gelu.py). Names not listed run unfused.
GELU_APPROXIMATE: dict[str, str] = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_pytorch_tanh": "tanh",
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(
            f"unsupported activation {name!r} (supported: {', '.join(sorted(ACTIVATIONS))})"
        ) from None


def find_prefix(keys: Mapping[str, object] | list[str], suffix: str) -> str:
    """The prefix in front of ``suffix`` in a checkpoint's key names ('' / 'bert.' / 'roberta.' ...).

    Checkpoints of the same family differ only by such a prefix depending on the head class that
    saved them (BertModel vs BertForMaskedLM vs BertForSequenceClassification).
    """
    matches = sorted((k[: -len(suffix)] for k in keys if k.endswith(suffix)), key=len)
    if not matches:
        raise CheckpointError(f"no weight named '*{suffix}' in the checkpoint")
    return matches[0]


class WeightReader:
    """Takes tensors out of a checkpoint by name, converting dtype and device as they are taken.

    Every name taken is remembered so the loader can report what the checkpoint holds that no
    module used (a sign of a wrong family or head) without guessing.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 model_dir: Path | None = None):
        self._weights = weights
        self.device = device
        self.dtype = dtype
        # The model directory, for families with weights beside the checkpoint (PEFT task adapters).
        self.model_dir = model_dir
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._weights

    def keys(self) -> list[str]:
        return list(self._weights)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            tensor = self._weights[name]
        except KeyError:
            raise CheckpointError(f"checkpoint is missing the weight {name!r}") from None
        self.used.add(name)
        return tensor.to(device=self.device, dtype=dtype or self.dtype)

    def get_any(self, *names: str) -> torch.Tensor:
        """The first of ``names`` present (old BERT checkpoints say gamma/beta for weight/bias)."""
        for name in names:
            if name in self._weights:
                return self.get(name)
        raise CheckpointError(f"checkpoint is missing the weight {names[0]!r}")

    def unused(self) -> list[str]:
        return sorted(set(self._weights) - self.used)


def assign(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta-initialised) parameter with a loaded tensor, checking the shape."""
    current = getattr(module, name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{type(module).__name__}.{name}: checkpoint shape {tuple(tensor.shape)} does not match "
            f"the config's {tuple(current.shape)}"
        )
    setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))


def load_linear(linear: torch.nn.Linear, reader: WeightReader, prefix: str) -> None:
    assign(linear, "weight", reader.get(prefix + ".weight"))
    if linear.bias is not None:
        assign(linear, "bias", reader.get(prefix + ".bias"))


def load_layer_norm(norm: torch.nn.LayerNorm, reader: WeightReader, prefix: str) -> None:
    assign(norm, "weight", reader.get_any(prefix + ".weight", prefix + ".gamma"))
    assign(norm, "bias", reader.get_any(prefix + ".bias", prefix + ".beta"))


# ---- rotary positions (RoPE), rotate-half (GPT-NeoX) style: Jina's XLM-R, Qwen3, EuroBERT ----------


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[rotary_dim / 2] fp32 RoPE inverse frequencies, theta ** (-2i / rotary_dim), computed as
    transformers and Jina's XLM-R compute them."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim / 2] for each packed token's position: angles in fp32 (a bf16 position
    times a frequency loses the low bits at long range), then cast to ``dtype``, the dtype the
    rotation is computed in (``apply_rope``)."""
    angles = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``2 * cos.shape[-1]`` channels of x [T, heads, head_dim] (the
    rest pass through), computed in cos's dtype and returned in x's.

    Families pick the compute dtype through ``rope_cos_sin``: fp32 for Jina's XLM-R (its flash
    rotary runs in fp32), the activations' dtype for Qwen3 / EuroBERT (as transformers does).
    """
    rotary_dim = 2 * cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :rotary_dim].to(cos.dtype).chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
