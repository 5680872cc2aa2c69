"""The ``cohere`` clients: v1 ``Client`` (rerank, embed) and v2 ``ClientV2`` (rerank, embed by type);
the error classes they raise."""

import json
import sys

import cohere

job = json.loads(sys.argv[1])
v1 = cohere.Client(base_url=job["url"], api_key=job["api_key"], timeout=60)
v2 = cohere.ClientV2(base_url=job["url"], api_key=job["api_key"], timeout=60)


def ranked(response):
    return [[r.index, r.relevance_score] for r in response.results]


def error_of(call):
    try:
        call()
    except Exception as exc:  # the class the client raised is what is checked
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "status": getattr(exc, "status_code", None), "message": str(exc)}
    return None


query, documents = job["query"], job["documents"]
v2_embed = v2.embed(model="minilm", texts=job["texts"], input_type="search_document",
                    embedding_types=["float", "int8", "ubinary"])
out = {
    "v1_rerank": ranked(v1.rerank(model="cross", query=query, documents=documents, top_n=2)),
    "v1_embed": v1.embed(model="minilm", texts=job["texts"], input_type="search_document").embeddings,
    "v2_rerank": ranked(v2.rerank(model="cross", query=query, documents=documents)),
    "v2_rerank_cut": ranked(v2.rerank(model="cross", query=query, documents=documents[:1], max_tokens_per_doc=3)),
    "v2_embed_float": v2_embed.embeddings.float_,
    "v2_embed_int8": v2_embed.embeddings.int8,
    "v2_embed_ubinary": v2_embed.embeddings.ubinary,
    "v2_embed_e5_query": v2.embed(model=job["e5"], texts=[query], input_type="search_query",
                                  embedding_types=["float"]).embeddings.float_,
    "errors": {
        "unknown_model": error_of(lambda: v2.rerank(model="rerank-v3.5", query=query, documents=documents)),
        "empty_documents": error_of(lambda: v2.rerank(model="cross", query=query, documents=[])),
        "bad_embedding_type": error_of(lambda: v2.embed(model="minilm", texts=["x"], input_type="search_query",
                                                        embedding_types=["float16"])),
        "wrong_key": error_of(lambda: cohere.ClientV2(base_url=job["url"], api_key="wrong")
                              .rerank(model="cross", query=query, documents=documents)),
        "v1_unknown_model": error_of(lambda: v1.rerank(model="rerank-v3.5", query=query, documents=documents)),
    },
}
print(json.dumps(out))
