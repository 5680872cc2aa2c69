"""The ``openai`` client: embeddings as floats, base64 (its default), token ids, dimensions and the
input_type extension; the error classes it raises."""

import json
import sys

import openai

job = json.loads(sys.argv[1])
client = openai.OpenAI(base_url=job["url"] + "/v1", api_key=job["api_key"], max_retries=0, timeout=60.0)


def vectors(response):
    return [d.embedding for d in sorted(response.data, key=lambda d: d.index)]


def error_of(call):
    try:
        call()
    except Exception as exc:  # the class the client raised is what is checked
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "status": getattr(exc, "status_code", None), "message": str(exc)}
    return None


embeddings = client.embeddings
out = {
    "base64": vectors(embeddings.create(input=job["texts"], model="minilm")),
    "float": vectors(embeddings.create(input=job["texts"], model="minilm", encoding_format="float")),
    "token_ids": vectors(embeddings.create(input=job["token_ids"], model="minilm")),
    "dimensions": vectors(embeddings.create(input=job["texts"], model="minilm", dimensions=128)),
    "e5_query": vectors(embeddings.create(input=[job["query"]], model=job["e5"],
                                          extra_body={"input_type": "search_query"})),
    "errors": {
        "unknown_model": error_of(lambda: embeddings.create(input="x", model="text-embedding-3-large")),
        "empty_input": error_of(lambda: embeddings.create(input=[], model="minilm")),
        "unknown_field": error_of(lambda: embeddings.create(input="x", model="minilm", extra_body={"dimension": 8})),
        "outside_vocabulary": error_of(lambda: embeddings.create(input=[[101, 10**6, 102]], model="minilm")),
        "wrong_key": error_of(lambda: openai.OpenAI(base_url=job["url"] + "/v1", api_key="wrong", max_retries=0)
                              .embeddings.create(input="x", model="minilm")),
    },
}
print(json.dumps(out))
