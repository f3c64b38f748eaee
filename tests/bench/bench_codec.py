"""Codec decode speed: seconds of audio decoded per second, for short and long clips, and
several songs through the CodecBatcher against the same songs one after another.

    python tests/bench/bench_codec.py                                  # tiny codec, CPU
    python tests/bench/bench_codec.py --real-sizes --device cuda       # 1.66 B sizes, fp32
    python tests/bench/bench_codec.py --real-sizes --device cuda --dtype fp16

Random weights (tiny, or the real sizes built in memory): the numbers measure speed only.
Each clip length is decoded with the reference's loop padding (short clips cost a whole
29.76 s window) and with `loop_padding=False` (only the real codes are decoded). On CPU the
process's CPU seconds are reported too: with `--threads 1` they barely move when other work
shares the machine (with more threads, waiting threads spin and inflate them).
The last line, `batched/serial codec ratio`, is serial time / batched time for `--songs` songs
of `--song-seconds` each (what a GPU worker's concurrent decode jobs gain).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from shared.core.constants import CODEC_CODES, FRAMES_PER_SECOND
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.config import HeartCodecConfig
from shared.ml.codec.decoder import HeartCodecDecoder, plan_windows
from shared.ml.codec.tiny import TINY_CODEC_CONFIG, random_codec
from shared.ml.models.checkpoint import resolve_device, resolve_dtype


def build_decoder(real_sizes: bool, device: str | None, dtype: str | None) -> HeartCodecDecoder:
    dev = resolve_device(device)
    config = HeartCodecConfig() if real_sizes else TINY_CODEC_CONFIG
    model = random_codec(config, seed=0, device=str(dev))
    if dtype:
        model = model.to(resolve_dtype(dtype, dev))
    return HeartCodecDecoder(model)


def timed(
    decoder: HeartCodecDecoder, codes: np.ndarray, steps: int, loop: bool
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for one decode."""
    cuda = decoder.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    decoder.detokenize(codes, steps=steps, loop_padding=loop)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def batched_ratio(decoder: HeartCodecDecoder, songs: list[np.ndarray], steps: int) -> float:
    """Serial seconds / batched seconds: the songs one after another, then all through one
    CodecBatcher (rounds stepped here, as its loop thread would)."""
    cuda = decoder.device.type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    start = clock()
    for seed, codes in enumerate(songs):
        decoder.detokenize(codes, steps=steps, seed=seed)
    serial = clock() - start
    batcher = CodecBatcher(decoder, max_batch=len(songs))
    start = clock()
    futures = [batcher.submit(c, steps=steps, seed=seed) for seed, c in enumerate(songs)]
    while not all(f.done() for f in futures):
        batcher.step()
    batched = clock() - start
    for future in futures:
        future.result()  # a failed song fails the bench
    print(f"  {len(songs)} songs: serial {serial:.2f} s, batched {batched:.2f} s")
    return serial / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-sizes", action="store_true", help="official sizes, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 30.0, 120.0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="best of N per clip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--songs", type=int, default=8, help="songs decoded together")
    parser.add_argument("--song-seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    decoder = build_decoder(args.real_sizes, args.device, args.dtype)
    rng = np.random.default_rng(0)
    clips = {s: rng.integers(0, CODEC_CODES, (8, int(s * FRAMES_PER_SECOND))) for s in args.seconds}
    timed(decoder, clips[min(clips)], args.steps, loop=True)  # warm-up (kernels, allocator)
    sizes = "official sizes" if args.real_sizes else "tiny"
    print(
        f"codec: {sizes} on {decoder.device} ({decoder.dtype}); {args.steps} steps, "
        f"guidance 1.25; torch threads {torch.get_num_threads()}"
    )
    on_cpu = decoder.device.type == "cpu"
    for loop in (True, False):
        label = "loop padding (reference)" if loop else "no loop padding"
        wall_cost: dict[float, float] = {}
        cpu_cost: dict[float, float] = {}
        for seconds, codes in clips.items():
            runs = [timed(decoder, codes, args.steps, loop) for _ in range(args.repeats)]
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            wall_cost[seconds], cpu_cost[seconds] = wall / seconds, cpu / seconds
            windows = plan_windows(codes.shape[1], loop)
            print(
                f"  [{label}] {seconds:6.1f} s clip: {len(windows)} window(s) "
                f"({sum(w.codes for w in windows)} codes), {wall:7.2f} s, "
                f"{seconds / wall:7.2f} audio-s/s"
                + (f"; {cpu:7.2f} CPU-s, {seconds / cpu:7.2f} audio-s per CPU-s" if on_cpu else "")
            )
        short, long = min(clips), max(clips)
        line = f"[{label}] short/long cost ratio: {wall_cost[short] / wall_cost[long]:.2f}"
        if on_cpu:
            line += f" (CPU seconds: {cpu_cost[short] / cpu_cost[long]:.2f})"
        print(line)
    songs = [
        rng.integers(0, CODEC_CODES, (8, int(args.song_seconds * FRAMES_PER_SECOND)))
        for _ in range(args.songs)
    ]
    print(f"batched/serial codec ratio: {batched_ratio(decoder, songs, args.steps):.2f}")


if __name__ == "__main__":
    main()
