"""`heartcluster` commands that run or talk to the cluster: worker, up, demo, submit, status,
watch, cancel, download.

`worker` and `up` start processes by module name, so nothing here imports workers or torch.
The client commands speak HTTP to the gateway through api.client.client.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from api.client.cli_errors import UsageError
from api.client.local_config import (
    DEFAULT_DATA_DIR,
    DEFAULT_URL,
    KEY_FILE,
    api_key,
    default_data_dir,
    gateway_url,
)

AUDIO_NAMES = ("audio.flac", "audio.wav", "audio.mp3")
TERMINAL = ("succeeded", "failed", "cancelled")


LYRICS_FILE_SUFFIXES = (".txt", ".lrc", ".md", ".lyrics")


def read_text_or_file(value: str) -> str:
    """CLI convenience: a local file's contents when the value names one, else the value. A
    value that looks like a path (one word with a slash or a text-file suffix) but names no
    file is an error, not lyrics."""
    path = Path(value)
    if value and path.is_file():
        print(f"reading lyrics from {path}", file=sys.stderr)
        return path.read_text(encoding="utf-8")
    one_word = value != "" and not any(c.isspace() for c in value)
    if one_word and ("/" in value or path.suffix.lower() in LYRICS_FILE_SUFFIXES):
        raise UsageError(
            f"--lyrics {value}: no such file (pass the lyrics text itself, or an existing file)"
        )
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


def up_hint(data_dir: str) -> str:
    """A first command that finds this cluster as printed (its data directory holds the URL
    and key; named when it is not the one client commands look in by default)."""
    hint = "heartcluster submit generate --tags piano,happy --duration 10 --watch"
    if Path(data_dir).resolve() != Path(default_data_dir()).resolve():
        hint += f" --data-dir {shlex.quote(data_dir)}"
    return hint


def _cmd_up(args: argparse.Namespace) -> int:
    from api.client.local_cluster import LocalCluster

    cluster = LocalCluster(
        Path(args.data_dir), args.host, args.port, train_worker=not args.no_train_worker
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cluster.start()
        print(f"heartcluster is up at {cluster.url} (data in {cluster.data_dir})")
        print(f"logs: {cluster.log_dir}; API key file: {cluster.data_dir / KEY_FILE}")
        print(f"API docs: {cluster.url}/docs; metrics: {cluster.url}/metrics", end="")
        for name, port in cluster.metrics_ports.items():
            print(f", {name} :{port}/metrics", end="")
        print(f"\ntry: {up_hint(args.data_dir)}")
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
    lyrics = read_text_or_file(args.lyrics)
    params = {"tags": args.tags, "lyrics": lyrics, "duration_s": args.duration, "seed": 7}
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


def check_url(url: str) -> None:
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError as error:
        raise UsageError(f"bad gateway URL {url!r}: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"bad gateway URL {url!r}: expected http(s)://HOST[:PORT]")


def _client(args: argparse.Namespace):
    """The gateway client of a command; resolves args.url (its messages name the URL)."""
    from api.client.client import Client

    data_dir = Path(args.data_dir)
    args.url = gateway_url(args.url, data_dir)
    check_url(args.url)
    key = api_key(args.api_key, data_dir)
    if not key:
        raise UsageError(
            "no API key: pass --api-key, set HEARTCLUSTER_API_KEY, or run "
            f"`heartcluster up` (it saves one in {data_dir / KEY_FILE})"
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
            raise UsageError(f"job {job['id']} has no audio; artifacts: {job['artifacts']}")
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


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=f"gateway URL (default: $HEARTCLUSTER_URL, else the one `up` saved in "
        f"DATA_DIR/url, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key", help="default: $HEARTCLUSTER_API_KEY, else the one `up` saved in DATA_DIR"
    )
    _data_dir_option(parser, "where `up` saved the URL and key")


def _data_dir_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help=f"{text} (default: $HEARTCLUSTER_DATA_DIR, else ./{DEFAULT_DATA_DIR})",
    )


def add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    from api.client.submit_options import submit_parsers

    worker = commands.add_parser("worker", help="run one Celery worker (gpu, cpu or train queue)")
    worker.add_argument("kind", choices=("gpu", "cpu", "train"))
    worker.add_argument(
        "--concurrency", type=int, help="task threads (default: gpu ENGINE_MAX_ROWS/2, else 1)"
    )
    worker.add_argument("--name", help="worker name (default: the kind); names its state file")
    worker.add_argument("--loglevel", default="INFO", help="Celery log level")
    worker.set_defaults(handler=_cmd_worker)

    up = commands.add_parser(
        "up", help="gateway + GPU-queue, CPU and train (fine-tune) workers on this machine"
    )
    up.add_argument("--no-train-worker", action="store_true", help="no fine-tunes here")
    up.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    up.add_argument("--port", type=int, default=8000, help="the gateway's port")
    _data_dir_option(up, "Redis data, artifacts, logs, the URL and API key")
    up.set_defaults(handler=_cmd_up)

    demo = commands.add_parser(
        "demo", help="start the local cluster, render one song through it, download it, stop"
    )
    _data_dir_option(demo, "Redis data, artifacts, logs and the song")
    demo.add_argument("--port", type=int, default=0, help="default: a free port")
    demo.add_argument("--tags", default="piano,happy", help="comma-separated style tags")
    demo.add_argument("--lyrics", default="[verse] hello world", help="lyrics text, or a file")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds")
    demo.set_defaults(handler=_cmd_demo)

    submit = commands.add_parser("submit", help="submit a job to the gateway")
    kinds = submit.add_subparsers(dest="type", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.set_defaults(handler=_cmd_submit)
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
        parser.set_defaults(handler=handler)
        if name == "download":
            parser.add_argument("--name", help="artifact name (tokens.npy, metadata.json, ...)")
            parser.add_argument("--out", default=".", help="file or directory (default: .)")
