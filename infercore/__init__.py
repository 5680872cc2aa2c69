"""infercore: an inference server for dense embeddings, learned sparse embeddings and reranking."""

__version__ = "0.1.0"
