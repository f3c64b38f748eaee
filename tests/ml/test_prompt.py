"""The official prompt layout, row by row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.core.prompt_text import PromptCounter, prompt_counter
from shared.ml.models.heartmula import load_heartmula
from shared.ml.models.prompt import PromptBuilder, normalize_tags


@pytest.fixture(scope="module")
def builder(tiny_model_dir: Path) -> PromptBuilder:
    return PromptBuilder.from_model_dir(tiny_model_dir)


def _ids(builder: PromptBuilder, text: str) -> list[int]:
    """The tokenizer's ids for text without any special tokens it adds."""
    return builder.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Piano, Happy ,wedding", "<tag>piano,happy,wedding</tag>"),
        ("<tag>Piano,happy</tag>", "<tag>piano,happy</tag>"),
        (" rock,, ", "<tag>rock</tag>"),
    ],
)
def test_tags_are_lowercased_and_wrapped_without_spaces(raw: str, normalized: str) -> None:
    assert normalize_tags(raw) == normalized


def test_rows_follow_the_official_layout(builder: PromptBuilder) -> None:
    cfg = builder.gen_config
    prompt = builder.build("Piano, Happy", "[Verse] Hello World")
    tag_ids = [cfg.text_bos_id, *_ids(builder, "<tag>piano,happy</tag>"), cfg.text_eos_id]
    lyric_ids = [cfg.text_bos_id, *_ids(builder, "[verse] hello world"), cfg.text_eos_id]
    expected_text = [*tag_ids, cfg.empty_id, *lyric_ids]

    assert prompt.tokens.shape == (len(expected_text), 9)
    assert prompt.length == len(tag_ids) + 1 + len(lyric_ids)
    assert prompt.tokens[:, -1].tolist() == expected_text
    assert prompt.muq_index == len(tag_ids)
    assert (prompt.tokens[:, :8] == 0).all()
    assert prompt.mask[:, -1].all() and not prompt.mask[:, :8].any()


def test_bos_and_eos_appear_exactly_once_per_segment(builder: PromptBuilder) -> None:
    cfg = builder.gen_config
    text = builder.build("pop", "la la").tokens[:, -1].tolist()
    assert text.count(cfg.text_bos_id) == 2 and text.count(cfg.text_eos_id) == 2
    assert text[0] == cfg.text_bos_id and text[-1] == cfg.text_eos_id


def test_empty_lyrics_are_an_instrumental_prompt(builder: PromptBuilder) -> None:
    cfg = builder.gen_config
    prompt = builder.build("piano")
    assert prompt.tokens[prompt.muq_index + 1 :, -1].tolist() == [cfg.text_bos_id, cfg.text_eos_id]


def test_a_string_naming_a_file_is_text_not_a_path(builder: PromptBuilder, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    prompt = builder.build("piano", str(secret))
    lyrics = prompt.tokens[prompt.muq_index + 2 : -1, -1].tolist()
    assert lyrics == _ids(builder, str(secret).lower())


def test_history_rows_put_codes_in_the_audio_columns(builder: PromptBuilder) -> None:
    codes = torch.arange(8 * 3).view(8, 3)
    tokens, mask = builder.history_rows(codes)
    assert tokens[:, :8].tolist() == codes.T.tolist() and (tokens[:, 8] == 0).all()
    assert mask[:, :8].all() and not mask[:, 8].any()


@torch.no_grad()
def test_unconditional_rows_replace_every_text_embedding(
    builder: PromptBuilder, tiny_model_dir: Path
) -> None:
    model = load_heartmula(
        tiny_model_dir / "HeartMuLa-oss-tiny", torch.device("cpu"), torch.float32
    )
    prompt = builder.build("piano", "hello")
    tokens, mask = prompt.tokens.expand(2, -1, -1), prompt.mask.expand(2, -1, -1)
    h = model.embed_sequence(tokens, mask, prompt.muq_index, torch.tensor([False, True]))
    text = model.text_embeddings(prompt.tokens[:, -1])
    conditional_rows = torch.cat([text[: prompt.muq_index], text[prompt.muq_index + 1 :]])
    h_cond = torch.cat([h[0, : prompt.muq_index], h[0, prompt.muq_index + 1 :]])
    torch.testing.assert_close(h_cond, conditional_rows)
    torch.testing.assert_close(h[0, prompt.muq_index], model.muq_linear.bias)
    uncond = model.unconditional_text_embedding.weight[0]
    torch.testing.assert_close(h[1], uncond.expand_as(h[1]))


@pytest.mark.parametrize(
    ("tags", "lyrics"),
    [("piano", ""), ("Piano, Happy ", "[verse]\nla la la\n"), ("rock", "😀" * 50 + " émoji")],
)
def test_the_gateways_count_is_the_prompts_length(
    builder: PromptBuilder, tiny_model_dir: Path, tags: str, lyrics: str
) -> None:
    counter = prompt_counter(tiny_model_dir)
    assert counter.exact
    assert counter.rows(tags, lyrics) == builder.build(tags, lyrics).length
    # without the tokenizer, an upper bound
    assert PromptCounter(None, None).rows(tags, lyrics) >= builder.build(tags, lyrics).length
