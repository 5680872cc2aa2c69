"""The deployment manifests in deploy/, checked offline, without a cluster:

- every Kustomize overlay renders with ``kubectl kustomize``;
- built-in kinds validate against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict:
  an unknown field is an error) of a pinned Kubernetes version;
- KServe, KEDA and Prometheus Operator resources validate against the ``openAPIV3Schema`` of their
  CRDs (tests/data/crds/, with source and version), made strict the same way;
- what the manifests promise about the server holds for the server in this checkout: every
  ``INFERCORE_*`` variable is a ``serve`` flag, the grace period outlasts preStop + drain, probes hit
  routes that answer, the writable paths are volumes, and the metrics the autoscalers read are ones
  a running server exports.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infercore.server.app import GRPC_STOP_GRACE_S
from infercore.server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KSERVE = ROOT / "deploy" / "kserve"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
CRDS = Path(__file__).resolve().parent / "data" / "crds"
# The oldest Kubernetes the manifests promise to work on (kubectl here is v1.32; the native preStop
# sleep action and other newer fields are deliberately not used).
KUBERNETES_VERSION = "1.32.0"
# The image's numeric user (Dockerfile.gpu: useradd --uid 10001).
IMAGE_UID = 10001
CRD_FILES = {
    ("serving.kserve.io", "ServingRuntime"): "serving.kserve.io_servingruntimes.v1alpha1.json",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.v1beta1.json",
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.v1alpha1.json",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.v1.json",
}
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


# ---- rendering -----------------------------------------------------------------------------------

@cache
def render(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render the Kustomize overlays with "
                    "`kubectl kustomize` (offline, no cluster needed); install kubectl >= 1.27")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def kserve_docs() -> list[dict]:
    return [doc for path in sorted(KSERVE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def group_of(doc: dict) -> str:
    api_version = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def all_docs() -> list[tuple[str, dict]]:
    return [(f"overlays/{o}", d) for o in OVERLAYS for d in render(o)] + [("kserve", d) for d in kserve_docs()]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def test_the_expected_overlays_exist():
    assert {"cpu", "gpu", "gpu-keda"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_deployment(overlay):
    kinds = sorted(d["kind"] for d in render(overlay))
    autoscaler = "ScaledObject" if overlay.endswith("keda") else "HorizontalPodAutoscaler"
    assert kinds == sorted(["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
                            autoscaler])
    assert {d["metadata"].get("namespace") for d in render(overlay)} == {"infercore"}


# ---- schemas -------------------------------------------------------------------------------------

def test_builtin_kinds_validate_against_the_kubernetes_schemas():
    checked = 0
    for where, doc in all_docs():
        if (group_of(doc), doc["kind"]) in CRD_FILES:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 3 * len(OVERLAYS)


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does
    (a structural schema otherwise only prunes them): ``additionalProperties: false`` wherever an
    object lists its properties and neither allows extra keys nor preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(group: str, kind: str) -> jsonschema.Draft202012Validator:
    crd = json.loads((CRDS / CRD_FILES[(group, kind)]).read_text())
    assert (crd["group"], crd["kind"]) == (group, kind)
    schema = strict(crd["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(group_of(doc), doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_custom_resources_validate_against_their_crd_schemas():
    seen = set()
    for where, doc in all_docs():
        key = (group_of(doc), doc["kind"])
        if key not in CRD_FILES:
            continue
        seen.add(key)
        assert doc["apiVersion"].split("/")[1] == json.loads((CRDS / CRD_FILES[key]).read_text())["version"]
        errors = crd_errors(doc)
        assert not errors, f"{where}: {doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)
    assert seen == set(CRD_FILES), f"no manifest uses {set(CRD_FILES) - seen}"


@pytest.mark.parametrize(
    "kind,where,mutate",
    [
        ("ServiceMonitor", "overlays/cpu", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
        ("ScaledObject", "overlays/gpu-keda", lambda d: d["spec"].update(minReplicas=2)),
        ("InferenceService", "kserve", lambda d: d["spec"]["predictor"]["model"].update(storageURI="pvc://x")),
        ("ServingRuntime", "kserve", lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="http")),
    ],
)
def test_the_crd_validation_catches_a_mistake(kind, where, mutate):
    """A typo'd field or a wrong type is an error, so the test above can fail."""
    doc = copy.deepcopy(next(d for w, d in all_docs() if w == where and d["kind"] == kind))
    mutate(doc)
    assert crd_errors(doc)


