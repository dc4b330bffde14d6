"""The Kubernetes manifests agree with the code they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from blockpress.runtime.config import RuntimeSettings

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _docs() -> list[dict[str, Any]]:
    return [doc for f in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] in {"Deployment", "StatefulSet"}:
        return list(doc["spec"]["template"]["spec"]["containers"])
    return []


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_blockpress_variable_is_a_setting() -> None:
    fields = {name.upper() for name in RuntimeSettings.model_fields}
    for doc in _docs():
        for container in _containers(doc):
            for env in container.get("env", []):
                if env["name"].startswith("BLOCKPRESS_"):
                    assert env["name"].removeprefix("BLOCKPRESS_") in fields, env["name"]


def test_gateway_grace_period_outlasts_its_drain_and_probes_its_port() -> None:
    (gateway,) = [d for d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "blockpress-gateway"]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["BLOCKPRESS_DRAIN_S"])
    port = int(container["command"][container["command"].index("--port") + 1])
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert RuntimeSettings().port == port  # the documented default port


def test_gpu_workers_ask_for_exactly_one_gpu() -> None:
    (cluster,) = [d for d in _docs() if d["kind"] == "RayCluster"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one replica = one engine = one GPU
