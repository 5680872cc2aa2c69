"""Server settings, filled from the command line (every flag also reads ``INFERCORE_<FLAG>``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..models.repository import ModelSource


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    models: list[ModelSource] = field(default_factory=list)
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    api_key: str | None = None
    # Largest batch the scheduler hands the model, in tokens (padding-free count).
    max_batch_tokens: int = 16384
    # Optional cap on sequences per batch.
    max_batch_requests: int | None = None
    # Inputs per request; more gets 413 (Elasticsearch's openai service sends up to 2048).
    max_client_batch_size: int = 2048
    # Lowers every model's own token limit when set.
    max_input_tokens: int | None = None
    # Default for requests that do not say whether to truncate over-long inputs.
    auto_truncate: bool = False
    # Largest request body accepted, in bytes.
    payload_limit_bytes: int = 8 * 1024 * 1024
    tokenization_workers: int = max(1, (os.cpu_count() or 2) - 1)
    log_level: str = "info"
