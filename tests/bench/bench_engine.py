"""Engine speed: one song against a plain reference-style loop, N songs batched against in a row,
and N songs with 4 distinct LoRA adapters against the same N without.

    python tests/bench/bench_engine.py                      # tiny model, CPU (~1-2 minutes)
    python tests/bench/bench_engine.py --real-sizes --device cuda --requests 8

The baseline (tests/bench/reference_loop.py) does per frame what heartlib's loop does,
full-cache attention included; `--lean-baseline` adds one that attends only to the positions
written so far. Both sides of each ratio run interleaved, `--repeats` times, and the medians
are compared, so that a machine shared with other work slows both alike. Random weights
(tiny, or the real 3B sizes built in memory): the numbers measure speed only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from shared.ml.generation.engine import (
    AdapterCapacity,
    AdapterRef,
    GenerationEngine,
    GenerationRequest,
)
from shared.ml.models.checkpoint import resolve_device, resolve_dtype
from shared.ml.models.heartmula import HeartMuLaConfig
from shared.ml.models.prompt import GenConfig, PromptBuilder
from shared.ml.models.tiny import BOS_TOKEN, EOS_TOKEN, build_tiny_tokenizer, random_heartmula
from tests.bench.reference_loop import reference_generate

REAL_3B = {"backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M"}
ADAPTERS = 4  # distinct adapters in the adapter batch
ADAPTER_RANK = 16


def build_engine(
    real_sizes: bool,
    device: str | None,
    dtype: str | None,
    rows: int,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> GenerationEngine:
    dev = resolve_device(device)
    options = {
        "max_rows": rows,
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "adapters": AdapterCapacity(slots=ADAPTERS, max_rank=ADAPTER_RANK),
    }
    if not real_sizes:
        from shared.ml.models.tiny import write_tiny_models

        model_dir = Path(tempfile.mkdtemp())
        write_tiny_models(model_dir)
        return GenerationEngine.from_model_dir(model_dir, "tiny", str(dev), dtype, **options)
    tokenizer = build_tiny_tokenizer()
    gen = GenConfig(tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    model = random_heartmula(HeartMuLaConfig.from_dict(REAL_3B), 0, resolve_dtype(dtype, dev), dev)
    return GenerationEngine(model, PromptBuilder(tokenizer, gen), **options)


def random_adapter(engine: GenerationEngine, seed: int) -> AdapterRef:
    """A rank-16 adapter on every projection the engine serves, random A and B, written in
    PEFT's layout."""
    assert engine.lora is not None
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in engine.lora.layers.items():
        out_dim, in_dim = layer.weight.shape
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(ADAPTER_RANK, in_dim, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, ADAPTER_RANK, generator=generator)
    config = {"peft_type": "LORA", "r": ADAPTER_RANK, "lora_alpha": ADAPTER_RANK}
    files = {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save_safetensors({k: v * 0.01 for k, v in tensors.items()}),
    }
    return AdapterRef(f"adapter-{seed}", lambda: files)


def timed(engine: GenerationEngine, run: Callable[[], object]) -> float:
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    engine: GenerationEngine, a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of a and of b, run alternately."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(engine, a))
        times_b.append(timed(engine, b))
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-sizes", action="store_true", help="3B sizes, random weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=8, help="songs batched")
    parser.add_argument("--seconds", type=float, default=8.0, help="audio per song")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the engine's step (minutes)"
    )
    parser.add_argument(
        "--lean-baseline",
        action="store_true",
        help="also against a baseline that attends only to the positions written so far",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: no OpenMP spinning)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    n = args.requests
    rows = 2 * n if args.cfg_scale != 1.0 else n
    engine = build_engine(args.real_sizes, args.device, args.dtype, rows, compile=args.compile)
    eos_id = engine.prompts.gen_config.audio_eos_id
    base = GenerationRequest(
        "piano,happy",
        "[verse] la la la",
        duration_s=args.seconds,
        cfg_scale=args.cfg_scale,
        stop_at_eos=False,
    )
    frames = base.frames
    songs = [replace(base, seed=s) for s in range(n)]
    warm = replace(base, duration_s=0.8)
    engine.generate([warm] * n)  # warm-up: every step shape the timed runs meet, once
    engine.generate([warm])
    reference_generate(engine.model, engine.prompts, warm, eos_id)
    print(
        f"model: {'3B sizes' if args.real_sizes else 'tiny'} on {engine.model.device} "
        f"({engine.model.dtype}); {frames} frames per song; cfg {args.cfg_scale}; "
        f"medians of {args.repeats} interleaved runs; {torch.get_num_threads()} CPU thread(s); "
        f"engine step {'compiled' if args.compile else 'eager'}"
    )

    one, reference = interleaved(
        engine,
        lambda: engine.generate([base]),
        lambda: reference_generate(engine.model, engine.prompts, base, eos_id),
        args.repeats,
    )
    print(f"one song: engine {frames / one:8.1f} frames/s, baseline {frames / reference:8.1f}")
    print(f"one song engine/baseline ratio: {reference / one:.2f}")
    if args.lean_baseline:
        one, lean = interleaved(
            engine,
            lambda: engine.generate([base]),
            lambda: reference_generate(engine.model, engine.prompts, base, eos_id, True),
            args.repeats,
        )
        print(f"one song engine/lean-baseline ratio (exact keys): {lean / one:.2f}")

    batched, sequential = interleaved(
        engine,
        lambda: engine.generate(songs),
        lambda: [engine.generate([song]) for song in songs],
        args.repeats,
    )
    print(
        f"N={n}: batched {n * frames / batched:8.1f} frames/s, "
        f"sequential {n * frames / sequential:8.1f} frames/s"
    )
    print(f"batched/sequential ratio: {sequential / batched:.2f}")

    adapters = [random_adapter(engine, seed) for seed in range(ADAPTERS)]
    tuned = [replace(song, adapter=adapters[i % ADAPTERS]) for i, song in enumerate(songs)]
    engine.generate([replace(song, duration_s=0.8) for song in tuned])  # install, warm shapes
    with_adapters, plain = interleaved(
        engine, lambda: engine.generate(tuned), lambda: engine.generate(songs), args.repeats
    )
    print(
        f"N={n}, {ADAPTERS} adapters of rank {ADAPTER_RANK}: {n * frames / with_adapters:8.1f} "
        f"frames/s, without {n * frames / plain:8.1f} frames/s"
    )
    print(f"adapters/plain throughput ratio: {plain / with_adapters:.2f}")


if __name__ == "__main__":
    main()
