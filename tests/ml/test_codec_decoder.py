"""HeartCodec decoder on a tiny codec: windows, in-context prefix, crossfade, seeds, abort,
progress, checkpoint loading (official names, errors) and the decode CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from api.client.cli import main as cli_main
from shared.core.audio import read_audio
from shared.core.constants import CODEC_CODES, SAMPLE_RATE, SAMPLES_PER_FRAME
from shared.core.progress import Aborted
from shared.ml.codec.config import HeartCodecConfig
from shared.ml.codec.decoder import (
    CODEC_FOLDER,
    PREFIX_LATENT_FRAMES,
    HeartCodec,
    HeartCodecDecoder,
    load_codec,
    plan_windows,
)
from shared.ml.models.checkpoint import INDEX_NAME, CheckpointError
from tests.support.reference import official_shapes

OVERLAP_SAMPLES = 199_680  # 4.16 s at 48 kHz
STEPS = 2  # enough to exercise the solver; tests stay fast


def _codes(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEC_CODES, (8, frames), dtype=np.int64)


@pytest.fixture(scope="module")
def decoder(tiny_model_dir: Path) -> HeartCodecDecoder:
    return load_codec(tiny_model_dir, device="cpu")


def _copy_folder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_model_dir / CODEC_FOLDER, tmp_path / CODEC_FOLDER)
    return tmp_path / CODEC_FOLDER


def _edit_tensor(folder: Path, key: str, value: torch.Tensor | None) -> None:
    """Replace (or with None, delete) one tensor in whichever shard holds it."""
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(str(shard))
    if value is None:
        del tensors[key]
        del index["weight_map"][key]
        (folder / INDEX_NAME).write_text(json.dumps(index))
    else:
        tensors[key] = value
    save_file(tensors, str(shard))


# ----- window arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "windows"),
    [(1, 1), (63, 1), (372, 1), (373, 2), (424, 2), (692, 2), (693, 3), (1500, 5), (3000, 10)],
)
def test_window_count_follows_the_reference(codes: int, windows: int) -> None:
    # 424 = 104 + 320: the reference's padding test compares against 104 (the overlap in
    # latent frames) instead of 52 codes and decodes only one window there, so its audio
    # ends 4.16 s short; here every code is covered.
    plan = plan_windows(codes)
    assert len(plan) == windows
    assert [w.start for w in plan] == [320 * i for i in range(windows)]
    assert all(w.codes == 372 for w in plan)
    assert plan[-1].stop >= codes


@pytest.mark.parametrize("codes", [63, 372, 400, 1500])
def test_windows_without_loop_padding_stop_at_the_last_code(codes: int) -> None:
    plan = plan_windows(codes, loop_padding=False)
    assert len(plan) == len(plan_windows(codes))
    assert plan[-1].stop == codes
    # Overlaps of 52 codes: the windows' audio, crossfaded, is exactly the input's length.
    assert sum(w.codes for w in plan) - 52 * (len(plan) - 1) == codes
    assert all(w.codes * 2 > PREFIX_LATENT_FRAMES for w in plan[1:])


def test_no_codes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one code frame"):
        plan_windows(0)


@pytest.mark.parametrize(("frames", "loop_padding"), [(400, True), (63, False)])
def test_output_is_stereo_float32_of_t_frames(
    decoder: HeartCodecDecoder, frames: int, loop_padding: bool
) -> None:
    audio = decoder.detokenize(_codes(frames), steps=STEPS, loop_padding=loop_padding)
    assert audio.dtype == torch.float32 and audio.shape == (2, frames * SAMPLES_PER_FRAME)
    assert torch.isfinite(audio).all() and audio.abs().max() > 0
    assert decoder.sample_rate == SAMPLE_RATE and decoder.frame_samples == SAMPLES_PER_FRAME


def test_later_windows_start_with_the_previous_windows_last_104_latent_frames(
    decoder: HeartCodecDecoder,
) -> None:
    windows = list(decoder.latent_windows(_codes(700), steps=STEPS))
    assert len(windows) == 3 and PREFIX_LATENT_FRAMES == 104
    for (_, before), (_, after) in zip(windows, windows[1:], strict=False):
        assert after.shape == before.shape == (744, 16)
        assert torch.equal(after[:104], before[-104:])
        assert not torch.equal(after[104:208], before[-104:])


@pytest.fixture
def constant_render(decoder: HeartCodecDecoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the (slow on CPU) scalar decoder: window i renders the constant i + 1."""
    rendered: list[int] = []

    def render(latents: torch.Tensor) -> np.ndarray:
        rendered.append(len(rendered))
        return np.full(
            (2, latents.shape[0] * decoder.config.hop_length),
            float(len(rendered)),
            dtype=np.float32,
        )

    monkeypatch.setattr(decoder, "render", render)
    return rendered


