"""Where a model runs and in which dtype: ``--device`` / ``--dtype`` resolved to torch's terms.

Kept apart from loading so that the server can check ``--device`` before it binds its port, and so
that every way these settings go wrong raises one error type, ``DeviceError``, whose message names
the setting and what would have been accepted.
"""

from __future__ import annotations

import torch

from .checkpoint import CheckpointError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N, cuda:all, or a comma-separated list of CUDA devices (cuda:0,cuda:1)"

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_FORMS = "auto, " + ", ".join(DTYPES)


class DeviceError(CheckpointError):
    """A device or dtype that cannot be used here: unknown, not present, or not supported on that
    device. A CheckpointError, so every caller that reports why a model cannot load reports this too."""


def resolve_device(device: str) -> torch.device:
    """One device (a replica's): ``auto`` is the first CUDA device, or the CPU when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}; expected {DEVICE_FORMS}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but no CUDA device is available")
    return resolved


def resolve_devices(spec: str) -> list[torch.device]:
    """The devices ``--device`` names; the server loads one replica of each model on each.

    ``auto``: every visible CUDA device, or the CPU when there is none. ``cpu``; ``cuda`` (= cuda:0);
    ``cuda:N``; ``cuda:all``: every visible CUDA device; ``cuda:0,cuda:2``: those devices, in that
    order. CUDA_VISIBLE_DEVICES decides what is visible (and numbers it from 0). Raises DeviceError
    naming the problem: an unknown device, one listed twice, the CPU in a list, an index beyond the
    visible devices, CUDA without a CUDA device.
    """
    spec = spec.strip()
    entries = [entry.strip() for entry in spec.split(",")]
    if not all(entries):
        raise DeviceError(f"device list {spec!r} has an empty entry; expected {DEVICE_FORMS}")
    if entries == ["auto"]:
        entries = ["cuda:all"] if torch.cuda.is_available() else ["cpu"]
    if "cuda:all" in entries:
        if len(entries) > 1:
            raise DeviceError(f"device list {spec!r}: cuda:all already names every CUDA device; list nothing beside it")
        return [torch.device("cuda", i) for i in range(_visible_cuda_devices(spec))]
    parsed = [_parse_device(entry, spec) for entry in entries]
    if any(device.type == "cpu" for device in parsed):
        if len(parsed) > 1:
            raise DeviceError(
                f"device list {spec!r}: cpu cannot be combined with other devices (a list names CUDA devices only)"
            )
        return [torch.device("cpu")]
    available = _visible_cuda_devices(spec)
    devices: list[torch.device] = []
    for entry, device in zip(entries, parsed):
        if device.index >= available:
            raise DeviceError(
                f"device {entry!r} requested but only {available} CUDA device{'s' if available > 1 else ''} "
                f"{'are' if available > 1 else 'is'} visible (cuda:0 to cuda:{available - 1})"
            )
        if device in devices:
            raise DeviceError(f"device list {spec!r} names {device} twice")
        devices.append(device)
    return devices


def _parse_device(entry: str, spec: str) -> torch.device:
    """One entry of a device list: the CPU, or a CUDA device with its index (cuda = cuda:0)."""
    if entry == "auto":
        raise DeviceError(f"device list {spec!r}: auto cannot be combined with other devices")
    try:
        device = torch.device(entry)
    except RuntimeError:
        raise DeviceError(f"unknown device {entry!r}; expected {DEVICE_FORMS}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {entry!r} is not supported; expected {DEVICE_FORMS}")
    return torch.device("cuda", device.index or 0)


def _visible_cuda_devices(spec: str) -> int:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {spec!r} requested but no CUDA device is available")
    return count


def resolve_dtype(dtype: str, device: torch.device, cuda_default: torch.dtype) -> torch.dtype:
    """The dtype ``--dtype`` names on ``device``. ``auto``: ``cuda_default`` (the model family's) on
    CUDA, float32 on the CPU. Raises DeviceError for an unknown name and for float16 on the CPU."""
    if dtype == "auto":
        return cuda_default if device.type == "cuda" else torch.float32
    try:
        resolved = DTYPES[dtype]
    except KeyError:
        raise DeviceError(f"unknown dtype {dtype!r}; expected {DTYPE_FORMS}") from None
    if device.type == "cpu" and resolved == torch.float16:
        raise DeviceError("float16 is not supported on CPU; use float32 or bfloat16")
    return resolved
