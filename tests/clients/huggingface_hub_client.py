"""``huggingface_hub.InferenceClient`` with ``base_url`` (how it talks to a TEI server): feature
extraction, sentence similarity, text classification; the error class it raises."""

import json
import sys

from huggingface_hub import InferenceClient

job = json.loads(sys.argv[1])
client = InferenceClient(base_url=job["url"], api_key=job["api_key"], timeout=60)


def error_of(call):
    try:
        call()
    except Exception as exc:  # the class the client raised is what is checked
        response = getattr(exc, "response", None)
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "status": getattr(response, "status_code", None), "message": str(exc)}
    return None


classified = client.text_classification(job["query"])
out = {
    "feature_extraction": client.feature_extraction(job["query"]).tolist(),
    "sentence_similarity": client.sentence_similarity(job["query"], job["documents"]),
    "text_classification": [[c.label, c.score] for c in classified],
    "errors": {
        "empty_text": error_of(lambda: client.feature_extraction("")),
        "wrong_key": error_of(lambda: InferenceClient(base_url=job["url"], api_key="wrong")
                              .feature_extraction("x")),
    },
}
print(json.dumps(out))
