"""Which adapter sits in which device slot, who uses it, and which to evict: bookkeeping only.

A slot is referenced by every request that will run or runs with its adapter (pinned when the
request is submitted while the adapter is resident, or when it is admitted); a referenced slot
is never evicted. A newcomer's adapter takes a free slot, else the least recently used
unreferenced one; when every slot is referenced it waits. Slot 0 is "no adapter" and never
handed out. Thread-safe: submitters pin from their own threads.
"""

from __future__ import annotations

import itertools
import threading


class AdapterSlots:
    def __init__(self, count: int) -> None:
        self.count = count
        self._ids: list[str | None] = [None] * (count + 1)  # slot → adapter id; 0 stays None
        self._refs = [0] * (count + 1)
        self._last_use = [0] * (count + 1)
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def pin_resident(self, adapter_id: str) -> int | None:
        """The slot holding `adapter_id`, now referenced once more; None if not resident."""
        with self._lock:
            slot = self._find(adapter_id)
            if slot is not None:
                self._use(slot)
            return slot

    def claim(self, adapter_id: str) -> tuple[int, bool] | None:
        """A referenced slot for `adapter_id` and whether its weights must be installed there
        (False: it is resident already); None when every slot is referenced."""
        with self._lock:
            slot = self._find(adapter_id)
            if slot is not None:
                self._use(slot)
                return slot, False
            free = [s for s in range(1, self.count + 1) if self._refs[s] == 0]
            if not free:
                return None
            # never used slots have last use 0, so they go first
            slot = min(free, key=lambda s: self._last_use[s])
            self._ids[slot] = adapter_id
            self._use(slot)
            return slot, True

    def unpin(self, slot: int) -> None:
        with self._lock:
            if self._refs[slot] <= 0:
                raise RuntimeError(f"adapter slot {slot} released more often than taken")
            self._refs[slot] -= 1

    def resident(self) -> dict[str, int]:
        """Adapter id → slot, for the resident adapters."""
        with self._lock:
            return {a: s for s, a in enumerate(self._ids) if a is not None}

    def _find(self, adapter_id: str) -> int | None:
        return next((s for s, a in enumerate(self._ids) if a == adapter_id), None)

    def _use(self, slot: int) -> None:
        self._refs[slot] += 1
        self._last_use[slot] = next(self._clock)
