"""The `heartcluster` command line.

Model commands import torch lazily inside their handlers, so importing this module (or the
gateway) never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.client.batch_cli import add_batch_commands
from api.client.cli_errors import run_reporting_errors
from api.client.cluster_cli import add_cluster_commands, read_text_or_file
from api.client.datasets_cli import add_dataset_commands
from api.client.jobs_cli import add_jobs_commands
from api.client.operator_cli import add_operator_commands
from shared.core.constants import FRAMES_PER_SECOND

if TYPE_CHECKING:
    import numpy as np

    from shared.ml.codec.decoder import HeartCodecDecoder

TOKENS_SUFFIX = ".npy"
# The generate option behind each field an engine RequestError can name.
REQUEST_OPTIONS = {
    "duration_s": "--duration",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "cfg_scale": "--cfg-scale",
    "seed": "--seed",
    "history": "--history",
}


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from shared.ml.models.tiny import NOISE_WARNING, write_tiny_models

    for path in write_tiny_models(Path(args.dir), seed=args.seed):
        print(f"wrote {path}")
    print(f"warning: {NOISE_WARNING}")
    return 0


def _cmd_models_download(args: argparse.Namespace) -> int:
    from api.client.models_download import DownloadError, download_models

    try:
        download_models(Path(args.dir))
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done: point HEARTCLUSTER_MODEL_DIR at {Path(args.dir).resolve()}")
    return 0


def _load_decoder(args: argparse.Namespace) -> HeartCodecDecoder:
    """The codec from --model-dir on --device (fp32 unless --codec-dtype says otherwise)."""
    from shared.ml.codec.decoder import load_codec
    from shared.ml.codec.tiny import TINY_CODEC_CONFIG
    from shared.ml.models.tiny import NOISE_WARNING

    decoder = load_codec(Path(args.model_dir), args.device, args.codec_dtype)
    if decoder.config == TINY_CODEC_CONFIG:
        print(f"warning: tiny codec: {NOISE_WARNING}", file=sys.stderr)
    return decoder


def _decode_to_file(
    args: argparse.Namespace, decoder: HeartCodecDecoder, codes: np.ndarray, out: Path
) -> None:
    """Decode with a progress bar (shared by `decode` and `generate`)."""
    from tqdm import tqdm

    from shared.core.progress import percent_bar
    from shared.ml.codec.export import decode_to_file

    with tqdm(total=100, unit="%", desc="decode", file=sys.stderr) as bar:
        decode_to_file(
            decoder,
            codes,
            out,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            loop_padding=not args.no_loop_padding,
            on_progress=percent_bar(bar),
        )


def _is_tokens(path: str) -> bool:
    return Path(path).suffix.lower() == TOKENS_SUFFIX


def _cmd_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from shared.core.audio import format_for_path
    from shared.ml.models.checkpoint import CheckpointError

    try:
        format_for_path(args.out)
        codes = np.load(args.tokens)
        _decode_to_file(args, _load_decoder(args), codes, Path(args.out))
    except (OSError, ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({codes.shape[-1] / FRAMES_PER_SECOND:.2f} s, 48 kHz stereo)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from shared.core.audio import AudioError, format_for_path
    from shared.ml.generation.engine import GenerationRequest, RequestError
    from shared.ml.generation.local import generate_tokens
    from shared.ml.models.checkpoint import CheckpointError

    decoder = None
    history = np.load(args.history) if args.history else None
    request = GenerationRequest(
        tags=args.tags,
        lyrics=read_text_or_file(args.lyrics),
        duration_s=args.duration,
        temperature=args.temperature,
        top_k=args.top_k,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        history=history,
    )
    try:
        request.validate()  # bad options fail before any model loads
        if args.tokens_out and not _is_tokens(args.tokens_out):
            raise AudioError(f"--tokens-out must end in {TOKENS_SUFFIX}, got {args.tokens_out}")
        if not _is_tokens(args.out):
            format_for_path(args.out)
            # Load the codec first, so a missing codec fails before minutes of generation.
            decoder = _load_decoder(args)
        tokens, result = generate_tokens(
            Path(args.model_dir), request, args.model_version, args.device, args.dtype
        )
    except RequestError as error:
        option = REQUEST_OPTIONS.get(error.field, error.field)
        print(f"error: {option} ({error.field}): {error.message}", file=sys.stderr)
        return 2
    except (AudioError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"prompt {result.prompt_length} tokens; {result.tokens.shape[1]} new frames "
        f"({result.finish_reason}); {list(tokens.shape)} tokens"
    )
    for path in (args.tokens_out, args.out):
        if path and _is_tokens(path):
            np.save(path, tokens)
            print(f"wrote {path}")
    if decoder is not None:
        _decode_to_file(args, decoder, tokens, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="codec flow-matching steps")
    parser.add_argument("--guidance", type=float, default=1.25, help="codec guidance scale")
    parser.add_argument(
        "--codec-dtype", default=None, help="codec dtype: fp32 (default), bf16 or fp16"
    )
    parser.add_argument(
        "--no-loop-padding",
        action="store_true",
        help="decode only the real codes (cheaper for clips under 29.76 s; the reference "
        "loops short inputs up to whole windows)",
    )


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from shared.ml.codec.local import encode_file

    try:
        tokens = encode_file(Path(args.model_dir), Path(args.audio), args.device, args.dtype)
    except ValueError as error:  # unreadable audio, or a missing/mismatched CheckpointError
        print(f"error: {error}", file=sys.stderr)
        return 2
    np.save(args.out, tokens)
    seconds = tokens.shape[1] / FRAMES_PER_SECOND
    print(f"wrote {args.out} {list(tokens.shape)} ({seconds:.2f} s of tokens)")
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from shared.core.audio import read_audio
    from shared.core.lyrics import to_lrc, to_srt
    from shared.core.progress import percent_bar
    from shared.ml.transcribe import load_transcriber

    try:
        # The audio is checked before the model loads, so a bad file fails at once.
        audio, rate = read_audio(Path(args.audio), name=args.audio)
        transcriber = load_transcriber(
            Path(args.model_dir),
            args.device,
            args.dtype,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        with tqdm(total=100, unit="%", desc="transcribe", file=sys.stderr) as bar:
            transcript = transcriber.transcribe(
                audio, rate, language=args.language, on_progress=percent_bar(bar)
            )
    except ValueError as error:  # AudioError, CheckpointError, an unknown language
        print(f"error: {error}", file=sys.stderr)
        return 2
    outputs = [(args.out, json.dumps(transcript.to_json(), indent=2, ensure_ascii=False) + "\n")]
    if args.lrc:
        outputs.append((args.lrc, to_lrc(transcript)))
    if args.srt:
        outputs.append((args.srt, to_srt(transcript)))
    for path, text in outputs:
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    print(
        f"{len(transcript.segments)} segments, {transcript.duration_s:.2f} s, "
        f"language {transcript.language or 'unknown'}"
    )
    return 0


def _model_options(parser: argparse.ArgumentParser, holds: str) -> None:
    """--model-dir (required unless HEARTCLUSTER_MODEL_DIR is set) and --device."""
    default = os.environ.get("HEARTCLUSTER_MODEL_DIR")
    parser.add_argument(
        "--model-dir",
        default=default,
        required=default is None,
        help=f"folder holding {holds} (default: $HEARTCLUSTER_MODEL_DIR)",
    )
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help lines end with the option's default, unless they name it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = "default" in text or default in (None, False, "", argparse.SUPPRESS)
        if shown or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser is one of these too (argparse makes them of the parent's
    class), so every help text shows its defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    try:
        return metadata.version("heartcluster")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="heartcluster", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"heartcluster {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="model directories")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    tiny = model_commands.add_parser(
        "tiny", help="write tiny random-weight models (official layout; noise, not music)"
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_models_tiny)
    download = model_commands.add_parser(
        "download",
        help="fetch the official checkpoints (Hugging Face; resumable) and check their layout",
    )
    download.add_argument(
        "dir",
        nargs="?",
        default=os.environ.get("HEARTCLUSTER_MODEL_DIR", "models"),
        help="model directory (default: $HEARTCLUSTER_MODEL_DIR or ./models)",
    )
    download.set_defaults(handler=_cmd_models_download)

    gen = commands.add_parser("generate", help="generate in this process (no cluster)")
    _model_options(gen, "HeartMuLa-oss-VERSION/, tokenizer.json, gen_config.json")
    gen.add_argument(
        "--model-version",
        default=None,
        help="HeartMuLa-oss-VERSION folder (3B, tiny); default: the only one present",
    )
    gen.add_argument("--tags", required=True, help="comma-separated, e.g. piano,happy")
    gen.add_argument("--lyrics", default="", help="lyrics text, or a file holding them")
    gen.add_argument("--duration", type=float, default=120.0, help="seconds")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest codes")
    gen.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--history", help="tokens.npy [8, T] to continue from")
    gen.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: per device)")
    gen.add_argument(
        "--out", required=True, help="tokens (.npy) or audio (.flac, .wav, .mp3) to write"
    )
    gen.add_argument("--tokens-out", help="also write the tokens (.npy) when --out is audio")
    _add_decode_options(gen)
    gen.set_defaults(handler=_cmd_generate)

    dec = commands.add_parser("decode", help="decode tokens.npy [8, T] to audio in this process")
    dec.add_argument("tokens", help="tokens.npy, int array [8, T]")
    dec.add_argument("--out", required=True, help="audio file: .flac, .wav or .mp3")
    _model_options(dec, "HeartCodec-oss/")
    dec.add_argument("--seed", type=int, default=0, help="decoding noise seed")
    _add_decode_options(dec)
    dec.set_defaults(handler=_cmd_decode)

    enc = commands.add_parser("encode", help="audio file → tokens.npy [8, T] in this process")
    enc.add_argument("audio", help="WAV, FLAC, OGG or MP3 file")
    enc.add_argument("--out", required=True, help="tokens.npy to write")
    _model_options(enc, "HeartCodec-oss-encoder/ and HeartCodec-oss/")
    enc.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: fp32)")
    enc.set_defaults(handler=_cmd_encode)

    tr = commands.add_parser("transcribe", help="lyrics from an audio file, in this process")
    tr.add_argument("audio", help="WAV, FLAC, OGG or MP3 file")
    tr.add_argument("--out", required=True, help="transcript.json to write")
    tr.add_argument("--lrc", help="also write LRC lyrics ([mm:ss.xx] lines)")
    tr.add_argument("--srt", help="also write SRT subtitles")
    _model_options(tr, "HeartTranscriptor-oss/")
    tr.add_argument("--language", default=None, help="e.g. en, zh (default: detected per chunk)")
    tr.add_argument("--batch-size", type=int, default=16, help="30 s chunks decoded at once")
    tr.add_argument(
        "--max-new-tokens", type=int, default=256, help="most tokens decoded per 30 s window"
    )
    tr.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: per device)")
    tr.set_defaults(handler=_cmd_transcribe)

    add_cluster_commands(commands)
    add_jobs_commands(commands)
    add_batch_commands(commands)
    add_dataset_commands(commands)
    add_operator_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
