"""`heartcluster` commands that run or talk to the cluster: worker, up, demo, submit, status,
watch, cancel, download.

`worker` and `up` start processes by module name, so nothing here imports workers or torch.
The client commands speak HTTP to the gateway through api.client.client.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = "heartcluster-data"
AUDIO_NAMES = ("audio.flac", "audio.wav", "audio.mp3")
TERMINAL = ("succeeded", "failed", "cancelled")


def read_text_or_file(value: str) -> str:
    """CLI convenience: a local file's contents when the value names one, else the value."""
    path = Path(value)
    if value and path.is_file():
        print(f"reading lyrics from {path}", file=sys.stderr)
        return path.read_text(encoding="utf-8")
    return value


# ----- processes ------------------------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process with a Celery worker (signals then reach Celery directly)."""
    from api.client.launcher import default_concurrency, worker_command, worker_env
    from shared.core.config import Settings

    settings = Settings.from_env()
    concurrency = args.concurrency or default_concurrency(args.kind, settings.engine_max_rows)
    command = worker_command(args.kind, settings.data_dir, concurrency, args.name, args.loglevel)
    os.execve(command[0], command, worker_env(args.kind, os.environ))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_undisturbed(cluster) -> None:
    """Stop the cluster; a second Ctrl-C or SIGTERM must not leave children behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cluster.stop()


def _cmd_up(args: argparse.Namespace) -> int:
    from api.client.local_cluster import KEY_FILE, LocalCluster

    cluster = LocalCluster(
        Path(args.data_dir), args.host, args.port, train_worker=not args.no_train_worker
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cluster.start()
        print(f"heartcluster is up at {cluster.url} (data in {cluster.data_dir})")
        print(f"logs: {cluster.log_dir}; API key file: {cluster.data_dir / KEY_FILE}")
        print("try: heartcluster submit generate --tags piano,happy --duration 10 --watch")
        print("Ctrl-C stops it")
        print(f"API key (tenant local):\n{cluster.api_key}", flush=True)
        cluster.serve_forever()
    finally:
        _stop_undisturbed(cluster)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Bring the local cluster up, render one song through it, download it, stop."""
    from api.client.client import Client
    from api.client.launcher import free_port
    from api.client.local_cluster import LocalCluster

    data_dir = Path(args.data_dir)
    params = {"tags": args.tags, "lyrics": args.lyrics, "duration_s": args.duration, "seed": 7}
    cluster = LocalCluster(data_dir, port=args.port or free_port(), train_worker=False)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cluster.start()
        client = Client(cluster.url, cluster.api_key)
        job = client.submit("generate", params)
        print(f"job id: {job['id']}", flush=True)
        final = _watch(client, job["id"])
        if final["state"] != "succeeded":
            print(f"error: job {final['state']}: {final.get('error')}", file=sys.stderr)
            return 1
        path = _download(client, final, None, data_dir / "songs")
    finally:
        _stop_undisturbed(cluster)
    print(f"job id: {job['id']}")
    print(f"audio: {path.resolve()}")
    return 0


# ----- client ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    from api.client.client import Client

    key = args.api_key or os.environ.get("HEARTCLUSTER_API_KEY")
    key_file = Path(args.data_dir) / "api-key"
    if not key and key_file.is_file():
        key = key_file.read_text().strip()
    if not key:
        raise SystemExit(
            "error: no API key: pass --api-key, set HEARTCLUSTER_API_KEY, or run "
            f"`heartcluster up` (it saves one in {key_file})"
        )
    return Client(args.url, key)


def _print_job(job: dict[str, Any]) -> None:
    print(json.dumps(job, indent=2, sort_keys=True))


def _progress_line(job: dict[str, Any]) -> str:
    width = 30
    filled = int(width * job.get("progress", 0.0) / 100)
    frames = ""
    if job.get("frames_total"):
        frames = f" {job.get('frames_done') or 0}/{job['frames_total']} frames"
    return (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {job.get('progress', 0.0):5.1f}% "
        f"{job.get('stage', ''):<10} {job['state']}{frames}"
    )


def _watch(client, job_id: str) -> dict[str, Any]:
    """A progress bar on stderr from the job's event stream; returns the final job."""
    job = client.get(job_id)
    sys.stderr.write(_progress_line(job))
    if job["state"] not in TERMINAL:
        for event in client.events(job_id):
            job = event["job"]
            sys.stderr.write(_progress_line(job))
            sys.stderr.flush()
    sys.stderr.write("\n")
    return job


