"""Drive infercore's Open Inference Protocol with tritonclient (HTTP and gRPC), as a Triton user would.

Run by tests/test_oip.py with the tritonclient venv's python (tests/clients/README.md): argv[1] is the
job, {"url", "grpc_target", "api_key", "texts", "query", "documents"}. Prints one JSON document: what
each call returned (vectors, scores) and which error class bad input raised, for the test to compare
against the native routes.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def drive(module, client, headers, texts, query, documents):
    out = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready("tiny", headers=headers),
    }
    metadata = client.get_model_metadata("tiny", headers=headers)
    if not isinstance(metadata, dict):  # gRPC answers a message
        from google.protobuf.json_format import MessageToDict

        metadata = MessageToDict(metadata)
    out["metadata_inputs"] = [i["name"] for i in metadata["inputs"]]
    text = module.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    result = client.infer("tiny", [text], headers=headers)
    out["embedding"] = result.as_numpy("embedding").tolist()
    q = module.InferInput("query", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=np.object_))
    d = module.InferInput("documents", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([x.encode() for x in documents], dtype=np.object_))
    out["scores"] = client.infer("cross", [q, d], headers=headers).as_numpy("scores").tolist()
    s = module.InferInput("text", [1], "BYTES")
    s.set_data_from_numpy(np.array([texts[0].encode()], dtype=np.object_))
    sparse = client.infer("splade", [s], headers=headers)
    out["sparse"] = {n: sparse.as_numpy(n).tolist() for n in ("indices", "values", "offsets")}
    try:
        client.infer("tiny", [q], headers=headers)
        out["bad_input_error"] = None
    except InferenceServerException as exc:
        out["bad_input_error"] = [type(exc).__name__, str(exc.status()), exc.message()]
    try:
        client.infer("nope", [text], headers=headers)
        out["bad_model_error"] = None
    except InferenceServerException as exc:
        out["bad_model_error"] = [type(exc).__name__, str(exc.status()), exc.message()]
    return out


def main():
    job = json.loads(sys.argv[1])
    texts, query, documents = job["texts"], job["query"], job["documents"]
    http_client = httpclient.InferenceServerClient(job["url"].removeprefix("http://"))
    grpc_client = grpcclient.InferenceServerClient(job["grpc_target"])
    auth = f"Bearer {job['api_key']}"
    results = {
        "http": drive(httpclient, http_client, {"Authorization": auth}, texts, query, documents),
        "grpc": drive(grpcclient, grpc_client, {"authorization": auth}, texts, query, documents),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
