"""The Kubernetes manifests validate and agree with the code they run.

Each overlay is rendered with `kubectl kustomize` (kustomize is built into kubectl) and every object is
checked: core objects against Kubernetes 1.37's schemas (kubernetes-validate, strict: an unknown field
fails), KubeRay's RayCluster and RayJob against the v1 CRDs of KubeRay 1.7.0 kept in
`tests/unit/kuberay/` (fields the API server would prune fail too), then against the settings, ports,
CLI and Ray version of this checkout.
"""

from __future__ import annotations

import copy
import gzip
import json
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from blockpress.runtime.cli.main import _parser
from blockpress.runtime.config import RuntimeSettings
from blockpress.workers.replica import NODE_KIND_LABEL

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = Path(__file__).with_name("kuberay")
OVERLAYS = ("mixed", "rtx-pro", "dgx-spark")
KINDS_OF = {"mixed": {"rtx-pro", "dgx-spark"}, "rtx-pro": {"rtx-pro"}, "dgx-spark": {"dgx-spark"}}
ARCH_OF = {"rtx-pro": "amd64", "dgx-spark": "arm64"}
# Secrets the operator creates before `kubectl apply -k` (k8s/README.md says how); all others optional.
REQUIRED_SECRETS = {"blockpress-redis"}


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders the kustomizations (`kubectl kustomize`); install kubectl"
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], check=True, capture_output=True, text=True)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    if doc["kind"] in {"Deployment", "StatefulSet"}:
        return [spec["template"]["spec"]]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(doc) for c in pod["containers"]]


@cache
def crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{plural}.yaml.gz").read_bytes()))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return dict(v1["schema"]["openAPIV3Schema"])


