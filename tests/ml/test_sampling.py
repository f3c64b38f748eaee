"""The token sampler alone: top-k, temperature, guidance, EOS masking and counter-based noise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared.ml.generation.sampling import RowSampling, SamplingParams, TokenSampler, hash32

VOCAB = 16
EOS = 14
INVALID = [15]  # like the codec's reserved ids: never sampled
CPU = torch.device("cpu")
DRAW = SamplingParams(
    cond_row=0,
    uncond_row=0,
    cfg_scale=1.0,
    temperature=1.0,
    top_k=VOCAB,
    seed=7,
    frame=0,
    eos_allowed=True,
)


@pytest.fixture
def sampler() -> TokenSampler:
    return TokenSampler(VOCAB, INVALID, EOS, CPU)


def _one_per_row(draws: list[SamplingParams]) -> list[SamplingParams]:
    """Each draw on its own batch row (row i, unguided)."""
    return [replace(d, cond_row=i, uncond_row=i) for i, d in enumerate(draws)]


def _pick(
    sampler: TokenSampler, logits: torch.Tensor, draws: list[SamplingParams], codebook: int = 0
) -> torch.Tensor:
    rows = RowSampling.batch(draws, logits.shape[0], CPU)
    return sampler.pick(logits, codebook, rows)


def _frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=VOCAB).float() / tokens.numel()


def _spread_logits(rows: int) -> torch.Tensor:
    """Distinct logits 0..13 for the sampleable ids, the same on every row."""
    logits = torch.zeros(rows, VOCAB)
    logits[:, :EOS] = torch.linspace(0.0, 3.0, EOS)
    return logits


def test_rows_are_batched_field_by_field() -> None:
    guided = replace(DRAW, cond_row=2, uncond_row=0, cfg_scale=2.5, top_k=3, seed=2**40, frame=9)
    plain = replace(DRAW, cond_row=1, uncond_row=1, temperature=0.5, eos_allowed=False)
    rows = RowSampling.batch([guided, plain], 4, CPU)
    assert rows.cond.tolist() == [2, 1] and rows.uncond.tolist() == [0, 1]
    assert rows.owner.tolist() == [0, 1, 0, 0]  # row 3 is free: it copies request 0's token
    assert rows.cfg_scale.tolist() == [2.5, 1.0] and rows.temperature.tolist() == [1.0, 0.5]
    assert rows.top_k.tolist() == [3, VOCAB] and rows.max_top_k == VOCAB
    assert rows.seed.tolist() == [2**40, 7] and rows.frame.tolist() == [9, 0]
    assert rows.eos_allowed.tolist() == [True, False]


def test_top_k_one_is_argmax(sampler: TokenSampler) -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB)
    logits[:, INVALID] = -1e9  # keep the argmax among sampleable ids
    draws = _one_per_row([replace(DRAW, top_k=1, seed=s, frame=s * 3) for s in range(64)])
    assert torch.equal(_pick(sampler, logits, draws), logits.argmax(dim=-1))


def test_draws_stay_inside_the_top_k(sampler: TokenSampler) -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB).expand(512, -1).contiguous()
    logits[:, INVALID] = -1e9
    allowed = set(logits[0].topk(4).indices.tolist())
    draws = _one_per_row([replace(DRAW, top_k=4, seed=s) for s in range(512)])
    picked = _pick(sampler, logits, draws)
    assert set(picked.tolist()) == allowed  # every one of the 4 is drawn, nothing else


def test_draws_follow_the_softmax_of_the_scaled_logits(sampler: TokenSampler) -> None:
    """Gumbel-max over hashed noise draws from softmax(logits / T) restricted to the top k."""
    n, temperature, k = 8000, 1.5, 6
    logits = _spread_logits(n)
    draws = _one_per_row(
        [replace(DRAW, top_k=k, temperature=temperature, seed=s) for s in range(n)]
    )
    expected = torch.zeros(VOCAB)
    top = logits[0].topk(k).indices
    expected[top] = (logits[0, top] / temperature).softmax(dim=-1)
    got = _frequencies(_pick(sampler, logits, draws))
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.0)


def test_low_temperature_concentrates_and_high_temperature_spreads(
    sampler: TokenSampler,
) -> None:
    n = 2000
    logits = _spread_logits(n)
    best = int(logits[0].argmax())

    def frequencies(temperature: float) -> torch.Tensor:
        draws = [replace(DRAW, temperature=temperature, seed=s) for s in range(n)]
        return _frequencies(_pick(sampler, logits, _one_per_row(draws)))

    cold, warm, hot = frequencies(0.01), frequencies(1.0), frequencies(100.0)
    assert cold[best] == 1.0
    assert cold[best] > warm[best] > hot[best]
    assert (hot[:EOS] > 0.04).all()  # near uniform over the 14 sampleable ids (1/14 = 0.07)
    assert hot[INVALID].sum() == 0.0


def test_guidance_extrapolates_from_unconditional_to_conditional(sampler: TokenSampler) -> None:
    """uncond + cfg · (cond − uncond), computed by hand: with cfg 2 token 1 wins although
    token 0 leads in both the conditional and the unconditional logits."""
    cond = torch.full((VOCAB,), -10.0)
    uncond = torch.full((VOCAB,), -10.0)
    cond[:2] = torch.tensor([1.0, 0.9])
    uncond[:2] = torch.tensor([1.0, 0.0])
    # By hand, cfg 2: token 0: 1.0 + 2 (1.0 - 1.0) = 1.0; token 1: 0.0 + 2 (0.9 - 0.0) = 1.8.
    logits = torch.stack([cond, uncond])
    guided = replace(DRAW, cond_row=0, uncond_row=1, cfg_scale=2.0, top_k=1)
    picked = _pick(sampler, logits, [guided])
    assert picked.tolist() == [1, 1]  # both rows of the request get its token
    unguided = replace(guided, cfg_scale=1.0)  # cfg 1 is the conditional logits alone
    assert _pick(sampler, logits, [unguided]).tolist()[0] == 0


def test_guided_draws_follow_the_softmax_of_the_guided_logits(sampler: TokenSampler) -> None:
    n, cfg = 4000, 1.5
    torch.manual_seed(2)
    cond, uncond = torch.randn(VOCAB), torch.randn(VOCAB)
    cond[INVALID] = uncond[INVALID] = 0.0
    logits = torch.stack([cond, uncond]).repeat(n, 1)  # request i: rows 2i and 2i + 1
    draws = [
        replace(DRAW, cond_row=2 * i, uncond_row=2 * i + 1, cfg_scale=cfg, seed=i) for i in range(n)
    ]
    by_hand = uncond + cfg * (cond - uncond)
    by_hand[INVALID] = float("-inf")
    picked = _pick(sampler, logits, draws)[::2]
    torch.testing.assert_close(_frequencies(picked), by_hand.softmax(-1), atol=0.025, rtol=0.0)


def test_eos_is_never_drawn_where_not_allowed(sampler: TokenSampler) -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 100.0
    draws = _one_per_row([DRAW, replace(DRAW, eos_allowed=False)])
    picked = _pick(sampler, logits, draws).tolist()
    assert picked[0] == EOS and picked[1] != EOS


def test_invalid_ids_are_never_drawn(sampler: TokenSampler) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, INVALID] = 100.0
    assert _pick(sampler, logits, [DRAW]).item() not in INVALID


def test_noise_depends_only_on_seed_frame_codebook_and_token(sampler: TokenSampler) -> None:
    """A draw is the same alone or in any batch, at any row, beside any other requests."""
    logits = torch.zeros(6, VOCAB)  # flat: the noise alone decides
    alone = _pick(sampler, logits[:1], [DRAW], codebook=3).item()
    others = [replace(DRAW, seed=s, temperature=0.3, top_k=5) for s in (1, 2, 3, 4, 5)]
    for row in range(6):
        batch = _one_per_row([*others[:row], DRAW, *others[row:]])
        assert _pick(sampler, logits, batch, codebook=3)[row].item() == alone


@pytest.mark.parametrize(
    "change",
    [{"seed": 8}, {"seed": 7 + 2**32}, {"frame": 1}, {"codebook": 4}],
    ids=["seed", "seed-high-bits", "frame", "codebook"],
)
def test_noise_changes_with_seed_frame_and_codebook(sampler: TokenSampler, change: dict) -> None:
    codebook = change.pop("codebook", 3)
    base = RowSampling.batch([DRAW], 1, CPU)
    other = RowSampling.batch([replace(DRAW, **change)], 1, CPU)
    assert not torch.equal(sampler.row_keys(base, 3), sampler.row_keys(other, codebook))
    # ... while sampling settings that are not part of the noise leave the key alone.
    unrelated = replace(DRAW, temperature=0.2, top_k=3, cfg_scale=2.0, eos_allowed=False)
    assert torch.equal(
        sampler.row_keys(base, 3), sampler.row_keys(RowSampling.batch([unrelated], 1, CPU), 3)
    )


def test_each_token_gets_its_own_noise(sampler: TokenSampler) -> None:
    """With flat logits the draw is uniform over the sampleable ids across seeds."""
    n = 4000
    draws = _one_per_row([replace(DRAW, seed=s) for s in range(n)])
    got = _frequencies(_pick(sampler, torch.zeros(n, VOCAB), draws))
    expected = torch.zeros(VOCAB)
    expected[: EOS + 1] = 1 / (EOS + 1)  # ids 0..14 (EOS allowed); 15 is invalid
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.0)


def _python_hash32(x: int) -> int:
    """hash32 in Python integers: the arithmetic the tensor version must reproduce."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash32_matches_exact_integer_arithmetic() -> None:
    """Products past 2**63 wrap in int64; the hash must still be the exact 32-bit one."""
    values = [0, 1, 2**16 - 1, 2**31, 2**32 - 1, *torch.randint(0, 2**32, (200,)).tolist()]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_python_hash32(v) for v in values]


def test_frame_keys_are_the_row_keys_of_every_codebook(sampler: TokenSampler) -> None:
    draws = [replace(DRAW, seed=2**40 + 3, frame=17), replace(DRAW, seed=5, frame=0)]
    rows = RowSampling.batch(draws, 2, CPU)
    keys = sampler.frame_keys(rows, 8)
    for codebook in range(8):
        assert torch.equal(keys[:, codebook], sampler.row_keys(rows, codebook))
