"""LlamaIndex's OpenAI-compatible embedding class, ``OpenAILikeEmbedding``: text batches and queries
(it replaces newlines with spaces before sending); the error class it raises."""

import json
import sys

from llama_index.embeddings.openai_like import OpenAILikeEmbedding

job = json.loads(sys.argv[1])


def embedder(model):
    return OpenAILikeEmbedding(model_name=model, api_base=job["url"] + "/v1", api_key=job["api_key"],
                               max_retries=0, timeout=60.0)


def error_of(call):
    try:
        call()
    except Exception as exc:  # the class the client raised is what is checked
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "status": getattr(exc, "status_code", None), "message": str(exc)}
    return None


minilm = embedder("minilm")
out = {
    "documents": minilm.get_text_embedding_batch(job["texts"]),
    "query": minilm.get_query_embedding(job["query"]),
    "errors": {
        "unknown_model": error_of(lambda: embedder("text-embedding-3-small").get_query_embedding("x")),
    },
}
print(json.dumps(out))
