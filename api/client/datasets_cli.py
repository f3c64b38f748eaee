"""`heartcluster datasets create|list|show|delete`: fine-tune datasets over the gateway's API.

heartcluster datasets create samba --tags samba,guitar song1.wav song2.flac job:JOB_ID --wait
heartcluster datasets create samba --items items.json   # [{"file"|"upload_id"|"source_job_id",
                                                        #   "tags", "lyrics"}, ...]
heartcluster submit finetune --dataset-id DATASET_ID --steps 2000 --watch
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from api.client.cluster_cli import _client, _client_options

WAIT_POLL_S = 2.0
JOB_PREFIX = "job:"  # a source on the command line that names a finished song job


def _items(args: argparse.Namespace, client) -> list[dict[str, Any]]:
    """The request's items: local files uploaded first, `job:ID` as a finished song job."""
    if args.items:
        entries = json.loads(Path(args.items).read_text())
    else:
        if not args.tags:
            raise SystemExit("give --tags for the sources (or per item with --items FILE)")
        entries = [
            {"source_job_id": s.removeprefix(JOB_PREFIX)}
            if s.startswith(JOB_PREFIX)
            else {"file": s}
            for s in args.sources
        ]
        entries = [{**e, "tags": args.tags, "lyrics": args.lyrics} for e in entries]
    items = []
    for entry in entries:
        entry = dict(entry)
        if "file" in entry:
            upload = client.upload(entry.pop("file"))
            print(f"uploaded {upload['filename']} → {upload['id']}", file=sys.stderr)
            entry["upload_id"] = upload["id"]
        items.append(entry)
    return items


def _summary(dataset: dict[str, Any]) -> str:
    t = dataset["totals"]
    return (
        f"{dataset['id']}  {dataset['name']}: {t['items']} items ({t['ready']} ready, "
        f"{t['encoding']} encoding, {t['failed']} failed), {t['seconds']:.1f} s, "
        f"{t['frames']} frames"
    )


def _cmd_create(args: argparse.Namespace) -> int:
    client = _client(args)
    dataset = client.create_dataset(args.name, _items(args, client))
    while args.wait and dataset["totals"]["encoding"]:
        sys.stderr.write("\r" + _summary(dataset))
        time.sleep(WAIT_POLL_S)
        dataset = client.dataset(dataset["id"])
    print(_summary(dataset), file=sys.stderr)
    print(dataset["id"])
    return 1 if args.wait and dataset["totals"]["failed"] else 0


def _cmd_list(args: argparse.Namespace) -> int:
    for dataset in _client(args).datasets()["datasets"]:
        print(f"{dataset['id']}  {dataset['name']}  {dataset['items']} items")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).dataset(args.dataset_id), indent=2))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete_dataset(args.dataset_id)
    print(f"deleted dataset {args.dataset_id}")
    return 0


def _command(group: argparse._SubParsersAction, name: str, handler, text: str):
    parser = group.add_parser(name, help=text)
    _client_options(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_dataset_commands(commands: argparse._SubParsersAction) -> None:
    datasets = commands.add_parser("datasets", help="fine-tune datasets")
    group = datasets.add_subparsers(dest="datasets_command", required=True)
    create = _command(group, "create", _cmd_create, "create a dataset (uploads local files)")
    create.add_argument("name")
    create.add_argument(
        "sources", nargs="*", help="audio or .npy token files, or job:ID of finished songs"
    )
    create.add_argument("--tags", help="the tags of every source (comma-separated)")
    create.add_argument("--lyrics", default="", help="the lyrics of every source")
    create.add_argument(
        "--items", help='JSON file: [{"file"|"upload_id"|"source_job_id", "tags", "lyrics"}]'
    )
    create.add_argument("--wait", action="store_true", help="wait until no item is encoding")
    _command(group, "list", _cmd_list, "your datasets, newest first")
    for name, handler, text in (
        ("show", _cmd_show, "items with their states, and totals"),
        ("delete", _cmd_delete, "delete a dataset"),
    ):
        _command(group, name, handler, text).add_argument("dataset_id")
