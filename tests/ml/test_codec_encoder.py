"""HeartCodec encoder on a tiny checkpoint (CPU): frame counts, channels, chunking, loading."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from api.client.cli import main
from shared.core.constants import CODEC_CODES, CODEC_SAMPLE_RATE, FRAMES_PER_SECOND
from shared.core.progress import Aborted
from shared.ml.codec.encoder import (
    CHUNK_SAMPLES,
    CODEC_FOLDER,
    DEFAULT_ENCODER_CONFIG,
    ENCODER_FOLDER,
    FRAMES_PER_CHUNK,
    RVQ_PREFIX,
    WEIGHTS_NAME,
    EncoderNotFoundError,
    HeartCodecEncoder,
    HeartCodecEncoderNetwork,
    load_encoder,
)
from shared.ml.codec.rvq import ResidualVQ
from shared.ml.codec.tiny import write_tiny_encoder
from shared.ml.models.checkpoint import CheckpointError, write_shards

LATENT_DIM = 32


def write_codec_rvq(model_dir: Path, dim: int = LATENT_DIM, seed: int = 0) -> None:
    """Stand-in for the tiny codec: a HeartCodec-oss/ holding only the RVQ tensors (official
    names, `initted` stored as [1] like the published decoder), codes N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = ResidualVQ(dim=dim, codebook_dim=8).state_dict()
    tensors = {}
    for key, value in state.items():
        if key.endswith("initted"):
            value = value.reshape(1)
        elif value.is_floating_point():
            scale = value.shape[-1] ** -0.5 if key.endswith("weight") else 1.0
            value = torch.randn(value.shape, generator=generator) * scale
        tensors[RVQ_PREFIX + key] = value
    write_shards(tensors, model_dir / CODEC_FOLDER, num_shards=2)


