"""LangChain's ``OpenAIEmbeddings`` against an OpenAI-compatible server, as LangChain documents it for
one: ``check_embedding_ctx_length=False`` (its default tokenizes with tiktoken's cl100k vocabulary,
downloaded from openaipublic.blob.core.windows.net, and sends those token ids, which are not the
served model's vocabulary). Everything else at its defaults; the error class it raises."""

import json
import sys

from langchain_openai import OpenAIEmbeddings

job = json.loads(sys.argv[1])


def embedder(model, **settings):
    return OpenAIEmbeddings(model=model, base_url=job["url"] + "/v1", api_key=job["api_key"],
                            check_embedding_ctx_length=False, max_retries=0, **settings)


def error_of(call):
    try:
        call()
    except Exception as exc:  # the class the client raised is what is checked
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "status": getattr(exc, "status_code", None), "message": str(exc)}
    return None


minilm = embedder("minilm")
out = {
    "documents": minilm.embed_documents(job["texts"]),
    "query": minilm.embed_query(job["query"]),
    "dimensions": embedder("minilm", dimensions=128).embed_documents(job["texts"]),
    "errors": {
        "unknown_model": error_of(lambda: embedder("text-embedding-3-small").embed_query("x")),
    },
}
print(json.dumps(out))
