"""The GPU benchmark behind tests/bench/bench_gpu.sh: one table of what the product needs.

    tests/bench/bench_gpu.sh                      # CUDA, 3B-size random weights, bf16
    python tests/bench/bench_gpu.py --smoke       # tiny models on CPU: checks the script only

Random weights: the numbers measure speed only. Rows: LM frames/s at 1, 8, 64 and 128 songs
(cfg 1.5, CUDA graphs), time to first frame of a song arriving at an idle engine, peak GPU
memory, codec decode × real time for 1 and 8 songs (8 through the CodecBatcher), and
fine-tune steps/s when tests/bench/bench_finetune.py exists.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from shared.core.constants import CODEC_CODES, FRAME_S
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.config import HeartCodecConfig
from shared.ml.codec.decoder import HeartCodecDecoder
from shared.ml.codec.tiny import TINY_CODEC_CONFIG, random_codec
from shared.ml.generation.engine import GenerationEngine, GenerationRequest
from shared.ml.models.heartmula import HeartMuLaConfig
from shared.ml.models.prompt import GenConfig, PromptBuilder
from shared.ml.models.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tiny_tokenizer,
    random_heartmula,
    tiny_heartmula_config,
)

FINETUNE_BENCH = Path(__file__).with_name("bench_finetune.py")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_engine(smoke: bool, device: torch.device, rows: int, seq_len: int) -> GenerationEngine:
    tokenizer = build_tiny_tokenizer()
    if smoke:
        config, dtype = tiny_heartmula_config(tokenizer.get_vocab_size()), torch.float32
    else:
        config = HeartMuLaConfig.from_dict({"backbone_flavor": "llama-3B"})
        dtype = torch.bfloat16
    gen = GenConfig(tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    model = random_heartmula(config, 0, dtype, device)
    return GenerationEngine(
        model,
        PromptBuilder(tokenizer, gen),
        max_rows=rows,
        max_seq_len=seq_len,
        cuda_graphs=device.type == "cuda",
    )


def lm_rows(engine: GenerationEngine, songs: list[int], frames: int) -> list[tuple[str, str]]:
    device = engine.model.device
    base = GenerationRequest(
        "piano,happy", "[verse] la la la", duration_s=frames * FRAME_S, stop_at_eos=False
    )
    rows = []
    for n in songs:
        requests = [replace(base, seed=s) for s in range(n)]
        engine.generate([replace(r, duration_s=4 * FRAME_S) for r in requests])  # capture
        sync(device)
        start = time.perf_counter()
        engine.generate(requests)
        sync(device)
        rate = n * frames / (time.perf_counter() - start)
        rows.append((f"LM frames/s, {n} song(s), cfg 1.5", f"{rate:,.0f}"))
    first: list[float] = []
    start = time.perf_counter()
    engine.generate(
        [replace(base, duration_s=2 * FRAME_S)],
        on_progress=lambda *_: first.append(time.perf_counter()) if not first else None,
    )
    rows.append(("LM time to first frame (idle engine)", f"{(first[0] - start) * 1000:.0f} ms"))
    return rows


def codec_rows(smoke: bool, device: torch.device, seconds: float) -> list[tuple[str, str]]:
    config = TINY_CODEC_CONFIG if smoke else HeartCodecConfig()
    decoder = HeartCodecDecoder(random_codec(config, seed=0, device=str(device)))
    frames = round(seconds / FRAME_S)
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, CODEC_CODES, size=(8, frames)) for _ in range(8)]
    batcher = CodecBatcher(decoder, max_batch=8)
    batcher.start()
    try:
        batcher.detokenize(codes[0][:, :50], steps=2)  # warm-up
        rows = []
        for n in (1, 8):
            sync(device)
            start = time.perf_counter()
            futures = [batcher.submit(c, seed=i) for i, c in enumerate(codes[:n])]
            for future in futures:
                future.result()
            sync(device)
            speed = n * seconds / (time.perf_counter() - start)
            rows.append(
                (f"codec decode x real time, {n} song(s) of {seconds:.0f} s", f"{speed:.1f}")
            )
    finally:
        batcher.stop()
    return rows


def finetune_rows() -> list[tuple[str, str]]:
    if not FINETUNE_BENCH.is_file():
        return [("fine-tune steps/s", "n/a (no tests/bench/bench_finetune.py)")]
    out = subprocess.run(
        [sys.executable, str(FINETUNE_BENCH)], capture_output=True, text=True, timeout=150
    )
    lines = [line for line in out.stdout.splitlines() if "steps/s" in line]
    if out.returncode or not lines:
        return [("fine-tune steps/s", f"failed (exit {out.returncode}): {out.stderr[-200:]}")]
    return [("fine-tune", lines[-1].strip())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU (a dry run)")
    parser.add_argument("--songs", type=int, nargs="+", default=[1, 8, 64, 128])
    parser.add_argument("--frames", type=int, default=128, help="frames per song")
    parser.add_argument("--codec-seconds", type=float, default=60.0, help="audio per song")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (torch.cuda.is_available() is False); use --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows_needed = 2 * max(args.songs)  # cfg 1.5: two rows per song
    engine = build_engine(args.smoke, device, rows_needed, seq_len=1024)
    table = lm_rows(engine, args.songs, args.frames)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        table.append(("peak GPU memory (LM, all of the above)", f"{peak:.1f} GiB"))
    del engine
    table += codec_rows(args.smoke, device, args.codec_seconds)
    table += finetune_rows()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    width = max(len(label) for label, _ in table)
    print(f"\n{name}; random weights ({'tiny' if args.smoke else '3B sizes, bf16'})")
    for label, value in table:
        print(f"| {label:<{width}} | {value:>14} |")


if __name__ == "__main__":
    main()
