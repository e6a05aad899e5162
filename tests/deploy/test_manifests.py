"""The Kubernetes manifests (deploy/k8s) and the Dockerfile, checked offline so they cannot rot.

* every manifest validates against the Kubernetes JSON schemas bundled in
  ``kubernetes-validate`` (strict: no unknown fields), no cluster needed;
* every command is a real module, every ``NODE_*`` variable is one ``node/config.py``
  reads and its value parses, every container port is one the process listens on
  with that configuration, every probe is a path that process serves;
* every Service targets a port of the pods it selects, every Secret is one the
  README tells how to create;
* the Dockerfile (Docker cannot build here) copies files that exist, runs real
  modules, as a non-root user, with a HEALTHCHECK on a real endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node import health
from node.config import Settings
from tests.support import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest minor version the manifests must work on
STAGE_PORT = {
    "node.workers.web": "web_port",
    "node.workers.fanout": "fanout_port",
    "node.workers.monitor": "metrics_port_monitor",
    "node.workers.router": "metrics_port_router",
    "node.workers.publisher": "metrics_port_publisher",
    "node.workers.store": "metrics_port_store",
}


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in manifests():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            yield doc["metadata"]["name"], doc


def containers(pod: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    out = list(pod["spec"]["containers"])
    if init:
        out += pod["spec"].get("initContainers", [])
    return out


def module_of(container: dict[str, Any]) -> str | None:
    words = container.get("command", []) + container.get("args", [])
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2].replace(";", " ; "))
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i - 1] in ("python", "python3"):
            return str(words[i + 1])
    return None


def config_variables() -> set[str]:
    return set(re.findall(r'take\(\s*"(NODE_[A-Z0-9_]+)"', (REPO / "node" / "config.py").read_text()))


def settings_for(container: dict[str, Any], tmp_path: Path) -> Settings:
    """The container's NODE_* values through the real parser (files it would mount made up here)."""
    import zmq

    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            env[item["name"]] = "s" * 32  # a Secret's value
    for name in list(env):
        if name.endswith("_DIR") and name != "NODE_DATA_DIR":
            env[name] = str(tmp_path)  # a mounted directory of keys
        elif name.startswith("NODE_CURVE_") and name.endswith("_KEY"):
            env[name] = zmq.curve_keypair()[0].decode()  # a mounted key file
    return Settings.from_env(env)


def test_every_manifest_validates_against_the_kubernetes_schemas_offline() -> None:
    import kubernetes_validate

    seen = 0
    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}"
            ) from None
        seen += 1
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert seen >= 15


def test_the_kustomization_lists_every_manifest_and_the_dashboard_is_the_deploy_one() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for generator in kust["configMapGenerator"]:
        for name in generator["files"]:
            assert (K8S / name).is_file(), name
    copy = json.loads((K8S / "grafana" / "iotnode.json").read_text())
    assert copy == json.loads((REPO / "deploy" / "grafana" / "iotnode.json").read_text()), (
        "deploy/k8s/grafana/iotnode.json differs from deploy/grafana/iotnode.json: copy it again"
    )


def test_every_command_is_a_module_and_every_variable_is_read_and_parses(tmp_path: Path) -> None:
    variables = config_variables()
    modules = set()
    for name, workload in workloads():
        pod = workload["spec"]["template"]
        for container in containers(pod):
            module = module_of(container)
            assert module is not None, f"{name}/{container['name']}: no python -m MODULE"
            assert importlib.util.find_spec(module) is not None, f"{name}: {module} is not a module"
            modules.add(module)
            for item in container.get("env", []):
                if item["name"].startswith("NODE_"):
                    assert item["name"] in variables, (
                        f"{name}/{container['name']}: {item['name']} is not read"
                    )
            settings_for(container, tmp_path)  # raises ConfigError naming a bad value
    assert modules == set(STAGE_PORT), f"the Procfile's processes, each once: {sorted(modules)}"


