"""infercore on Ray Serve (infercore/ray_serve.py) with a local Ray instance and two CPU replicas:
the dialects answer through Ray's proxy exactly as the plain server does, requests spread over both
replicas, and a replica killed under load loses no accepted request (each is answered, or re-sent by
the client after an error, and then answered), and is replaced.

Ray is an optional extra (``infercore[ray]``), not in the default locks: without it installed this
module is skipped. ``make test-ray`` builds ``.venv-ray`` (the CPU lock plus ``ray[serve]``) and runs it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra infercore[ray] (make test-ray)")
serve = pytest.importorskip("ray.serve")

from infercore.ray_serve import REPLICA_HEADER, build_app  # noqa: E402
from tests.server_process import free_port  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

APP = "infercore"
TEXTS = ["the first replica", "the second replica", "a longer text about " + "replicas " * 20]
READY_TIMEOUT_S = 180.0
CLIENTS = 4
# Load is bounded in time (the deadlines below) and, as a backstop, in count.
LOAD_MAX_REQUESTS = 20_000
LOAD_TIMEOUT_S = 30.0
# A replacement replica loads its model before it is routed to (~15-30 s on a busy 2-core machine).
REPLACEMENT_TIMEOUT_S = 120.0
# Re-sends of one request after an error answer (a replica that died mid-request); bounded.
CLIENT_RETRIES = 3


@pytest.fixture(scope="module")
def ray_serve_url(tiny_bert_dir):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "serve_flags": f"--model tiny={tiny_bert_dir} --device cpu --cpu-workers 1 --tokenization-workers 1",
            # Two fixed replicas on the 2-CPU local instance (the defaults reserve 2 CPUs each).
            "options": {"num_replicas": 2, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.5}},
        })
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[APP]
    return deployment.replica_states.get("RUNNING", 0)


def test_dialects_answer_as_the_plain_server_does(ray_serve_url, tiny_server):
    """Native, OpenAI and Elasticsearch routes through Ray give the plain server's vectors."""
    requests = [
        ("/embed", {"inputs": TEXTS}, lambda body: body),
        ("/v1/embeddings", {"input": TEXTS, "model": "tiny"}, lambda body: [d["embedding"] for d in body["data"]]),
        ("/_inference/text_embedding/tiny", {"input": TEXTS},
         lambda body: [e["embedding"] for e in body["text_embedding"]]),
    ]
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        for path, body, vectors in requests:
            through_ray = client.post(ray_serve_url + path, json=body)
            plain = client.post(tiny_server.url + path, json=body)
            assert through_ray.status_code == plain.status_code == 200, (path, through_ray.text)
            np.testing.assert_allclose(vectors(through_ray.json()), vectors(plain.json()), rtol=0, atol=1e-6)
        assert client.get(ray_serve_url + "/health").status_code == 200
        assert "infercore_queue_tokens" in client.get(ray_serve_url + "/metrics").text
        # a bad request keeps its dialect's 4xx answer through Ray
        bad = {"input": [], "model": "tiny"}
        through_ray = client.post(ray_serve_url + "/v1/embeddings", json=bad)
        plain = client.post(tiny_server.url + "/v1/embeddings", json=bad)
        assert 400 <= through_ray.status_code < 500
        assert (through_ray.status_code, through_ray.json()) == (plain.status_code, plain.json())


def test_requests_spread_over_both_replicas(ray_serve_url):
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        assert running_replicas() == 2
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda _: client.post(ray_serve_url + "/embed", json={"inputs": TEXTS}),
                                    range(24)))
    assert all(a.status_code == 200 for a in answers)
    replicas = {a.headers[REPLICA_HEADER] for a in answers}
    assert len(replicas) == 2, f"every request went to {replicas}"