def test_windows_are_joined_with_a_linear_crossfade_over_4_16_s(
    decoder: HeartCodecDecoder, constant_render: list[int]
) -> None:
    audio = decoder.detokenize(_codes(400), steps=1).numpy()
    assert constant_render == [0, 1] and audio.shape == (2, 400 * SAMPLES_PER_FRAME)
    start = 320 * SAMPLES_PER_FRAME  # the second window starts 25.6 s in
    assert (audio[:, :start] == 1).all() and (audio[:, start + OVERLAP_SAMPLES :] == 2).all()
    ramp = audio[0, start : start + OVERLAP_SAMPLES]
    np.testing.assert_allclose(ramp, 1 + np.linspace(0, 1, OVERLAP_SAMPLES), atol=1e-6)


# ----- seeds, abort, progress ---------------------------------------------------------------


def test_same_seed_same_audio_other_seed_other_audio(decoder: HeartCodecDecoder) -> None:
    codes = _codes(50)
    first = decoder.detokenize(codes, steps=STEPS, seed=7, loop_padding=False)
    torch.manual_seed(123)  # the global RNG must not matter
    again = decoder.detokenize(torch.from_numpy(codes), steps=STEPS, seed=7, loop_padding=False)
    other = decoder.detokenize(codes, steps=STEPS, seed=8, loop_padding=False)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_guidance_changes_the_result(decoder: HeartCodecDecoder) -> None:
    codes = _codes(30)
    plain = decoder.detokenize(codes, steps=STEPS, guidance=1.0, loop_padding=False)
    guided = decoder.detokenize(codes, steps=STEPS, guidance=2.0, loop_padding=False)
    assert plain.shape == guided.shape and not torch.equal(plain, guided)


