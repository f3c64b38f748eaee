"""`heartcluster models download DIR`: the official checkpoints in the layout the workers load.

Each official Hugging Face repository lands in its folder of the model directory (CHECKPOINTS
in the team handbook): the tokenizer and gen_config at the top, then HeartMuLa-oss-3B/,
HeartCodec-oss/, HeartCodec-oss-encoder/ and HeartTranscriptor-oss/. huggingface_hub resumes
interrupted files and skips finished ones, so running the command again completes a download.
Every folder is then checked for the files the loaders need, and the command says what it got.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfficialFolder:
    repo_id: str
    folder: str  # relative to the model directory; "." is the directory itself
    needs: tuple[str, ...]  # files the loader reads (shards are checked from the index)
    what: str
    patterns: tuple[str, ...] | None = None  # only these files of the repository

    @property
    def has_shards(self) -> bool:
        return "config.json" in self.needs


OFFICIAL: tuple[OfficialFolder, ...] = (
    OfficialFolder(
        "HeartMuLa/HeartMuLaGen",
        ".",
        ("tokenizer.json", "gen_config.json"),
        "tokenizer and special ids",
        patterns=("tokenizer.json", "gen_config.json"),
    ),
    OfficialFolder(
        "HeartMuLa/HeartMuLa-oss-3B-happy-new-year",
        "HeartMuLa-oss-3B",
        ("config.json",),
        "the language model (3B)",
    ),
    OfficialFolder(
        "HeartMuLa/HeartCodec-oss-20260123", "HeartCodec-oss", ("config.json",), "codec decoder"
    ),
    OfficialFolder(
        "HeartMuLa/HeartCodec-oss-encoder",
        "HeartCodec-oss-encoder",
        ("encoder_config.json", "encoder.safetensors"),
        "codec encoder (extend from uploads)",
    ),
    OfficialFolder(
        "HeartMuLa/HeartTranscriptor-oss",
        "HeartTranscriptor-oss",
        ("config.json",),
        "lyrics transcriber",
    ),
)

# (repo_id, local_dir, allow_patterns) → None; huggingface_hub.snapshot_download in production
Fetch = Callable[[str, Path, list[str] | None], object]


class DownloadError(RuntimeError):
    """A download or layout check that failed; the message is one line for the user."""


def hub_fetch(repo_id: str, local_dir: Path, patterns: list[str] | None) -> object:
    """Fetch one repository with huggingface_hub (resumable; finished files are skipped)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns)


def missing_files(folder: Path, spec: OfficialFolder) -> list[str]:
    """What the loaders need and the folder lacks: named files, and the shards of the index."""
    missing = [name for name in spec.needs if not (folder / name).is_file()]
    if spec.has_shards:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            missing += sorted(name for name in shards if not (folder / name).is_file())
        elif not any(folder.glob("*.safetensors")):
            missing.append("*.safetensors")
    return missing


def download_models(
    model_dir: Path,
    folders: Iterable[OfficialFolder] = OFFICIAL,
    fetch: Fetch = hub_fetch,
    report: Callable[[str], None] = print,
) -> None:
    """Download every folder, then check each; DownloadError names the first failure."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for spec in folders:
        target = model_dir / spec.folder
        report(f"{spec.repo_id} → {target} ({spec.what})")
        try:
            fetch(spec.repo_id, target, list(spec.patterns) if spec.patterns else None)
        except Exception as error:  # noqa: BLE001 (network, auth, disk: all end the command)
            reason = " ".join(str(error).split())  # hub errors span lines; the user gets one
            raise DownloadError(
                f"downloading {spec.repo_id} failed ({type(error).__name__}: {reason}); "
                "run the command again to resume"
            ) from error
        missing = missing_files(target, spec)
        if missing:
            raise DownloadError(
                f"{target} lacks {', '.join(missing)} after downloading {spec.repo_id}"
            )
        files = [f for f in target.glob("*") if f.is_file() and not f.name.startswith(".")]
        if spec.patterns:
            files = [f for f in files if f.name in spec.patterns]
        size = sum(f.stat().st_size for f in files)
        report(f"  ok: {len(files)} files, {size / 1e9:.2f} GB")