def test_every_port_is_one_the_process_listens_on_and_every_probe_is_a_path_it_serves(tmp_path: Path) -> None:
    for name, workload in workloads():
        pod = workload["spec"]["template"]
        pod_ports = set()
        for container in containers(pod):
            module = module_of(container)
            assert module is not None
            settings = settings_for(container, tmp_path)
            http = getattr(settings, STAGE_PORT[module])
            expected = {http}
            for endpoint in (settings.router_bind, settings.pub_bind, settings.replay_bind):
                if endpoint and module in ("node.workers.router", "node.workers.publisher"):
                    if (module == "node.workers.router") == (endpoint == settings.router_bind):
                        expected.add(int(endpoint.rsplit(":", 1)[1]))
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert set(ports.values()) == expected, (
                f"{name}/{container['name']}: ports {ports}, serves {expected}"
            )
            pod_ports |= set(ports.values())
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container[kind]["httpGet"]
                port = ports.get(probe["port"], probe["port"])
                assert port == http, f"{name}/{container['name']} {kind}: port {probe['port']} is not {http}"
                want = health.READY_PATH if kind == "readinessProbe" else health.HEALTH_PATH
                assert probe["path"] == want, f"{name}/{container['name']} {kind}: {probe['path']}"
        annotations = pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) in pod_ports, name
            assert annotations["prometheus.io/path"] == "/metrics"
    # the Starlette apps serve the probe paths too (tests/test_health.py asks real ones)
    for app in (REPO / "node" / "front" / "metrics.py", REPO / "node" / "fanout" / "app.py"):
        text = app.read_text()
        assert "Route(health.HEALTH_PATH" in text and "Route(health.READY_PATH" in text, app


def test_services_target_ports_of_the_pods_they_select() -> None:
    pods = [w["spec"]["template"] for _, w in workloads()]
    for _, doc in manifests():
        if doc["kind"] != "Service":
            continue
        selector = doc["spec"]["selector"]
        selected = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert selected, f"{doc['metadata']['name']} selects no pod"
        names = {port["name"] for p in selected for c in containers(p) for port in c.get("ports", [])}
        for port in doc["spec"]["ports"]:
            assert port["targetPort"] in names, (
                f"{doc['metadata']['name']}: no container port {port['targetPort']}"
            )
    for _, doc in manifests():
        if doc["kind"] == "PodDisruptionBudget":
            labels = doc["spec"]["selector"]["matchLabels"]
            assert any(labels.items() <= p["metadata"]["labels"].items() for p in pods), doc["metadata"][
                "name"
            ]


def test_volumes_are_defined_and_secrets_are_the_ones_the_readme_creates() -> None:
    readme = (REPO / "README.md").read_text()
    for name, workload in workloads():
        pod = workload["spec"]["template"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in containers(pod, init=True):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{name}: {mount['name']}"
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert f"kubectl -n iotnode create secret generic {ref['name']}" in readme, ref
        for volume in volumes.values():
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert f"kubectl -n iotnode create secret generic {secret}" in readme, secret
        if len(containers(pod)) > 1:  # the ring's producer-liveness check reads the other container's /proc
            assert pod["spec"].get("shareProcessNamespace") is True, name


def test_dockerfile_builds_the_helper_in_a_builder_stage_and_runs_real_modules_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert len(froms) == 2 and all("-slim" in f for f in froms) and froms[0].endswith(" AS builder")
    for instruction in instructions:
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            *sources, _ = instruction.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file"
        if instruction.startswith("ENV "):
            for name in re.findall(r"(NODE_[A-Z0-9_]+)=", instruction):
                assert name in config_variables(), name
    # every C extension (setup.py's and the cffi helper) compiled and imported in the builder
    extensions = re.findall(r'Extension\(\s*"([\w.]+)"', (REPO / "setup.py").read_text())
    assert len(extensions) >= 3 and "node.storage._storeread" in extensions
    assert all(m in text for m in ("node.ring._chelper", *extensions))
    user = next(i for i in instructions if i.startswith("USER ")).split()[1]
    assert user.split(":")[0] not in ("0", "root")
    healthcheck = next(i for i in instructions if i.startswith("HEALTHCHECK "))
    port = Settings().metrics_port_monitor
    assert f"127.0.0.1:{port}{health.HEALTH_PATH}" in healthcheck
    cmd = json.loads(next(i for i in instructions if i.startswith("CMD ")).removeprefix("CMD "))
    assert cmd[:3] == ["honcho", "start", "-f"] and cmd[3] == "/app/Procfile"
    assert "COPY Procfile /app/Procfile" in instructions
    for line in (REPO / "Procfile").read_text().splitlines():
        module = re.search(r"python -m ([\w.]+)", line)
        assert module and importlib.util.find_spec(module.group(1)) is not None, line
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "data" in ignore and ".git" in ignore


@pytest.mark.parametrize("variable", ["NODE_CURVE_CLIENTS_DIR", "NODE_CURVE_SUBSCRIBERS_DIR"])
def test_the_middle_tier_lists_public_keys_only(variable: str) -> None:
    """The authorized-keys directories are mounted from the *-public Secrets, never the secret halves."""
    _, middle = next((n, w) for n, w in workloads() if n == "iotnode-middle")
    pod = middle["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for container in containers(pod):
        value = next((e["value"] for e in container["env"] if e["name"] == variable), None)
        if value is None:
            continue
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == value)
        assert volumes[mount["name"]]["secret"]["secretName"].endswith("-public")
