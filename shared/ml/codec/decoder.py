"""HeartCodec decoder: codes [8, T] at 12.5 Hz → 48 kHz stereo audio [2, T · 3840].

Long inputs are decoded in 29.76 s windows (372 codes) every 25.6 s (320 codes). Each later
window starts with the previous window's last 104 latent frames (4.16 s) as known
in-context latents, and the windows' audio is joined with a linear crossfade over those
4.16 s (199680 samples). Like the reference, inputs are padded by looping their own codes up
to whole windows (so a 5 s clip costs a full 29.76 s window); `loop_padding=False` decodes
only the real codes instead (cheaper; see `plan_windows`). The output is cut to T · 3840.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from shared.core.audio import overlap_add
from shared.core.progress import AbortCheck, Progress, check_abort
from shared.ml.codec.config import LATENT_FRAMES_PER_CODE, HeartCodecConfig
from shared.ml.codec.flow_matching import FlowMatching
from shared.ml.codec.rvq import ResidualVQ, normalize_initted
from shared.ml.codec.scalar import ScalarModel
from shared.ml.models.checkpoint import (
    CheckpointError,
    assign_state,
    read_tensors,
    resolve_device,
    resolve_dtype,
    shard_files,
)

CODEC_FOLDER = "HeartCodec-oss"
WINDOW_CODES = 372  # int(29.76 s × 12.5 codes/s)
HOP_CODES = 320  # 25.6 s
OVERLAP_CODES = WINDOW_CODES - HOP_CODES  # 52 codes = 4.16 s
PREFIX_LATENT_FRAMES = OVERLAP_CODES * LATENT_FRAMES_PER_CODE  # 104, carried into the next window


@dataclass(frozen=True)
class Window:
    """Codes [start, stop) of the (loop-padded) code sequence decoded as one window."""

    start: int
    stop: int

    @property
    def codes(self) -> int:
        return self.stop - self.start


def plan_windows(num_codes: int, loop_padding: bool = True) -> list[Window]:
    """The windows that decode `num_codes` codes: one per 320-code hop, at least one.

    With `loop_padding` (the reference behaviour) every window is 372 codes long, the
    sequence being continued by repeating itself; without it, windows stop at the last real
    code, so a short clip is one window of its own length and a song's last window is short.
    Either way the windows cover all codes and overlap by 52 codes.
    """
    if num_codes < 1:
        raise ValueError(f"need at least one code frame, got {num_codes}")
    count = max(1, math.ceil((num_codes - OVERLAP_CODES) / HOP_CODES))
    windows = []
    for i in range(count):
        start = i * HOP_CODES
        stop = start + WINDOW_CODES
        windows.append(Window(start, stop if loop_padding else min(stop, num_codes)))
    return windows


class Cursor:
    """Where one song's decode stands: its next window, its noise, its in-context prefix.

    Windows of several songs can be solved in one estimator batch (`solve_windows`); each
    song keeps its own noise generator, so its latents do not depend on its batch mates.
    """

    def __init__(
        self, decoder: HeartCodecDecoder, codes: torch.Tensor, seed: int, loop_padding: bool
    ) -> None:
        self.decoder = decoder
        self.num_codes = codes.shape[1]
        self.windows = plan_windows(self.num_codes, loop_padding)
        looped = torch.arange(self.windows[-1].stop) % self.num_codes
        self.codes = codes[:, looped].to(decoder.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.prefix: torch.Tensor | None = None  # [1, 104, latent] once a window is done
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index == len(self.windows)

    @property
    def window(self) -> Window:
        return self.windows[self.index]

    @property
    def batch_key(self) -> tuple[int, bool]:
        """Next windows with equal keys solve together: same length, all or none a prefix."""
        return self.window.codes, self.prefix is not None

    def next_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition [1, F, dim] and noise [1, F, latent] (CPU) of the next window."""
        flow = self.decoder.model.flow_matching
        window = self.window
        cond = flow.condition(self.codes[None, :, window.start : window.stop])
        noise = torch.randn(cond.shape[:2] + (flow.latent_dim,), generator=self.generator)
        return cond, noise

    def advance(self, latents: torch.Tensor) -> None:
        """Record the solved window's latents [F, latent]: its tail is the next prefix."""
        self.prefix = latents[None, -PREFIX_LATENT_FRAMES:]
        self.index += 1


class HeartCodec(nn.Module):
    """The checkpoint's module tree: `flow_matching.*` and `scalar_model.*`."""

    def __init__(self, config: HeartCodecConfig) -> None:
        super().__init__()
        self.config = config
        self.flow_matching = FlowMatching(config)
        self.scalar_model = ScalarModel(config)


