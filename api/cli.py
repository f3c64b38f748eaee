"""The `heartcluster` command line.

Model commands import torch lazily inside their handlers, so importing this module (or the
gateway) never loads torch.
"""

from __future__ import annotations

import argparse
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


def _cmd_keys_create(args: argparse.Namespace) -> int:
    import redis

    from shared.config import Settings
    from shared.tenants import TenantStore

    try:
        settings = Settings.from_env()
        key = TenantStore(redis.Redis.from_url(settings.redis_url)).create_key(args.tenant)
    except (ValueError, redis.RedisError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"API key for tenant {args.tenant!r} (shown once; keep it secret):")
    print(key)
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

    keys = commands.add_parser("keys", help="API keys (stored hashed in Redis)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create_key = key_commands.add_parser(
        "create", help="create a tenant's API key; prints it alone on the last line"
    )
    create_key.add_argument("--tenant", required=True, help="lowercase letters, digits, - and _")
    create_key.set_defaults(handler=_cmd_keys_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
