"""Text fields: Unicode normalisation, control characters and the transcriber's languages."""

from __future__ import annotations

import pytest

from shared.core.languages import LANGUAGES, language_code
from shared.core.text import clean_text


def test_text_is_nfc_with_unix_newlines() -> None:
    assert clean_text("cafe\u0301\r\nline\rtwo\tx", multiline=True) == "caf\u00e9\nline\ntwo\tx"


@pytest.mark.parametrize(
    ("value", "multiline", "message"),
    [
        ("a\ud800b", True, "lone surrogate U\\+D800 at character 1"),
        ("a\x00", True, "control character U\\+0000 at character 1"),
        ("\x7f", True, "U\\+007F"),
        ("\x9b", True, "U\\+009B"),
        ("one\ntwo", False, "U\\+000A at character 3"),
        ("one\ttwo", False, "U\\+0009"),
        ("one\rtwo", False, "U\\+000A"),
    ],
)
def test_invalid_text_is_refused(value: str, multiline: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clean_text(value, multiline=multiline)


@pytest.mark.parametrize(
    ("name", "code"),
    [("en", "en"), ("<|de|>", "de"), (" English ", "en"), ("castilian", "es"), ("yue", "yue")],
)
def test_language_names_and_codes(name: str, code: str) -> None:
    assert language_code(name) == code


def test_unknown_language() -> None:
    assert len(LANGUAGES) == 100
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_code("klingon")