class HeartCodecDecoder:
    """Detokenizes codes with a loaded HeartCodec; one instance serves many requests."""

    def __init__(self, model: HeartCodec) -> None:
        self.model = model
        self.config = model.config
        self.sample_rate = model.config.sample_rate
        self.frame_samples = LATENT_FRAMES_PER_CODE * model.config.hop_length

    @property
    def rvq(self) -> ResidualVQ:
        return self.model.flow_matching.vq_embed

    @property
    def device(self) -> torch.device:
        return self.model.flow_matching.zero_cond_embedding1.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.flow_matching.zero_cond_embedding1.dtype

    def _check_codes(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        books, size = self.config.num_quantizers, self.config.codebook_size
        if codes.ndim != 2 or codes.shape[0] != books:
            raise ValueError(f"codes must be [{books}, T], got shape {list(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.shape[1] == 0:
            raise ValueError("codes hold no frames")
        bad = (codes < 0) | (codes >= size)
        if bad.any():
            book, frame = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"codes must lie in [0, {size}); codebook {book} frame {frame} holds "
                f"{int(codes[book, frame])} ({int(bad.sum())} bad values)"
            )
        return codes.long()

    def cursor(self, codes: np.ndarray | torch.Tensor, seed: int, loop_padding: bool) -> Cursor:
        """One song's decode, window by window (see `Cursor`)."""
        return Cursor(self, self._check_codes(codes), seed, loop_padding)

    @torch.inference_mode()
    def solve_windows(
        self,
        cursors: list[Cursor],
        *,
        steps: int = 10,
        guidance: float = 1.25,
        on_step: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """The next window of every cursor in one estimator batch; each cursor advances.

        The cursors' next windows must have the same length and all or none a prefix (their
        `batch_key`). Returns each window's latents [2·codes, out_channels].
        """
        keys = {c.batch_key for c in cursors}
        if len(keys) != 1:
            raise ValueError(f"windows of one batch must share length and prefix, got {keys}")
        inputs = [c.next_inputs() for c in cursors]
        prefixes = [c.prefix for c in cursors]
        latents = self.model.flow_matching.solve(
            torch.cat([cond for cond, _ in inputs]),
            torch.cat([noise for _, noise in inputs]).to(self.device, self.dtype),
            None if prefixes[0] is None else torch.cat(prefixes),
            steps=steps,
            guidance=guidance,
            on_step=on_step,
        )
        for cursor, window_latents in zip(cursors, latents, strict=True):
            cursor.advance(window_latents)
        return list(latents)

    @torch.inference_mode()
    def latent_windows(
        self,
        codes: np.ndarray | torch.Tensor,
        *,
        steps: int = 10,
        guidance: float = 1.25,
        seed: int = 0,
        loop_padding: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[Window, torch.Tensor]]:
        """Yield (window, latents [2·codes, out_channels]) window by window, in order.

        Each later window's first 104 latent frames are the previous window's last 104.
        Noise comes from a private generator seeded with `seed` (on CPU, so a seed gives
        the same noise on every device).
        """
        cursor = self.cursor(codes, seed, loop_padding)
        while not cursor.done:
            window = cursor.window
            (latents,) = self.solve_windows(
                [cursor], steps=steps, guidance=guidance, on_step=on_step
            )
            yield window, latents

    def render(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [F, 2·latent_hidden_dim] → float32 audio [2, F · hop] (first half: left)."""
        half = self.config.latent_hidden_dim
        stereo = latents.view(latents.shape[0], 2, half).permute(1, 2, 0)
        return self.model.scalar_model.decode(stereo)[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def detokenize(
        self,
        codes: np.ndarray | torch.Tensor,
        *,
        steps: int = 10,
        guidance: float = 1.25,
        seed: int = 0,
        loop_padding: bool = True,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> torch.Tensor:
        """Codes [8, T] (ints in [0, 8192)) → float32 audio [2, T · 3840] at 48 kHz.

        Progress ("decoding") counts solver steps and per-window audio rendering and reaches
        1.0 at the end; should_abort is polled before every step and render and raises
        Aborted.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        codes = self._check_codes(codes)
        windows = len(plan_windows(codes.shape[1], loop_padding))
        units, done = windows * (steps + 1), 0

        def advance(_: int = 0) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress("decoding", done / units)
            if done < units:
                check_abort(should_abort, f"decode aborted after {done} of {units} steps")

        segments = []
        check_abort(should_abort, f"decode aborted after 0 of {units} steps")
        with parametrize.cached():
            for _, latents in self.latent_windows(
                codes,
                steps=steps,
                guidance=guidance,
                seed=seed,
                loop_padding=loop_padding,
                on_step=advance,
            ):
                segments.append(self.render(latents))
                advance()
        return self.join(segments, codes.shape[1])

    def join(self, segments: list[np.ndarray], num_codes: int) -> torch.Tensor:
        """Rendered windows → one song's audio [2, num_codes · 3840] (crossfaded, cut)."""
        audio = overlap_add(segments, OVERLAP_CODES * self.frame_samples)
        return torch.from_numpy(audio[:, : num_codes * self.frame_samples].copy())


def load_codec(
    model_dir: Path | str, device: str | None = None, dtype: str | None = None
) -> HeartCodecDecoder:
    """Load `model_dir/HeartCodec-oss/` (config.json + safetensors shards) unchanged.

    fp32 unless another dtype (bf16, fp16) is asked for: the reference decodes in fp32.
    """
    folder = Path(model_dir) / CODEC_FOLDER
    if not folder.is_dir():
        raise CheckpointError(
            f"HeartCodec decoder folder not found: {folder} "
            "(expected config.json and model-*.safetensors from HeartCodec-oss)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"HeartCodec config not found: {config_path}")
    config = HeartCodecConfig.from_dict(json.loads(config_path.read_text()))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev) if dtype else torch.float32
    with torch.device("meta"):
        model = HeartCodec(config)
    tensors = read_tensors(shard_files(folder), dev, torch_dtype)
    normalize_initted(tensors)
    assign_state(model, tensors, folder)
    return HeartCodecDecoder(model.eval().requires_grad_(False))
