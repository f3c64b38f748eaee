"""Fine-tune speed and memory: optimizer steps/s and peak memory of LoRA training.

    python tests/bench/bench_finetune.py                                  # tiny model, CPU
    python tests/bench/bench_finetune.py --real-sizes --device cuda --frames 1500 3000

Random weights (tiny, or the real 3B sizes built in memory): the numbers measure speed and
memory only. On CUDA the run is what a train worker does: bf16 weights, bf16 autocast,
gradient checkpointing, fp32 LoRA weights and AdamW state.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.ml.models.checkpoint import resolve_device
from shared.ml.models.heartmula import HeartMuLa, HeartMuLaConfig, load_heartmula
from shared.ml.models.prompt import GenConfig, PromptBuilder
from shared.ml.models.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tiny_tokenizer,
    random_heartmula,
    write_tiny_heartmula,
)
from shared.ml.training.data import SongItem, cut_examples
from shared.ml.training.trainer import TrainConfig, Trainer

REAL_3B = {"backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M"}
TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


class _NoCheckpoints:
    def load(self) -> bytes | None:
        return None

    def save(self, data: bytes) -> None:
        pass


def build(real_sizes: bool, device: torch.device) -> tuple[HeartMuLa, PromptBuilder]:
    if not real_sizes:
        model_dir = Path(tempfile.mkdtemp())
        folder = write_tiny_heartmula(model_dir)
        return load_heartmula(folder, device, torch.float32), PromptBuilder.from_model_dir(
            model_dir
        )
    tokenizer = build_tiny_tokenizer()
    gen = GenConfig(tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = random_heartmula(HeartMuLaConfig.from_dict(REAL_3B), 0, dtype, device)
    return model, PromptBuilder(tokenizer, gen)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB, whole process


def run(model: HeartMuLa, prompts: PromptBuilder, args: argparse.Namespace, frames: int) -> None:
    rng = np.random.default_rng(0)
    songs = [
        SongItem("pop,happy", "la la la", rng.integers(0, 8192, (8, frames), dtype=np.int32))
        for _ in range(args.batch_size * (args.steps + args.warmup))
    ]
    examples = cut_examples(songs, prompts, model.config.backbone.max_seq_len)
    config = TrainConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        dropout=0.05,
        targets=TARGETS,
        learning_rate=1e-4,
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        grad_accumulation=1,
        warmup_steps=0,
        uncond_prob=0.1,
        checkpoint_every=10**9,
        seed=0,
    )
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    trainer = Trainer(model, prompts, examples, [], config, _NoCheckpoints())
    times: list[float] = []

    def progress(stage: str, fraction: float, *rest: object, **kwargs: object) -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    trainer.run(progress)
    trainer.close()
    timed = times[args.warmup :]
    steps_per_s = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    trainable = sum(p.numel() for p in trainer.trainable)
    print(
        f"frames {frames:5d}  batch {args.batch_size}  rank {args.rank}  "
        f"LoRA params {trainable / 1e6:.1f} M  {steps_per_s:.2f} steps/s  "
        f"{steps_per_s * args.batch_size * frames / 12.5:.1f} audio s/s  "
        f"peak memory {peak_memory_gb(model.device):.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-sizes", action="store_true", help="3B sizes, random weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--frames", type=int, nargs="+", default=[250], help="frames per song")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model, prompts = build(args.real_sizes, device)
    print(f"{'3B sizes' if args.real_sizes else 'tiny'} on {device}")
    for frames in args.frames:
        run(model, prompts, args, frames)


if __name__ == "__main__":
    main()