def _download(client, job: dict[str, Any], name: str | None, out: Path) -> Path:
    """One artifact (default: the job's audio) to `out` (a file, or a directory for it)."""
    if name is None:
        name = next((n for n in AUDIO_NAMES if n in job["artifacts"]), None)
        if name is None:
            raise SystemExit(f"error: job {job['id']} has no audio; artifacts: {job['artifacts']}")
    if out.is_dir() or not out.suffix:
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"{job['id']}-{name}"
    client.download(job["id"], name, out)
    return out


def _cmd_submit(args: argparse.Namespace) -> int:

    client = _client(args)
    params: dict[str, Any] = {
        name: getattr(args, name)
        for name in args.param_names
        if getattr(args, name, None) is not None
    }
    if "lyrics" in params:
        params["lyrics"] = read_text_or_file(params["lyrics"])
    for field in args.upload_fields:
        path = getattr(args, f"upload:{field}", None)
        if path is not None:
            params[field] = client.upload(Path(path))["id"]
    job = client.submit(args.type, params, idempotency_key=args.idempotency_key)
    if not args.watch:
        print(job["id"])
        return 0
    print(f"job id: {job['id']}", file=sys.stderr)
    final = _watch(client, job["id"])
    print(job["id"])
    return 0 if final["state"] == "succeeded" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    _print_job(_client(args).get(args.job_id))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    final = _watch(_client(args), args.job_id)
    if final.get("error"):
        print(f"error: {final['error']['code']}: {final['error']['message']}", file=sys.stderr)
    return 0 if final["state"] == "succeeded" else 1


def _cmd_cancel(args: argparse.Namespace) -> int:
    _print_job(_client(args).cancel(args.job_id))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    client = _client(args)
    path = _download(client, client.get(args.job_id), args.name, Path(args.out))
    print(path)
    return 0


# ----- parser ---------------------------------------------------------------------------------


def _reporting_errors(handler: Callable[[argparse.Namespace], int]):
    """Gateway errors and unreachable gateways as one clear line and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from api.client.client import ApiError

        try:
            return handler(args)
        except ApiError as error:
            print(f"error: {error}", file=sys.stderr)
        except requests.ConnectionError:
            print(
                f"error: no gateway answers at {args.url} (is `heartcluster up` running?)",
                file=sys.stderr,
            )
        return 1

    return run


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("HEARTCLUSTER_URL", DEFAULT_URL), help="gateway URL"
    )
    parser.add_argument("--api-key", help="default: $HEARTCLUSTER_API_KEY or DATA_DIR/api-key")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where `up` saved the key")


def add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    from api.client.submit_options import submit_parsers

    worker = commands.add_parser("worker", help="run one Celery worker (gpu, cpu or train queue)")
    worker.add_argument("kind", choices=("gpu", "cpu", "train"))
    worker.add_argument(
        "--concurrency", type=int, help="task threads (default: gpu ENGINE_MAX_ROWS/2, else 1)"
    )
    worker.add_argument("--name", help="worker name (default: the kind); names its state file")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=_cmd_worker)

    up = commands.add_parser(
        "up", help="gateway + GPU-queue, CPU and train (fine-tune) workers on this machine"
    )
    up.add_argument("--no-train-worker", action="store_true", help="no fine-tunes here")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    up.set_defaults(handler=_cmd_up)

    demo = commands.add_parser(
        "demo", help="start the local cluster, render one song through it, download it, stop"
    )
    demo.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    demo.add_argument("--port", type=int, default=0, help="default: a free port")
    demo.add_argument("--tags", default="piano,happy")
    demo.add_argument("--lyrics", default="[verse] hello world")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds")
    demo.set_defaults(handler=_cmd_demo)

    submit = commands.add_parser("submit", help="submit a job to the gateway")
    kinds = submit.add_subparsers(dest="type", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.set_defaults(handler=_reporting_errors(_cmd_submit))
        parser.add_argument("--idempotency-key", help="retrying with it never makes two jobs")
        parser.add_argument("--watch", action="store_true", help="show progress until done")
        _client_options(parser)

    submit_parsers(kinds, common)

    for name, handler, text in (
        ("status", _cmd_status, "show a job"),
        ("watch", _cmd_watch, "progress bar until the job ends"),
        ("cancel", _cmd_cancel, "cancel a job"),
        ("download", _cmd_download, "download an artifact (default: the audio)"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("job_id")
        _client_options(parser)
        parser.set_defaults(handler=_reporting_errors(handler))
        if name == "download":
            parser.add_argument("--name", help="artifact name (tokens.npy, metadata.json, ...)")
            parser.add_argument("--out", default=".", help="file or directory (default: .)")