def pruned(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop silently: not in the schema's properties, nothing preserved."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key in schema["properties"]:
                found += pruned(item, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [p for key, item in value.items() for p in pruned(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and "items" in schema:
        return [p for i, item in enumerate(value) for p in pruned(item, schema["items"], f"{path}[{i}]")]
    return []


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        schema = crd_schema({"RayCluster": "rayclusters", "RayJob": "rayjobs"}[doc["kind"]])
        body = {k: v for k, v in doc.items() if k not in {"apiVersion", "kind", "metadata"}}
        jsonschema.validate(body, schema)
        assert not pruned(body, schema), (doc["kind"], pruned(body, schema))
        for pod in pod_specs(doc):  # the pod templates are core objects: strict Kubernetes schemas too
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": pod}, "1.37.0", strict=True
            )
    else:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def settings_of(docs: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch) -> RuntimeSettings:
    """The settings a process with `envFrom: blockpress-config` runs with."""
    for key, value in one(docs, "ConfigMap", "blockpress-config")["data"].items():
        monkeypatch.setenv(key, value)
    return RuntimeSettings()


def test_the_base_lists_every_manifest_and_each_cluster_shape_has_an_overlay() -> None:
    listed = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    assert listed == {f.name for f in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in (K8S / "overlays").iterdir()} == set(OVERLAYS)
    assert not list(K8S.glob("*.yaml"))  # nothing outside base/ and overlays/ that `apply -k` would miss


@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_object_validates_against_its_schema(target: str) -> None:
    docs = render(target)
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "StatefulSet", "Deployment", "PersistentVolumeClaim"}
    for doc in docs:
        validate(doc)


def test_the_validators_reject_a_misspelled_field() -> None:
    docs = render("base")
    cluster = copy.deepcopy(one(docs, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate(cluster)
    gateway = copy.deepcopy(one(docs, "Deployment", "blockpress-gateway"))
    gateway["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(gateway)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placement_node_kinds_and_worker_groups_agree(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(f"overlays/{overlay}")
    settings = settings_of(docs, monkeypatch)
    groups = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    kinds = {g["labels"][NODE_KIND_LABEL] for g in groups}  # the label replicas select on
    assert kinds == KINDS_OF[overlay]
    assert set(settings.placement["*"]) == kinds  # replicas ask only for kinds a group can provide
    for group in groups:
        kind = group["labels"][NODE_KIND_LABEL]
        options = settings.node_kinds[kind]
        assert options.device == "cuda" and options.quantization in {"nf4", "fp8"}
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["kubernetes.io/arch"] == ARCH_OF[kind]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["restartPolicy"] == "Never"  # autoscaler v2
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one replica = one engine = one GPU
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert int(group["rayStartParams"]["object-store-memory"]) < _bytes(shm["sizeLimit"])
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "blockpress-models"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert settings.replica_num_gpus == 1  # a replica waits for a GPU pod rather than landing on the head
    assert settings.max_replicas is not None and settings.max_replicas <= sum(g["maxReplicas"] for g in groups)
    for model in settings.models:
        assert model.startswith("/models/")


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_the_ray_cluster_autoscales_on_the_ray_of_the_image() -> None:
    cluster = one(render("base"), "RayCluster")["spec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_pool_is_a_ray_job_on_the_head_not_a_ray_client(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("overlays/mixed")
    job = one(docs, "RayJob")["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == one(docs, "RayCluster")["metadata"]["name"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "blockpress"
    args = _parser().parse_args(argv[1:])
    assert args.command == "replicas" and args.ray_address == "auto"
    for doc in docs:
        for c in containers(doc):
            assert not any("ray://" in str(part) for part in [*c.get("command", []), *c.get("args", [])])
    settings = settings_of(docs, monkeypatch)
    assert settings.max_replicas and settings.min_replicas is not None  # autoscaling on


@pytest.mark.parametrize("target", ["base", "overlays/mixed"])
def test_every_reference_resolves(target: str) -> None:
    docs = render(target)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        for pod in pod_specs(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names
            for c in pod["containers"]:
                for ref in c.get("envFrom", []):
                    assert ("ConfigMap", ref["configMapRef"]["name"]) in names
                for env in c.get("env", []):
                    secret = env.get("valueFrom", {}).get("secretKeyRef")
                    if secret and not secret.get("optional"):
                        assert secret["name"] in REQUIRED_SECRETS, secret
    readme = (K8S / "README.md").read_text()
    assert all(f"secret generic {name}" in readme for name in REQUIRED_SECRETS)
    if target != "base":
        images = {c["image"] for d in docs for c in containers(d)}
        assert "blockpress:0.1.0" not in images  # the overlay names a registry that holds the image


def test_every_blockpress_variable_is_a_setting() -> None:
    fields = {name.upper() for name in RuntimeSettings.model_fields}
    docs = render("overlays/mixed")
    keys = [k for k in one(docs, "ConfigMap", "blockpress-config")["data"]]
    keys += [e["name"] for d in docs for c in containers(d) for e in c.get("env", [])]
    for key in keys:
        if key.startswith("BLOCKPRESS_"):
            assert key.removeprefix("BLOCKPRESS_") in fields, key


def test_redis_has_auth_and_persistence_and_every_client_uses_the_password() -> None:
    docs = render("base")
    redis = one(docs, "StatefulSet", "blockpress-redis")
    (container,) = containers(redis)
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    urls = [e for d in docs for c in containers(d) for e in c.get("env", []) if e["name"] == "BLOCKPRESS_REDIS_URL"]
    assert len(urls) == 2  # the gateway and the Ray head (where the pool runs)
    assert all(e["value"].startswith("redis://:$(REDIS_PASSWORD)@blockpress-redis:6379/") for e in urls)


def test_probes_ride_out_a_redis_outage_and_the_drain_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("base")
    gateway = one(docs, "Deployment", "blockpress-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_of(docs, monkeypatch)
    assert pod["terminationGracePeriodSeconds"] > settings.drain_s
    port = int(container["args"][container["args"].index("--port") + 1])
    # Health goes NOT_SERVING while Redis is down: fine for readiness, never for liveness.
    assert "grpc" not in container["livenessProbe"] and container["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    readiness = container["readinessProbe"]
    assert readiness["grpc"]["port"] == port and readiness["periodSeconds"] * readiness["failureThreshold"] >= 30
    assert RuntimeSettings().port == port


def test_metrics_are_on_and_annotated_where_they_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("base")
    settings = settings_of(docs, monkeypatch)
    served = {
        "blockpress-gateway": settings.gateway_metrics_port,
        "head": settings.pool_metrics_port,
        "worker": settings.replica_metrics_port,
    }
    assert all(served.values())
    cluster = one(docs, "RayCluster")["spec"]
    templates = {
        "blockpress-gateway": one(docs, "Deployment", "blockpress-gateway")["spec"]["template"],
        "head": cluster["headGroupSpec"]["template"],
        **{f"worker-{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]},
    }
    for name, template in templates.items():
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        port = int(annotations["prometheus.io/port"])
        assert port == served[name.split("-")[0] if name.startswith("worker") else name]
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert port in ports


def test_the_collector_exports_to_the_backend_its_variable_names() -> None:
    docs = render("base")
    config = yaml.safe_load(one(docs, "ConfigMap", "blockpress-collector")["data"]["config.yaml"])
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["${env:TRACES_EXPORTER}"]
    backend = one(docs, "ConfigMap", "blockpress-otel-backend")["data"]
    assert backend["TRACES_EXPORTER"] in config["exporters"]
    assert {"otlp/backend", "otlphttp/backend"} <= set(config["exporters"])
    collector = one(docs, "Deployment", "blockpress-collector")
    (container,) = containers(collector)
    assert container["envFrom"] == [{"configMapRef": {"name": "blockpress-otel-backend"}}]
    endpoints = {e["value"] for d in docs for c in containers(d) for e in c.get("env", [])
                 if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"}  # fmt: skip
    assert endpoints == {"http://blockpress-collector:4317"}


def test_the_crds_kept_here_are_kuberay_v1() -> None:
    for plural in ("rayclusters", "rayjobs"):
        schema = crd_schema(plural)
        assert "spec" in schema["properties"], plural
    assert json.dumps(crd_schema("rayclusters")).count('"labels"') > 0