def test_progress_reaches_one_per_window_and_step(
    decoder: HeartCodecDecoder, constant_render: list[int]
) -> None:
    reports: list[tuple[str, float]] = []
    decoder.detokenize(_codes(400), steps=3, on_progress=lambda *r: reports.append(r))
    seen = [fraction for _, fraction in reports]
    assert {stage for stage, _ in reports} == {"decoding"}
    assert len(seen) == 2 * (3 + 1)  # two windows: three steps and one render each
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_abort_stops_between_steps(
    decoder: HeartCodecDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    calls = 0
    estimator = decoder.model.flow_matching.estimator
    original = estimator.forward

    def counting(*args: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(*args)

    monkeypatch.setattr(estimator, "forward", counting)
    with pytest.raises(Aborted, match="after 3 of"):
        decoder.detokenize(
            _codes(400),
            steps=5,
            on_progress=lambda _stage, fraction: seen.append(fraction),
            should_abort=lambda: len(seen) >= 3,
        )
    assert calls == 3 and len(seen) == 3 and seen[-1] < 1.0


def test_codes_outside_the_codebook_are_refused(decoder: HeartCodecDecoder) -> None:
    codes = _codes(20)
    codes[3, 5] = CODEC_CODES
    with pytest.raises(ValueError, match=rf"codebook 3 frame 5 holds {CODEC_CODES}"):
        decoder.detokenize(codes)
    with pytest.raises(ValueError, match=r"must be \[8, T\]"):
        decoder.detokenize(_codes(20)[:7])
    with pytest.raises(ValueError, match="integers"):
        decoder.detokenize(_codes(20).astype(np.float32))


def test_frames_outside_the_mask_get_zero_cond_embedding(decoder: HeartCodecDecoder) -> None:
    flow = decoder.model.flow_matching
    codes = torch.from_numpy(_codes(10))[None]
    full = flow.condition(codes)
    masked = flow.condition(codes, valid_frames=12)
    assert full.shape == (1, 20, 32)
    assert torch.equal(masked[:, :12], full[:, :12])
    assert torch.equal(masked[0, 12:], flow.zero_cond_embedding1.expand(8, -1))
    assert torch.equal(full[:, 0::2], full[:, 1::2])  # nearest ×2 upsampling


def test_euler_solver_applies_guidance_and_keeps_the_prefix(
    decoder: HeartCodecDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = decoder.model.flow_matching
    latent = flow.latent_dim

    def velocity(inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The first channels of the condition block: zero in the unconditional rows.
        return inputs[..., 2 * latent : 3 * latent]

    monkeypatch.setattr(flow.estimator, "forward", velocity)
    cond, noise, prefix = torch.randn(1, 40, 32), torch.randn(1, 40, latent), torch.randn(1, 8, 16)
    out = flow.solve(cond, noise, prefix, steps=4, guidance=1.5)
    assert torch.equal(out[:, :8], prefix)
    # Constant velocity 1.5 · cond over t = 0 → 1 (the unconditional branch sees zeros).
    torch.testing.assert_close(out[:, 8:], noise[:, 8:] + 1.5 * cond[:, 8:, :latent])


def test_rope_rotates_interleaved_pairs() -> None:
    from shared.ml.codec.estimator import apply_rope, rope_tables

    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope_tables(5, 8, torch.device("cpu"))
    as_complex = torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
    expected = torch.view_as_real(as_complex * torch.complex(cos, sin))
    torch.testing.assert_close(apply_rope(x, cos, sin), expected.flatten(-2))


def test_scalar_codec_hop_is_1920_both_ways(decoder: HeartCodecDecoder) -> None:
    scalar = decoder.model.scalar_model
    latents = scalar.encode(torch.randn(2, 1, 1920 * 10))
    assert latents.shape == (2, 8, 10) and latents.abs().max() < 1
    assert scalar.decode(latents).shape == (2, 1, 1920 * 10)


# ----- checkpoints --------------------------------------------------------------------------


def test_official_config_builds_every_official_tensor_name_and_shape() -> None:
    with torch.device("meta"):
        model = HeartCodec(HeartCodecConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes("heartcodec_keys.txt")


def test_tiny_folder_uses_official_names_and_loads_the_written_weights(
    tiny_model_dir: Path, decoder: HeartCodecDecoder
) -> None:
    folder = tiny_model_dir / CODEC_FOLDER
    assert len(list(folder.glob("model-*-of-00002.safetensors"))) == 2
    stored = {}
    for shard in folder.glob("*.safetensors"):
        stored.update(load_file(str(shard)))
    assert set(stored) <= set(official_shapes("heartcodec_keys.txt"))
    assert stored["flow_matching.vq_embed.layers.0._codebook.initted"].shape == ()
    state = decoder.model.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    assert decoder.dtype == torch.float32


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path / CODEC_FOLDER}"):
        load_codec(tmp_path, device="cpu")


def test_missing_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "scalar_model.decoder.3.convs.2.conv1.parametrizations.weight.original1"
    _edit_tensor(_copy_folder(tiny_model_dir, tmp_path), key, None)
    with pytest.raises(CheckpointError, match=f"missing tensor.*{key}"):
        load_codec(tmp_path, device="cpu")


def test_misshaped_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "flow_matching.estimator.transformer_blocks.1.attn.q_proj.weight"
    _edit_tensor(_copy_folder(tiny_model_dir, tmp_path), key, torch.zeros(32, 31))
    with pytest.raises(CheckpointError, match=f"{key} has shape \\(32, 31\\)"):
        load_codec(tmp_path, device="cpu")


def test_initted_stored_with_shape_1_loads(
    tiny_model_dir: Path, tmp_path: Path, decoder: HeartCodecDecoder
) -> None:
    folder = _copy_folder(tiny_model_dir, tmp_path)
    for k in range(8):
        key = f"flow_matching.vq_embed.layers.{k}._codebook.initted"
        _edit_tensor(folder, key, torch.ones(1, dtype=torch.bool))
    loaded = load_codec(tmp_path, device="cpu")
    assert loaded.rvq.layers[0]._codebook.initted.shape == ()
    codes = _codes(10)
    assert torch.equal(
        loaded.detokenize(codes, steps=1, loop_padding=False),
        decoder.detokenize(codes, steps=1, loop_padding=False),
    )


def test_other_dtype_on_request(tiny_model_dir: Path) -> None:
    assert load_codec(tiny_model_dir, device="cpu", dtype="bf16").dtype == torch.bfloat16


# ----- CLI ----------------------------------------------------------------------------------


def test_cli_decode_writes_flac_of_the_tokens_duration(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    np.save(tmp_path / "tokens.npy", _codes(25).astype(np.int16))
    out = tmp_path / "song.flac"
    args = ["decode", str(tmp_path / "tokens.npy"), "--out", str(out), "--steps", "2"]
    assert cli_main([*args, "--model-dir", str(tiny_model_dir), "--device", "cpu"]) == 0
    audio, rate = read_audio(out)
    assert rate == SAMPLE_RATE and audio.shape == (2, 25 * SAMPLES_PER_FRAME)


def test_cli_decode_refuses_unknown_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "tokens.npy", _codes(5))
    args = ["decode", str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "x.ogg")]
    assert cli_main([*args, "--model-dir", str(tiny_model_dir)]) == 2


def test_cli_generate_writes_audio_and_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, tokens = tmp_path / "song.wav", tmp_path / "tokens.npy"
    args = ["generate", "--model-dir", str(tiny_model_dir), "--tags", "piano", "--duration", "0.5"]
    args += ["--device", "cpu", "--out", str(out), "--tokens-out", str(tokens), "--steps", "1"]
    args += ["--no-loop-padding"]
    assert cli_main(args) == 0
    frames = np.load(tokens).shape[1]
    audio, rate = read_audio(out)
    assert rate == SAMPLE_RATE and audio.shape == (2, frames * SAMPLES_PER_FRAME) and frames > 0
