"""`heartcluster jobs` (this tenant's jobs, newest first, filtered) and `heartcluster upload`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from api.client.cluster_cli import _client, _client_options
from shared.core.jobs import STATES
from shared.core.jobtypes import JOB_TYPES

MAX_PAGE = 200  # the gateway's largest page


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _row(job: dict[str, Any]) -> str:
    return (
        f"{job['id']}  {job['type']:<10} {job['state']:<9} {job.get('progress', 0.0):5.1f}%  "
        f"{_when(job.get('created_at'))}"
    )


def _cmd_jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    jobs: list[dict[str, Any]] = []
    cursor = None
    while len(jobs) < args.limit:
        page = client.list(args.state, args.type, min(MAX_PAGE, args.limit - len(jobs)), cursor)
        jobs.extend(page["jobs"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if args.json:
        for job in jobs:
            print(json.dumps(job, sort_keys=True))
        return 0
    if not jobs:
        print("no jobs", file=sys.stderr)
        return 0
    print(f"{'ID':<32}  {'TYPE':<10} {'STATE':<9} {'DONE':>6}  CREATED")
    for job in jobs:
        print(_row(job))
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    upload = _client(args).upload(Path(args.file))
    details = {k: v for k, v in upload.items() if k != "id"}
    print(f"uploaded {args.file}: {json.dumps(details, sort_keys=True)}", file=sys.stderr)
    print(upload["id"])
    return 0


def add_jobs_commands(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="list your jobs, newest first")
    jobs.add_argument("--state", choices=STATES, help="only jobs in this state")
    jobs.add_argument("--type", choices=sorted(JOB_TYPES), help="only jobs of this type")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many jobs")
    jobs.add_argument("--json", action="store_true", help="one JSON object a line")
    _client_options(jobs)
    jobs.set_defaults(handler=_cmd_jobs)

    upload = commands.add_parser(
        "upload", help="upload an audio file or tokens .npy; prints its id (job input)"
    )
    upload.add_argument("file", help="WAV, FLAC, OGG or MP3 audio, or tokens.npy [8, T]")
    _client_options(upload)
    upload.set_defaults(handler=_cmd_upload)
