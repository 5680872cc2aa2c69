"""Compressed embedding types (Cohere's ``embedding_types``, Jina's ``embedding_type``).

- ``int8`` / ``uint8``: each vector scaled by its own largest magnitude to [-127, 127] and rounded;
  ``uint8`` is ``int8 + 128``. Per vector, so a vector's codes do not depend on the rest of the batch
  (a batch-calibrated scale would give the same text different codes in different requests).
- ``ubinary``: one bit per dimension, 1 where the value is positive, packed eight to a byte, most
  significant bit first (numpy ``packbits``), as unsigned bytes; ``binary`` is the same bytes as
  signed ``int8`` (``ubinary - 128``), Cohere's and sentence-transformers' definition. Both have
  ``ceil(dimensions / 8)`` entries.
"""

from __future__ import annotations

import numpy as np

from .errors import ValidationError

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")


def quantize(vector: np.ndarray, embedding_type: str) -> list[float] | list[int]:
    """``vector`` as the list ``embedding_type`` sends it."""
    if embedding_type == "float":
        return vector.tolist()
    if embedding_type in ("int8", "uint8"):
        peak = float(np.max(np.abs(vector))) if vector.size else 0.0
        scaled = np.zeros(vector.shape) if peak == 0.0 else vector.astype(np.float64) * (127.0 / peak)
        codes = np.clip(np.rint(scaled), -127, 127).astype(np.int16)
        return (codes + 128 if embedding_type == "uint8" else codes).tolist()
    if embedding_type in ("binary", "ubinary"):
        packed = np.packbits(vector > 0).astype(np.int16)
        return (packed - 128 if embedding_type == "binary" else packed).tolist()
    raise ValidationError(f"embedding type must be one of {', '.join(EMBEDDING_TYPES)}, got {embedding_type!r}")
