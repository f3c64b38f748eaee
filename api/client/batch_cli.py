"""`heartcluster batch|delete|webhook` commands: client commands over the gateway's HTTP API.

heartcluster batch submit items.jsonl --watch     # one submit body per line (+ custom_id)
heartcluster batch results BATCH_ID > results.jsonl
heartcluster webhook secret                        # create or rotate; shown once
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from api.client.cluster_cli import _client, _client_options

WATCH_POLL_S = 1.0


def _batch_line(batch: dict[str, Any]) -> str:
    counts = batch["counts"]
    done = sum(counts[s] for s in ("succeeded", "failed", "cancelled", "deleted"))
    return (
        f"\r{batch['state']:<11} {batch['progress']:5.1f}%  {done}/{batch['total']} done "
        f"({counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['cancelled']} cancelled, {counts['running']} running)"
    )


def _watch_batch(client, batch_id: str) -> dict[str, Any]:
    """A status line on stderr until every item has ended; returns the final batch."""
    while True:
        batch = client.batch(batch_id)
        sys.stderr.write(_batch_line(batch))
        sys.stderr.flush()
        if batch["state"] in ("completed", "cancelled"):
            sys.stderr.write("\n")
            return batch
        time.sleep(WATCH_POLL_S)


def _cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    batch = client.submit_batch(
        Path(args.items).read_bytes(), args.webhook_url, args.idempotency_key
    )
    print(f"batch id: {batch['id']} ({batch['total']} items)", file=sys.stderr)
    final = _watch_batch(client, batch["id"]) if args.watch else batch
    print(batch["id"])
    return 0 if not args.watch or final["counts"]["succeeded"] == final["total"] else 1


def _cmd_results(args: argparse.Namespace) -> int:
    for line in _client(args).batch_results(args.batch_id):
        print(json.dumps(line))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).batch(args.batch_id), indent=2))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).cancel_batch(args.batch_id), indent=2))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for batch in _client(args).batches():
        print(f"{batch['id']}  {batch['state']:<11} {batch['total']} items")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.upload:
        client.delete_upload(args.id)
    else:
        client.delete_job(args.id)
    print(f"deleted {'upload' if args.upload else 'job'} {args.id}")
    return 0


def _cmd_secret(args: argparse.Namespace) -> int:
    secret = _client(args).rotate_webhook_secret()
    print("webhook signing secret (shown once; the previous one still signs for 24 h):")
    print(secret)
    return 0


def _cmd_endpoint(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).set_webhook_endpoint(None if args.clear else args.url)))
    return 0


def _cmd_deliveries(args: argparse.Namespace) -> int:
    subject = {"job_id": args.job} if args.job else {"batch_id": args.batch} if args.batch else {}
    for delivery in _client(args).webhook_deliveries(**subject):
        print(json.dumps(delivery))
    return 0


def _command(group: argparse._SubParsersAction, name: str, handler, text: str):
    parser = group.add_parser(name, help=text)
    _client_options(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_batch_commands(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser("batch", help="batches of jobs with per-item results")
    group = batch.add_subparsers(dest="batch_command", required=True)
    submit = _command(group, "submit", _cmd_submit, "submit a JSONL file of submit bodies")
    submit.add_argument("items", help="JSONL: one submit body a line, optional custom_id")
    submit.add_argument("--watch", action="store_true", help="show progress until all end")
    submit.add_argument("--webhook-url", help="receives batch.completed")
    submit.add_argument("--idempotency-key", help="retrying with it never makes two batches")
    for name, handler, text in (
        ("results", _cmd_results, "per-item results as JSONL on stdout"),
        ("status", _cmd_status, "counts per state and progress"),
        ("cancel", _cmd_cancel, "cancel every item that has not finished"),
    ):
        _command(group, name, handler, text).add_argument("batch_id")
    _command(group, "list", _cmd_list, "your batches, newest first")

    delete = _command(commands, "delete", _cmd_delete, "delete a finished job (or an upload)")
    delete.add_argument("id")
    delete.add_argument("--upload", action="store_true", help="the id is an upload's")

    webhook = commands.add_parser("webhook", help="signed webhooks: secret, endpoint, deliveries")
    hooks = webhook.add_subparsers(dest="webhook_command", required=True)
    _command(hooks, "secret", _cmd_secret, "create or rotate the signing secret")
    endpoint = _command(hooks, "endpoint", _cmd_endpoint, "set the default endpoint")
    target = endpoint.add_mutually_exclusive_group(required=True)
    target.add_argument("url", nargs="?")
    target.add_argument("--clear", action="store_true")
    deliveries = _command(hooks, "deliveries", _cmd_deliveries, "deliveries and attempts")
    deliveries.add_argument("--job")
    deliveries.add_argument("--batch")
