"""The Kubernetes manifests of deploy/k8s checked against the schemas and against the code.

Built-in kinds are validated with kubernetes-validate (strict: unknown fields refused). KEDA's
ScaledObjects have no bundled schema, so they are checked structurally: each scales a worker
Deployment of these manifests on the Redis list its worker consumes, which a real redis-server
shows is the list Celery fills for that queue.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from flask import Flask

from api.client.launcher import worker_command
from api.gateway.routes.health import bp as health_bp
from shared.core.config import PREFIX, Settings
from shared.core.queueing import TASK_NAME, make_celery

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"  # inside KEDA 2.17's supported window (1.30 - 1.32) + one
KEDA_API = "keda.sh/v1alpha1"
# Environment names the manifests may set besides HEARTCLUSTER_* (read by boto3)
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
GPU = "nvidia.com/gpu"

Manifest = dict[str, Any]


def _load() -> list[Manifest]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests: list[Manifest] = []
    for name in kustomization["resources"]:
        manifests.extend(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    return manifests


MANIFESTS = _load()


def _of_kind(kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in MANIFESTS if m["kind"] == kind}


DEPLOYMENTS = _of_kind("Deployment")
SCALED_OBJECTS = _of_kind("ScaledObject")
WORKERS = {name: d for name, d in DEPLOYMENTS.items() if name.endswith("-worker")}


def _container(deployment: Manifest) -> Manifest:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _worker_kind(deployment: Manifest) -> str:
    """KIND of a container running `heartcluster worker KIND`."""
    command = _container(deployment)["command"]
    assert command[:2] == ["heartcluster", "worker"] and len(command) == 3, command
    return command[2]


def _consumed_queue(kind: str, tmp_path: Path) -> str:
    """The queue `heartcluster worker KIND` passes to celery."""
    command = worker_command(kind, tmp_path, concurrency=1)
    return command[command.index("--queues") + 1]


def _data(kind: str) -> dict[str, str]:
    (manifest,) = _of_kind(kind).values()
    return manifest.get("data") or manifest.get("stringData") or {}


def _settings_env() -> dict[str, str]:
    """Every variable the ConfigMap and the Secret give the containers."""
    return {**_data("ConfigMap"), **_data("Secret")}


class _RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers which names were looked up."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _settings_names() -> set[str]:
    env = _RecordingEnv()
    Settings.from_env(env)
    return {name for name in env.asked if name.startswith(PREFIX)}


def _dockerfile(image: str) -> str:
    """The Dockerfile an image name stands for: heartcluster/KIND → deploy/Dockerfile.KIND."""
    repository, _, kind = image.partition("/")
    assert repository == "heartcluster" and kind, f"unexpected image {image!r}"
    path = ROOT / "deploy" / f"Dockerfile.{kind}"
    assert path.is_file(), f"image {image!r} has no {path.relative_to(ROOT)}"
    return path.read_text()


def _dockerfile_env(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(HEARTCLUSTER_\w+)=(\S+)", text))


def test_every_yaml_file_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize(
    "manifest",
    [m for m in MANIFESTS if m["apiVersion"] != KEDA_API],
    ids=lambda m: f"{m['kind']}/{m['metadata']['name']}",
)
def test_built_in_objects_validate_strictly(manifest: Manifest) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The validator really is strict (a typo would not pass silently)."""
    deployment = yaml.safe_load(yaml.safe_dump(DEPLOYMENTS["gateway"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_one_scaled_object_per_worker_deployment() -> None:
    assert {so["spec"]["scaleTargetRef"]["name"] for so in SCALED_OBJECTS.values()} == set(WORKERS)
    assert {_worker_kind(d) for d in WORKERS.values()} == {"gpu", "cpu", "train"}


@pytest.mark.parametrize("name", sorted(SCALED_OBJECTS))
def test_scaled_object_scales_its_worker_on_the_queue_it_consumes(
    name: str, tmp_path: Path
) -> None:
    spec = SCALED_OBJECTS[name]["spec"]
    assert set(spec["scaleTargetRef"]) == {"name"}  # a Deployment (KEDA's default kind)
    target = DEPLOYMENTS[spec["scaleTargetRef"]["name"]]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants strings"
    assert int(metadata["listLength"]) > 0
    queue = _consumed_queue(_worker_kind(target), tmp_path)
    assert metadata["listName"] == queue
    settings = Settings.from_env(_settings_env())
    assert queue in {q.name for q in make_celery(settings).conf.task_queues}
    # KEDA reads the address from the target's environment: the Secret, matching the URL
    assert metadata["addressFromEnv"] in _data("Secret")
    redis_url = urlparse(settings.redis_url)
    assert _data("Secret")[metadata["addressFromEnv"]] == f"{redis_url.hostname}:{redis_url.port}"
    assert metadata["databaseIndex"] == (redis_url.path.strip("/") or "0")


def test_list_names_are_where_celery_queues_jobs(redis_url: str, redis_client) -> None:
    """A job sent to a queue waits in the Redis list the ScaledObject measures."""
    settings = Settings.from_env({**_settings_env(), f"{PREFIX}REDIS_URL": redis_url})
    app = make_celery(settings)
    for scaled_object in SCALED_OBJECTS.values():
        list_name = scaled_object["spec"]["triggers"][0]["metadata"]["listName"]
        app.send_task(TASK_NAME, args=["job"], queue=list_name)
        assert redis_client.llen(list_name) == 1, list_name


def test_settings_in_the_manifests_are_valid_and_read_by_the_code() -> None:
    env = _settings_env()
    Settings.from_env(env)  # raises SettingsError naming a bad value
    known = _settings_names()
    keda_env = {
        value
        for so in SCALED_OBJECTS.values()
        for trigger in so["spec"]["triggers"]
        for key, value in trigger["metadata"].items()
        if key.endswith("FromEnv")
    }
    explicit = {var["name"] for d in DEPLOYMENTS.values() for var in _container(d).get("env", [])}
    for name in set(env) | explicit:
        if name.startswith(PREFIX):
            assert name in known, f"{name} is not a setting shared/core/config.py reads"
        else:
            assert name in AWS_CREDENTIALS | keda_env, f"{name} is read by nobody"


def test_settings_names_are_recorded() -> None:
    """The recording environment sees the names from_env reads (the check above relies on it)."""
    assert {f"{PREFIX}REDIS_URL", f"{PREFIX}STORAGE_URL", f"{PREFIX}MODEL_DIR"} <= (
        _settings_names()
    )


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployments_get_settings_and_models(name: str) -> None:
    pod = DEPLOYMENTS[name]["spec"]["template"]["spec"]
    container = _container(DEPLOYMENTS[name])
    sources = {
        (kind, ref["name"])
        for source in container["envFrom"]
        for kind, ref in (
            ("ConfigMap", source.get("configMapRef")),
            ("Secret", source.get("secretRef")),
        )
        if ref
    }
    assert sources == {("ConfigMap", n) for n in _of_kind("ConfigMap")} | {
        ("Secret", n) for n in _of_kind("Secret")
    }
    model_dir = Settings.from_env(_settings_env()).model_dir
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(model_dir)].get("readOnly") is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[str(model_dir)]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in _of_kind("PersistentVolumeClaim")


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_workers_match_their_image_and_hardware(name: str) -> None:
    deployment = WORKERS[name]
    container = _container(deployment)
    kind = _worker_kind(deployment)
    device = _dockerfile_env(_dockerfile(container["image"])).get(f"{PREFIX}DEVICE")
    gpus = container["resources"].get("limits", {}).get(GPU)
    if kind == "cpu":
        assert device == "cpu" and gpus is None
    else:  # gpu and train: one GPU per pod, the CUDA image
        assert device == "cuda" and gpus == 1
    assert f"{PREFIX}DEVICE" not in _settings_env(), "would override the image's device"
    # warm shutdown: the stop grace (short jobs finish) and the hand-back of running jobs fit
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 2 * Settings().stop_grace_s


def test_gateway_runs_its_image_command_and_probes_the_health_routes() -> None:
    container = _container(DEPLOYMENTS["gateway"])
    dockerfile = _dockerfile(container["image"])
    assert "gunicorn" in dockerfile and "[worker]" not in dockerfile
    assert "command" not in container and "args" not in container  # the image's gunicorn
    (port,) = container["ports"]
    assert f"EXPOSE {port['containerPort']}" in dockerfile
    assert GPU not in container["resources"].get("limits", {})
    app = Flask("probes")
    app.register_blueprint(health_bp)
    endpoints = {rule.rule: rule.endpoint for rule in app.url_map.iter_rules()}
    for probe, view in (("readinessProbe", "health.readyz"), ("livenessProbe", "health.healthz")):
        assert endpoints[container[probe]["httpGet"]["path"]] == view
    (service,) = (
        s
        for s in _of_kind("Service").values()
        if s["spec"]["selector"] == (DEPLOYMENTS["gateway"]["spec"]["selector"]["matchLabels"])
    )
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis_set = _of_kind("StatefulSet")["redis"]
    (container,) = redis_set["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[
        claim["metadata"]["name"]
    ] == "/data"
    # the default Redis URL names this StatefulSet's Service
    host = urlparse(Settings.from_env(_settings_env()).redis_url).hostname or ""
    service, namespace = host.split(".")[:2]
    assert service == redis_set["spec"]["serviceName"] in _of_kind("Service")
    assert namespace == redis_set["metadata"]["namespace"] in _of_kind("Namespace")


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_workers_expose_the_metrics_port_they_serve(name: str) -> None:
    deployment = WORKERS[name]
    port = Settings.from_env(_settings_env()).metrics_port
    (exposed,) = _container(deployment)["ports"]
    assert exposed == {"name": "metrics", "containerPort": port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
