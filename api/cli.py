"""The `heartcluster` command line.

Model commands import torch lazily inside their handlers, so importing this module (or the
gateway) never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _read_text_or_file(value: str) -> str:
    """CLI convenience: a local file's contents when the value names one, else the value."""
    path = Path(value)
    if value and path.is_file():
        print(f"reading lyrics from {path}", file=sys.stderr)
        return path.read_text(encoding="utf-8")
    return value


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from shared.models.tiny import NOISE_WARNING, write_tiny_models

    for path in write_tiny_models(Path(args.dir), seed=args.seed):
        print(f"wrote {path}")
    print(f"warning: {NOISE_WARNING}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from shared.generation.engine import GenerationRequest, RequestError
    from shared.generation.local import generate_tokens

    history = np.load(args.history) if args.history else None
    request = GenerationRequest(
        tags=args.tags,
        lyrics=_read_text_or_file(args.lyrics),
        duration_s=args.duration,
        temperature=args.temperature,
        top_k=args.top_k,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        history=history,
    )
    try:
        tokens, result = generate_tokens(
            Path(args.model_dir), request, args.model_version, args.device, args.dtype
        )
    except RequestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    np.save(args.out, tokens)
    print(
        f"prompt {result.prompt_length} tokens; {result.tokens.shape[1]} new frames "
        f"({result.finish_reason}); wrote {args.out} {list(tokens.shape)}"
    )
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from shared.codec.local import encode_file

    if not args.model_dir:
        print("error: pass --model-dir or set HEARTCLUSTER_MODEL_DIR", file=sys.stderr)
        return 2
    try:
        tokens = encode_file(Path(args.model_dir), Path(args.audio), args.device, args.dtype)
    except ValueError as error:  # unreadable audio, or a missing/mismatched CheckpointError
        print(f"error: {error}", file=sys.stderr)
        return 2
    np.save(args.out, tokens)
    print(f"wrote {args.out} {list(tokens.shape)} ({tokens.shape[1] / 12.5:.2f} s of tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heartcluster", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="model directories")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    tiny = model_commands.add_parser(
        "tiny", help="write tiny random-weight models (official layout; noise, not music)"
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_models_tiny)

    gen = commands.add_parser("generate", help="generate in this process (no cluster)")
    gen.add_argument("--model-dir", required=True)
    gen.add_argument(
        "--model-version",
        default=None,
        help="HeartMuLa-oss-VERSION folder (3B, tiny); default: the only one present",
    )
    gen.add_argument("--tags", required=True, help="comma-separated, e.g. piano,happy")
    gen.add_argument("--lyrics", default="", help="lyrics text, or a file holding them")
    gen.add_argument("--duration", type=float, default=120.0, help="seconds")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--cfg-scale", type=float, default=1.5)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--history", help="tokens.npy [8, T] to continue from")
    gen.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    gen.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: per device)")
    gen.add_argument("--out", required=True, help="tokens.npy to write")
    gen.set_defaults(handler=_cmd_generate)

    enc = commands.add_parser("encode", help="audio file → tokens.npy [8, T] in this process")
    enc.add_argument("audio", help="WAV, FLAC, OGG or MP3 file")
    enc.add_argument("--out", required=True, help="tokens.npy to write")
    enc.add_argument(
        "--model-dir",
        default=os.environ.get("HEARTCLUSTER_MODEL_DIR"),
        help="holds HeartCodec-oss-encoder/ and HeartCodec-oss/ (default: $HEARTCLUSTER_MODEL_DIR)",
    )
    enc.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    enc.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: fp32)")
    enc.set_defaults(handler=_cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
