"""Engine throughput: N requests batched vs the same N run one after another.

    python tests/bench/bench_engine.py                      # tiny model, CPU
    python tests/bench/bench_engine.py --real-sizes --device cuda --requests 8 16

Random weights (tiny, or the real 3B sizes built in memory): the numbers measure speed only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from shared.ml.generation.engine import GenerationEngine, GenerationRequest
from shared.ml.models.checkpoint import resolve_device, resolve_dtype
from shared.ml.models.heartmula import HeartMuLaConfig
from shared.ml.models.prompt import GenConfig, PromptBuilder
from shared.ml.models.tiny import BOS_TOKEN, EOS_TOKEN, build_tiny_tokenizer, random_heartmula

REAL_3B = {"backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M"}


def build_engine(
    real_sizes: bool, device: str | None, dtype: str | None, rows: int
) -> GenerationEngine:
    dev = resolve_device(device)
    if not real_sizes:
        from shared.ml.models.tiny import write_tiny_models

        model_dir = Path(tempfile.mkdtemp())
        write_tiny_models(model_dir)
        return GenerationEngine.from_model_dir(model_dir, "tiny", str(dev), dtype, max_rows=rows)
    tokenizer = build_tiny_tokenizer()
    gen = GenConfig(tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    model = random_heartmula(HeartMuLaConfig.from_dict(REAL_3B), 0, resolve_dtype(dtype, dev), dev)
    return GenerationEngine(model, PromptBuilder(tokenizer, gen), max_rows=rows)


def timed(engine: GenerationEngine, requests: list[GenerationRequest]) -> float:
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(requests)
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-sizes", action="store_true", help="3B sizes, random weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, nargs="+", default=[8])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per request")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    args = parser.parse_args()

    rows = 2 * max(args.requests) if args.cfg_scale != 1.0 else max(args.requests)
    engine = build_engine(args.real_sizes, args.device, args.dtype, rows)
    base = GenerationRequest(
        "piano,happy", "[verse] la la la", duration_s=args.seconds, cfg_scale=args.cfg_scale
    )
    frames = base.frames
    timed(engine, [replace(base, duration_s=0.8)])  # warm-up
    print(
        f"model: {'3B sizes' if args.real_sizes else 'tiny'} on {engine.model.device} "
        f"({engine.model.dtype}); {frames} frames per request; cfg {args.cfg_scale}"
    )
    ratio = 0.0
    for n in args.requests:
        requests = [replace(base, seed=s) for s in range(n)]
        sequential = sum(timed(engine, [r]) for r in requests)
        batched = timed(engine, requests)
        ratio = sequential / batched
        print(
            f"N={n}: sequential {n * frames / sequential:8.1f} frames/s, "
            f"batched {n * frames / batched:8.1f} frames/s"
        )
    print(f"batched/sequential ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