def noise(seconds: float, rate: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((channels, round(seconds * rate))).astype(np.float32) * 0.1
    audio[:, audio.shape[1] // 2 :] *= 4  # a louder second half, so frames differ
    return audio


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_codec_rvq(path)
    write_tiny_encoder(path, seed=0)
    return path


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> HeartCodecEncoder:
    return load_encoder(model_dir, device="cpu")


@pytest.mark.parametrize(
    ("seconds", "rate"),
    [(1.0, 16_000), (7.3, 44_100), (31.0, 48_000), (29.76, 24_000), (0.01, 22_050)],
)
def test_frame_count_for_durations_and_rates(
    encoder: HeartCodecEncoder, seconds: float, rate: int
) -> None:
    tokens = encoder.tokenize(noise(seconds, rate), rate)
    assert tokens.dtype == np.int32
    assert tokens.shape == (8, int(seconds * FRAMES_PER_SECOND) + 1)
    assert tokens.min() >= 0 and tokens.max() < CODEC_CODES


def test_tokens_follow_the_audio(encoder: HeartCodecEncoder) -> None:
    a = encoder.tokenize(noise(5.0, 24_000, seed=1), 24_000)
    b = encoder.tokenize(noise(5.0, 24_000, seed=2), 24_000)
    assert len(np.unique(a[0])) > 1
    assert (a != b).any()


def test_mono_is_duplicated_to_stereo(encoder: HeartCodecEncoder) -> None:
    mono = noise(3.0, 16_000, channels=1)
    stereo = np.repeat(mono, 2, axis=0)
    expected = encoder.tokenize(stereo, 16_000)
    np.testing.assert_array_equal(encoder.tokenize(mono, 16_000), expected)
    np.testing.assert_array_equal(encoder.tokenize(torch.from_numpy(mono[0]), 16_000), expected)


def test_deterministic_across_calls_and_loads(model_dir: Path, encoder: HeartCodecEncoder) -> None:
    audio = noise(4.0, 44_100)
    first = encoder.tokenize(audio, 44_100)
    np.testing.assert_array_equal(encoder.tokenize(audio, 44_100), first)
    np.testing.assert_array_equal(load_encoder(model_dir, "cpu").tokenize(audio, 44_100), first)


def test_chunks_are_independent_of_batching(encoder: HeartCodecEncoder) -> None:
    audio = noise(31.0, CODEC_SAMPLE_RATE)  # two chunks
    calls: list[tuple[str, float]] = []

    def record(stage: str, fraction: float) -> None:
        calls.append((stage, fraction))

    one = encoder.tokenize(audio, CODEC_SAMPLE_RATE, batch_size=1, on_progress=record)
    assert calls == [("encoding", 1 / 2), ("encoding", 2 / 2)]
    np.testing.assert_array_equal(encoder.tokenize(audio, CODEC_SAMPLE_RATE, batch_size=2), one)
    # The first 29.76 s alone (373 frames: one more, from a second chunk of silence) encode
    # to the whole song's first chunk of frames.
    head = encoder.tokenize(audio[:, :CHUNK_SAMPLES], CODEC_SAMPLE_RATE)
    assert head.shape[1] == FRAMES_PER_CHUNK + 1
    np.testing.assert_array_equal(head[:, :FRAMES_PER_CHUNK], one[:, :FRAMES_PER_CHUNK])


def test_abort_between_chunks(encoder: HeartCodecEncoder) -> None:
    checks = iter([False, True])
    audio = noise(31.0, 24_000)
    with pytest.raises(Aborted, match="after 1 of 2"):
        encoder.tokenize(audio, 24_000, batch_size=1, should_abort=lambda: next(checks))


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros((3, 1000), np.float32), 24_000, "1 or 2 channels"),
        (np.zeros((2, 0), np.float32), 24_000, "empty"),
        (np.full((2, 1000), np.nan, np.float32), 24_000, "NaN"),
        (np.zeros((2, 1000), np.float32), 0, "sample_rate"),
        (np.zeros((2, 1000), np.float32), 44.1, "sample_rate"),
    ],
)
def test_bad_audio_is_a_clear_error(
    encoder: HeartCodecEncoder, audio: np.ndarray, rate: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encoder.tokenize(audio, rate)


def test_official_layout_and_tensor_count(model_dir: Path) -> None:
    names = set(load_file(str(model_dir / ENCODER_FOLDER / WEIGHTS_NAME)))
    assert all(name.startswith("encoder.") for name in names)
    for name in (
        "encoder.query.cls_token",
        "encoder.query.encoder_transformers.0.self_attn.to_qkv.parametrizations.weight.original1",
        "encoder.query.encoder_transformers.0.ff.ff.2.parametrizations.weight.original0",
        "encoder.feature_extractors.whisper_encoder.conv1.weight",
        "encoder.feature_extractors.wavlm_encoder.encoder.layers.0.attention.rel_attn_embed.weight",
        "encoder.feature_extractors.muencoder.preprocessor_melspec_2048.mel_stft.mel_scale.fb",
        "encoder.feature_extractors.muencoder.conv.conv.1.bn3.running_var",
        "encoder.feature_extractors.muencoder.conformer.layers.10.conv_module.batch_norm.weight",
    ):
        assert name in names
    # The released file holds 1006 tensors; the full-size architecture must expect exactly those.
    with torch.device("meta"):
        full = HeartCodecEncoderNetwork(DEFAULT_ENCODER_CONFIG)
    assert len(full.state_dict()) == 1006


def _copy_models(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(model_dir, target)
    return target


def _edit_encoder_file(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    path = model_dir / ENCODER_FOLDER / WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_encoder_tensor_is_named(model_dir: Path, tmp_path: Path) -> None:
    copy = _copy_models(model_dir, tmp_path)
    _edit_encoder_file(copy, lambda t: t.pop("encoder.query.feature_proj.weight"))
    with pytest.raises(CheckpointError, match=r"encoder\.query\.feature_proj\.weight"):
        load_encoder(copy, "cpu")


def test_missing_rvq_tensor_is_named(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    write_codec_rvq(copy)
    shutil.copytree(model_dir / ENCODER_FOLDER, copy / ENCODER_FOLDER)
    codec = copy / CODEC_FOLDER
    for shard in codec.glob("*.safetensors"):
        tensors = load_file(str(shard))
        tensors.pop(RVQ_PREFIX + "layers.3._codebook.embed", None)
        save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"flow_matching\.vq_embed\.layers\.3\._codebook"):
        load_encoder(copy, "cpu")


def test_legacy_weight_norm_names_load(
    model_dir: Path, encoder: HeartCodecEncoder, tmp_path: Path
) -> None:
    def to_legacy(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if ".parametrizations.weight.original" in k]:
            suffix = "weight_g" if key.endswith("original0") else "weight_v"
            tensors[key.split("parametrizations.")[0] + suffix] = tensors.pop(key)

    copy = _copy_models(model_dir, tmp_path)
    _edit_encoder_file(copy, to_legacy)
    audio = noise(2.0, 24_000)
    np.testing.assert_array_equal(
        load_encoder(copy, "cpu").tokenize(audio, 24_000), encoder.tokenize(audio, 24_000)
    )


def test_missing_encoder_folder_names_it(tmp_path: Path) -> None:
    write_codec_rvq(tmp_path)
    with pytest.raises(EncoderNotFoundError, match=ENCODER_FOLDER) as error:
        load_encoder(tmp_path, "cpu")
    assert isinstance(error.value, CheckpointError)


def test_missing_codec_folder_names_it(model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(model_dir / ENCODER_FOLDER, tmp_path / ENCODER_FOLDER)
    with pytest.raises(CheckpointError, match=CODEC_FOLDER):
        load_encoder(tmp_path, "cpu")
    with pytest.raises(CheckpointError, match=CODEC_FOLDER):
        write_tiny_encoder(tmp_path / "empty")


def test_encoder_and_codec_must_match(model_dir: Path, tmp_path: Path) -> None:
    write_codec_rvq(tmp_path, dim=2 * LATENT_DIM)
    shutil.copytree(model_dir / ENCODER_FOLDER, tmp_path / ENCODER_FOLDER)
    with pytest.raises(CheckpointError, match="do not match"):
        load_encoder(tmp_path, "cpu")


def test_tiny_encoder_is_seeded(model_dir: Path, tmp_path: Path) -> None:
    write_codec_rvq(tmp_path)
    reference = load_file(str(model_dir / ENCODER_FOLDER / WEIGHTS_NAME))

    def written(seed: int) -> dict[str, torch.Tensor]:
        write_tiny_encoder(tmp_path, seed)
        return load_file(str(tmp_path / ENCODER_FOLDER / WEIGHTS_NAME))

    same = written(0)
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    other = written(1)
    assert not torch.equal(other["encoder.query.cls_token"], reference["encoder.query.cls_token"])


def test_cli_encode(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    song = tmp_path / "song.wav"
    soundfile.write(song, noise(2.5, 44_100).T, 44_100)
    out = tmp_path / "tokens.npy"
    assert main(["encode", str(song), "--out", str(out), "--model-dir", str(model_dir)]) == 0
    assert np.load(out).shape == (8, int(2.5 * FRAMES_PER_SECOND) + 1)

    assert main(["encode", str(song), "--out", str(out), "--model-dir", str(tmp_path)]) == 2
    assert ENCODER_FOLDER in capsys.readouterr().err

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    assert main(["encode", str(bad), "--out", str(out), "--model-dir", str(model_dir)]) == 2
    assert "bad.wav" in capsys.readouterr().err