def test_a_replica_killed_under_load_loses_no_accepted_request_and_comes_back(ray_serve_url):
    with httpx.Client(timeout=60.0, trust_env=False) as probe:
        reference = np.array(probe.post(ray_serve_url + "/embed", json={"inputs": TEXTS}).json())
    outcomes: list[tuple[int, int, str, bool]] = []  # (final status, error answers before it, replica, vectors ok)
    error_answers: list[str] = []  # what the client got before re-sending: status or transport error
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            while not stop.is_set() and len(outcomes) < LOAD_MAX_REQUESTS:
                errors = 0
                for _ in range(1 + CLIENT_RETRIES):
                    try:
                        response = http.post(ray_serve_url + "/embed", json={"inputs": TEXTS})
                    except httpx.TransportError as exc:
                        errors += 1
                        error_answers.append(type(exc).__name__)
                        continue
                    if response.status_code == 200:
                        break
                    errors += 1
                    error_answers.append(str(response.status_code))
                ok = response.status_code == 200 and np.allclose(response.json(), reference, rtol=0, atol=1e-6)
                outcomes.append((response.status_code, errors, response.headers.get(REPLICA_HEADER, ""), ok))

    deadline = time.monotonic() + LOAD_TIMEOUT_S
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client) for _ in range(CLIENTS)]
        try:
            while len({r for _, _, r, _ in outcomes}) < 2:
                assert time.monotonic() < deadline, "load never reached both replicas"
                time.sleep(0.05)
            victim_tag = outcomes[-1][2]
            victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim_tag in a["name"])
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            killed_at = len(outcomes)
            deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
            # Load goes on until a replica that did not exist before answers: the replacement.
            before = {r for _, _, r, _ in outcomes}
            while not ({r for _, _, r, _ in outcomes[killed_at:]} - before):
                assert time.monotonic() < deadline, (
                    f"no replacement replica answered: {len(outcomes) - killed_at} answers after the kill, from "
                    f"{ {r for _, _, r, _ in outcomes[killed_at:]} }; before: {before}; status {serve.status()}")
                time.sleep(0.05)
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=120.0)

    failed = [o for o in outcomes if o[0] != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests were never answered: {failed[:5]}"
    assert all(ok for *_, ok in outcomes), "an answer's vectors differ from the reference"
    assert victim_tag not in {r for _, _, r, _ in outcomes[killed_at + CLIENTS:]}
    assert running_replicas() == 2
    # Ray Serve does not re-send a request whose replica died under it: the client gets an error
    # answer and re-sends (embedding requests are pure functions, so that is safe). On record:
    print(f"\n{len(outcomes)} requests; error answers re-sent by the client: {sorted(error_answers)}")


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_cpu.yaml"])
def test_the_serve_configs_are_valid_ray_serve_configs(name):
    """The deploy/ray configs parse as Ray Serve deploy configs, name only options Ray knows, point at
    build_app and at this deployment, and their flags build an engine config."""
    import yaml
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from infercore.ray_serve import InfercoreReplica, server_config

    raw = yaml.safe_load((ROOT / "deploy" / "ray" / name).read_text())
    ServeDeploySchema.model_validate(raw)  # types and values
    [application] = raw["applications"]
    assert application["import_path"] == "infercore.ray_serve:build_app"
    [deployment] = application["deployments"]
    assert deployment["name"] == InfercoreReplica.name
    # Ray's schema lets unknown keys through; a misspelt option would silently do nothing.
    assert set(deployment) <= set(DeploymentSchema.model_fields), set(deployment) - set(DeploymentSchema.model_fields)
    assert set(deployment["autoscaling_config"]) <= set(AutoscalingConfig.model_fields)
    config = server_config(application["args"]["serve_flags"])
    gpu = deployment["ray_actor_options"].get("num_gpus", 0)
    assert config.device == ("cuda" if gpu else "cpu")
    if not gpu:
        # one single-threaded executor per reserved CPU
        assert config.cpu_workers == deployment["ray_actor_options"]["num_cpus"]