def test_the_kubernetes_validation_catches_a_mistake():
    deployment = copy.deepcopy(one(render("cpu"), "Deployment"))
    container(deployment)["readinessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# ---- what the manifests promise about this server -------------------------------------------------

def serve_flags() -> set[str]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {opt for action in serve._actions for opt in action.option_strings if opt.startswith("--")}


def pod_containers() -> list[tuple[str, dict]]:
    out = [(f"overlays/{o}", container(one(render(o), "Deployment"))) for o in OVERLAYS]
    runtime = one(kserve_docs(), "ServingRuntime")
    out += [("kserve runtime", c) for c in runtime["spec"]["containers"]]
    isvc = one(kserve_docs(), "InferenceService")
    out.append(("kserve isvc", isvc["spec"]["predictor"]["model"]))
    return out


def test_every_infercore_variable_is_a_serve_flag():
    flags = serve_flags()
    for where, c in pod_containers():
        for name in env_of(c):
            if name.startswith("INFERCORE_"):
                flag = "--" + name.removeprefix("INFERCORE_").lower().replace("_", "-")
                assert flag in flags, f"{where}: {name} is no `infercore serve` flag ({flag})"
        for arg in c.get("args", []):
            if arg.startswith("--"):
                assert arg in flags, f"{where}: {arg} is no `infercore serve` flag"


def prestop_seconds(c: dict) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_prestop_and_drain(overlay):
    deployment = one(render(overlay), "Deployment")
    c = container(deployment)
    env = env_of(c)
    drain_s = float(env["INFERCORE_DRAIN_TIMEOUT"])
    # a request admitted just before SIGTERM finishes inside the drain
    assert float(env["INFERCORE_REQUEST_TIMEOUT"]) <= drain_s
    needed = prestop_seconds(c) + drain_s + GRPC_STOP_GRACE_S
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_kserve_grace_period_outlasts_prestop_and_drain():
    runtime = one(kserve_docs(), "ServingRuntime")["spec"]["containers"][0]
    predictor = one(kserve_docs(), "InferenceService")["spec"]["predictor"]
    needed = prestop_seconds(runtime) + float(env_of(runtime)["INFERCORE_DRAIN_TIMEOUT"]) + GRPC_STOP_GRACE_S
    assert predictor["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_server_pods(overlay):
    docs = render(overlay)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Service": one(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, f"{kind} selects every pod of the namespace"
        assert selector.items() <= pod_labels.items(), f"{kind} selector {selector} misses the pods {pod_labels}"
    service_labels = one(docs, "Service")["metadata"]["labels"]
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()
    assert [e["port"] for e in monitor["endpoints"]] == ["http"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_security_and_volumes(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(one(docs, "Deployment"))
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(env["INFERCORE_GRPC_PORT"]) == ports["grpc"]
    assert "--port" not in c.get("args", []), "the image's entrypoint sets --port 8080"
    assert ports["http"] == 8080
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["http"]["targetPort"] == "http"

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]

    # With a read-only root, every place the server or its libraries write is a volume.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    writable = [path for path, m in mounts.items() if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR"):
        assert any(env[name] == w or env[name].startswith(w + "/") for w in writable), f"{name}={env[name]}"
    assert "/tmp" in writable
    # Weights from a read-only claim: nothing is downloaded (and the hub switches say so).
    models = mounts["/models"]
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
    assert c["args"] == ["--models-dir", "/models"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    # No egress at all.
    policy = one(docs, "NetworkPolicy")["spec"]
    assert "Egress" in policy["policyTypes"] and policy["egress"] == []
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"http", "grpc"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_per_device(overlay):
    deployment = one(render(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = env_of(c)
    if overlay.startswith("gpu"):
        assert env["INFERCORE_DEVICE"] == "cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert env["INFERCORE_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        # executors sized to the CPU limit, not to the node's cores
        assert int(env["INFERCORE_CPU_WORKERS"]) == int(c["resources"]["limits"]["cpu"])
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


def test_rolling_update_never_drops_capacity():
    for overlay in OVERLAYS:
        deployment = one(render(overlay), "Deployment")
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        assert one(render(overlay), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_probes_hit_routes_that_answer(tiny_server):
    """The probe paths answer 200 on a ready server (and /health 503 on a draining one:
    tests/test_drain.py)."""
    paths = set()
    for _, c in pod_containers():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                paths.add(c[probe]["httpGet"]["path"])
    assert paths == {"/health"}
    with tiny_server.client() as client:
        for path in paths:
            assert client.get(path).status_code == 200


# ---- autoscaling signals --------------------------------------------------------------------------

def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def series_name(rule: dict) -> str:
    match = METRIC_NAME.match(rule["seriesQuery"].strip("'\""))
    assert match, rule["seriesQuery"]
    return match.group(0)


def promql_metric_names(query: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers followed by a label matcher ``{``."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))


def exported_series(server_url: str) -> set[str]:
    response = httpx.get(server_url + "/metrics", timeout=30.0, trust_env=False)
    assert response.status_code == 200
    return {s.name for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_the_autoscaling_metrics_are_ones_the_server_exports(tiny_server):
    """Every series the Prometheus adapter rules, the KEDA ScaledObject and the KServe
    InferenceService query is exported by a running server (after one request, so the per-model
    counters have a sample)."""
    assert tiny_server.post("/embed", json={"inputs": "one request"}).status_code == 200
    exported = exported_series(tiny_server.url)

    queried = {series_name(rule) for rule in adapter_rules()}
    scaled_object = one(render("gpu-keda"), "ScaledObject")
    for trigger in scaled_object["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        queried |= promql_metric_names(trigger["metadata"]["query"])
    isvc = one(kserve_docs(), "InferenceService")
    for metric in isvc["spec"]["predictor"]["autoScaling"]["metrics"]:
        queried |= promql_metric_names(metric["external"]["metric"]["query"])

    assert queried >= {"infercore_queue_tokens", "infercore_input_tokens_total"}
    missing = queried - exported
    assert not missing, f"queried but not exported by the server: {missing}"


def test_the_hpa_reads_what_the_adapter_serves():
    served = {}
    for rule in adapter_rules():
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series_name(rule))
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "per-pod metrics need the pod label"
        served[rule["name"]["as"]] = rule
    for overlay in OVERLAYS:
        if overlay.endswith("keda"):
            continue
        hpa = one(render(overlay), "HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "infercore"}
        names = [m["pods"]["metric"]["name"] for m in hpa["metrics"]]
        assert set(names) == set(served), f"{overlay}: HPA metrics {names}, adapter serves {set(served)}"
        assert all(m["pods"]["target"]["type"] == "AverageValue" for m in hpa["metrics"])


def test_scaling_behaviour_damps_flapping():
    """Scale-down waits out a burst (5-minute stabilization, one pod at a time) in every autoscaler."""
    behaviours = [one(render(o), "HorizontalPodAutoscaler")["spec"]["behavior"]
                  for o in OVERLAYS if not o.endswith("keda")]
    behaviours.append(one(render("gpu-keda"), "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"][
        "behavior"])
    behaviours.append(one(kserve_docs(), "InferenceService")["spec"]["predictor"]["autoScaling"]["behavior"])
    for behavior in behaviours:
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300
        assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]


def test_keda_replaces_the_hpa_with_the_same_signals():
    docs = render("gpu-keda")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "two autoscalers on one Deployment"
    gpu_hpa = one(render("gpu"), "HorizontalPodAutoscaler")["spec"]
    triggers = one(docs, "ScaledObject")["spec"]["triggers"]
    assert [t["metadata"]["threshold"] for t in triggers] == [
        m["pods"]["target"]["averageValue"] for m in gpu_hpa["metrics"]
    ]
    assert all(t["metricType"] == "AverageValue" for t in triggers)


# ---- KServe ---------------------------------------------------------------------------------------

def test_kserve_runtime_and_inference_service_fit_together():
    runtime = one(kserve_docs(), "ServingRuntime")
    isvc = one(kserve_docs(), "InferenceService")
    spec = runtime["spec"]
    [c] = spec["containers"]
    assert c["name"] == "kserve-container"
    assert c["args"] == ["--model", "{{.Name}}=/mnt/models"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http1"] == 8080
    assert int(env_of(c)["INFERCORE_GRPC_PORT"]) == ports["grpc"] != 8080
    assert "v2" in spec["protocolVersions"] and "grpc-v2" in spec["protocolVersions"]
    assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}
    assert c["securityContext"]["runAsUser"] == IMAGE_UID and c["securityContext"]["readOnlyRootFilesystem"]
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/cache", "/tmp"} <= mounted and "/mnt/models" not in mounted  # KServe mounts the model

    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["storageUri"].startswith("pvc://")
    # KEDA in KServe wants each External metric's target as a Value (its validation webhook).
    for metric in isvc["spec"]["predictor"]["autoScaling"]["metrics"]:
        assert metric["type"] == "External" and metric["external"]["target"]["type"] == "Value"


# ---- Ray Serve configs (the Ray side is tested in tests/test_ray_serve.py, with the extra installed) --

@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_cpu.yaml"])
def test_ray_serve_configs_pass_valid_serve_flags(name):
    """``serve_flags`` are ``infercore serve`` flags (argparse exits on an unknown one) and leave the
    listeners to Ray's proxy."""
    import shlex

    raw = yaml.safe_load((ROOT / "deploy" / "ray" / name).read_text())
    flags = shlex.split(raw["applications"][0]["args"]["serve_flags"])
    build_parser().parse_args(["serve", *flags])
    assert not {f for f in flags if f.startswith("--")} & {"--host", "--port", "--grpc-port", "--tls-cert"}
