"""HeartMuLa's frame grid and token space, defined once for the whole tree (torch-free).

The language model writes one frame of NUM_CODEBOOKS codes every FRAME_MS; the codec turns a
frame into FRAME_MS of audio. Every module that converts between seconds, frames, samples and
token ids imports these names; none restates a number.
"""

from __future__ import annotations

# ----- the frame grid -------------------------------------------------------------------------
FRAME_MS = 80  # one frame of codes
FRAME_S = FRAME_MS / 1000  # 0.08
FRAMES_PER_SECOND = 1000 / FRAME_MS  # 12.5
NUM_CODEBOOKS = 8  # codes per frame: codebook 0 from the backbone, 1-7 from the local decoder

# ----- audio -------------------------------------------------------------------------------
SAMPLE_RATE = 48_000  # what songs are delivered at (stereo)
CODEC_SAMPLE_RATE = 24_000  # what the codec's encoder reads
SAMPLES_PER_FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 3840: one frame of delivered audio
CODEC_SAMPLES_PER_FRAME = CODEC_SAMPLE_RATE * FRAME_MS // 1000  # 1920: one frame at 24 kHz
WHISPER_SAMPLE_RATE = 16_000  # what Whisper-family models read (transcriber, codec features)

# ----- the token space of one codebook ------------------------------------------------------
CODEC_CODES = 8192  # real codec codes are 0..8191
AUDIO_EOS_ID = 8193  # the backbone's end-of-song token (in codebook 0)
AUDIO_VOCAB = 8197  # the model's per-codebook vocabulary: codes plus special ids 8192..8196

# ----- the language model -------------------------------------------------------------------
CONTEXT_POSITIONS = 8192  # HeartMuLa's context: prompt rows plus song frames
MIN_PROMPT_ROWS = 6  # BOS <tags> EOS, the muq slot, BOS EOS: the shortest possible prompt


def frames_for_seconds(seconds: float) -> int:
    """Whole frames in `seconds`, rounding to the nearest millisecond first (30.0 s → 375)."""
    return round(seconds * 1000) // FRAME_MS
