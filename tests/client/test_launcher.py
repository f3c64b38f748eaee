"""How `heartcluster worker` / `up` start processes: commands, environments, Redis, the key."""

from __future__ import annotations

import shutil
import socket
import stat
from pathlib import Path

import pytest
import redis

from api.client.launcher import (
    LaunchError,
    free_port,
    private_redis,
    redis_answers,
    start_redis,
    stop_processes,
    worker_command,
    worker_env,
)
from api.client.local_cluster import LocalCluster, local_api_key
from shared.core.config import Settings
from shared.core.tenants import TenantStore


def _options(command: list[str]) -> dict[str, str]:
    flags = command[command.index("worker") + 1 :]
    return {
        flag: value
        for flag, value in zip(flags, [*flags[1:], ""], strict=True)
        if flag.startswith("--") and not value.startswith("--")
    }


def test_worker_command_runs_its_queue_on_threads_with_a_persistent_statedb(
    tmp_path: Path,
) -> None:
    command = worker_command("gpu", tmp_path, concurrency=3, name="gpu-a")
    assert command[1:5] == ["-m", "celery", "-A", "workers.celery_app"]
    options = _options(command)
    assert options["--queues"] == "gpu" and options["--pool"] == "threads"
    assert options["--concurrency"] == "3"
    statedb = Path(options["--statedb"])
    assert statedb.parent == tmp_path / "worker-state" and statedb.parent.is_dir()
    assert statedb.name.startswith("gpu-a@") and options["--hostname"] == statedb.name


def test_unknown_worker_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="unknown worker kind 'tpu'"):
        worker_command("tpu", tmp_path, concurrency=1)


def test_worker_env_warm_shutdown_and_cpu_device() -> None:
    base = {"HEARTCLUSTER_DEVICE": "cuda", "PYTHONPATH": "/elsewhere", "REMAP_SIGTERM": "SIGQUIT"}
    gpu, cpu = worker_env("gpu", base), worker_env("cpu", base)
    assert "REMAP_SIGTERM" not in gpu and "REMAP_SIGTERM" not in cpu  # SIGTERM stays warm
    assert gpu["HEARTCLUSTER_DEVICE"] == "cuda" and cpu["HEARTCLUSTER_DEVICE"] == "cpu"
    root = str(Path(__file__).resolve().parents[2])
    assert gpu["PYTHONPATH"].split(":") == [root, "/elsewhere"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_start_redis_when_nothing_answers(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/2"
    assert not redis_answers(url, 0.2)
    local_url, process = start_redis(url, tmp_path)
    try:
        assert local_url == url and redis_answers(local_url)
        assert (tmp_path / "redis").is_dir()
    finally:
        stop_processes([process])
    assert process.returncode is not None


def test_start_redis_refuses_another_machine(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="not on this machine"):
        start_redis("redis://redis.example:6379/0", tmp_path)


def test_local_api_key_is_kept_while_redis_knows_it(redis_url: str, tmp_path: Path) -> None:
    url = f"{redis_url.rsplit('/', 1)[0]}/4"
    settings = Settings.from_env({"HEARTCLUSTER_REDIS_URL": url})
    client = redis.Redis.from_url(url)
    client.flushdb()
    path = tmp_path / "api-key"

    key = local_api_key(settings, path)
    assert TenantStore(client).tenant_for_key(key) == "local"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_api_key(settings, path) == key

    client.flushdb()  # a fresh Redis does not know the saved key: a new one replaces it
    renewed = local_api_key(settings, path)
    assert renewed != key and path.read_text().strip() == renewed
    client.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_each_data_dir_has_its_own_persistent_redis(tmp_path: Path) -> None:
    first_url, first = private_redis(tmp_path / "a")
    second_url, second = private_redis(tmp_path / "b")
    try:
        assert first is not None and second is not None and first_url != second_url
        # another `up`/`demo` on the same data dir is the same cluster: it shares that Redis
        assert private_redis(tmp_path / "a") == (first_url, None)
        # a stale port file naming another data dir's Redis is not trusted
        (tmp_path / "c" / "redis").mkdir(parents=True)
        (tmp_path / "c" / "redis" / "port").write_text(second_url.split(":")[-1].split("/")[0])
        third_url, third = private_redis(tmp_path / "c")
        assert third is not None and third_url not in (first_url, second_url)
        stop_processes([third])
        client = redis.Redis.from_url(first_url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("only-in-a", 1)
        assert redis.Redis.from_url(second_url).get("only-in-a") is None
        client.close()
    finally:
        stop_processes([first, second])


def test_up_refuses_a_busy_port_before_doing_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = LocalCluster(tmp_path / "data", port=port, env={}, log=lambda *_: None)
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is in use"):
            cluster.start()
    assert not (tmp_path / "data").exists() and cluster.processes == {}
