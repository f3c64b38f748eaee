"""Test stand-ins that record what the code under test asked for."""

from __future__ import annotations

from typing import Any


class RecordingCelery:
    """Stands in for celery.Celery: records what the gateway sends, revokes and asks."""

    def __init__(self, consumed: tuple[str, ...] = ()) -> None:
        self.sent: list[dict[str, Any]] = []
        self.revoked: list[str] = []
        self.consumed = consumed
        self.fail_sends = False
        self.control = self

    def send_task(
        self, name: str, args: list, task_id: str, queue: str, ignore_result: bool = False
    ) -> None:
        assert ignore_result, "a wake-up has no result: senders must not wait for one"
        if self.fail_sends:
            raise ConnectionError("broker down")
        self.sent.append({"name": name, "args": args, "task_id": task_id, "queue": queue})

    def revoke(self, task_ids: str | list[str]) -> None:
        self.revoked += [task_ids] if isinstance(task_ids, str) else task_ids

    def inspect(self, timeout: float) -> RecordingCelery:
        return self

    def active_queues(self) -> dict[str, list[dict[str, str]]]:
        return {"worker@test": [{"name": name} for name in self.consumed]}
