"""Several songs through one codec at once: their windows share estimator batches.

A GPU worker decodes songs for many jobs; one at a time leaves the estimator running batch 2
(guidance) over one 29.76 s window. The batcher keeps the decodes that are under way and, each
round, solves the next window of every song whose window has the same shape (length, prefix)
as the longest-waiting song's, up to `max_batch` songs, in one Euler solve. New songs join at
the next round, i.e. at a window boundary, like requests joining the LM engine at a frame; a
song whose job stops ends at the next solver step (its batch mates go on).
Each song keeps its own noise generator, so its audio does not depend on its batch mates.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.utils import parametrize

from shared.core.progress import AbortCheck, Aborted, Progress
from shared.ml.codec.decoder import Cursor, HeartCodecDecoder


@dataclass(eq=False)
class _Song:
    cursor: Cursor
    steps: int
    guidance: float
    on_progress: Progress | None
    should_abort: AbortCheck | None
    future: Future = field(default_factory=Future)
    segments: list[np.ndarray] = field(default_factory=list)
    done_units: int = 0

    @property
    def units(self) -> int:
        return len(self.cursor.windows) * (self.steps + 1)  # solver steps + one render each

    @property
    def batch_key(self) -> tuple:
        return (*self.cursor.batch_key, self.steps, self.guidance)

    def report(self) -> None:
        self.done_units += 1
        if self.on_progress is not None:
            self.on_progress("decoding", self.done_units / self.units)

    def ended_by_abort(self) -> bool:
        """Fail the song with Aborted if its job asks to stop."""
        if not (self.should_abort and self.should_abort()):
            return False
        self.future.set_exception(
            Aborted(f"decode aborted after {self.done_units} of {self.units} steps")
        )
        return True


class CodecBatcher:
    def __init__(
        self,
        decoder: HeartCodecDecoder,
        max_batch: int = 8,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`on_batch` hears the number of songs of every batch solved (metrics)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.decoder = decoder
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._songs: deque[_Song] = deque()  # waiting for a round, longest-waiting first
        self._round: list[_Song] = []  # the songs of the round being solved
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def detokenize(
        self,
        codes: np.ndarray | torch.Tensor,
        *,
        steps: int = 10,
        guidance: float = 1.25,
        seed: int = 0,
        loop_padding: bool = True,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> torch.Tensor:
        """`HeartCodecDecoder.detokenize`, batched with whatever else is decoding; blocks
        until done, so the loop must run (`start`). An abort takes effect at the next solver
        step (raising Aborted)."""
        if self._thread is None:
            raise RuntimeError("start() the codec batcher before decoding through it")
        future = self.submit(
            codes,
            steps=steps,
            guidance=guidance,
            seed=seed,
            loop_padding=loop_padding,
            on_progress=on_progress,
            should_abort=should_abort,
        )
        return future.result()

    def submit(
        self,
        codes: np.ndarray | torch.Tensor,
        *,
        steps: int = 10,
        guidance: float = 1.25,
        seed: int = 0,
        loop_padding: bool = True,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> Future:
        """Queue one song; its future gives float32 audio [2, T · 3840]."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cursor = self.decoder.cursor(codes, seed, loop_padding)
        song = _Song(cursor, steps, guidance, on_progress, should_abort)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the codec batcher was stopped")
            self._songs.append(song)
            self._lock.notify_all()
        return song.future

    @property
    def songs_decoding(self) -> int:
        """Songs submitted and not yet finished, failed or aborted."""
        with self._lock:
            return len(self._songs) + len(self._round)

    def start(self) -> None:
        """Run rounds in a daemon thread until stop(); without it, call `step` yourself."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="codec", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the loop; songs still decoding fail."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            songs, self._songs = list(self._songs), deque()
        for song in songs:
            song.future.set_exception(RuntimeError("the codec batcher was stopped"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._songs or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One round: drop aborted songs, then solve and render one batch of windows."""
        with self._lock:
            for song in [s for s in self._songs if s.ended_by_abort()]:
                self._songs.remove(song)
            if not self._songs:
                return
            key = self._songs[0].batch_key
            batch = [s for s in self._songs if s.batch_key == key][: self.max_batch]
            for song in batch:  # the others go first next round
                self._songs.remove(song)
            self._round = batch
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            with parametrize.cached():
                latents = self.decoder.solve_windows(
                    [s.cursor for s in batch],
                    steps=key[2],
                    guidance=key[3],
                    on_step=lambda _: self._report(batch),
                )
                for song, window in zip(batch, latents, strict=True):
                    song.segments.append(self.decoder.render(window))
        except Exception as error:  # noqa: BLE001 (a failed batch fails its songs only)
            for song in batch:
                if not song.future.done():
                    song.future.set_exception(error)
            batch = []
        else:
            self._report(batch)
            finished = [s for s in batch if not s.future.done() and s.cursor.done]
            for song in finished:
                song.future.set_result(self.decoder.join(song.segments, song.cursor.num_codes))
        with self._lock:
            self._songs.extend(s for s in batch if not s.future.done())
            self._round = []

    @staticmethod
    def _report(batch: list[_Song]) -> None:
        """After each solver step: a song whose job stopped ends now (its window is still
        solved with the others, its result dropped); the others hear their progress."""
        for song in batch:
            if song.future.done():
                continue
            try:
                if not song.ended_by_abort():
                    song.report()
            except Exception as error:  # noqa: BLE001 (the caller's failure ends its song)
                song.future.set_exception(error)
