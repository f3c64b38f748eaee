"""Text fields from strangers: normalised once, and refused when they are not valid text.

JSON can carry lone surrogates (`"\\ud800"`) that no encoder accepts, and control characters
that mean nothing in a tag or a lyric; both would only fail later, in Redis or the tokenizer.
No torch: the gateway validates with this module and the workers apply the same rules.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls and DEL (Unicode category Cc): never in a one-line field (the OpenAPI
# document states the same class); multi-line fields may hold tabs and newlines
CONTROL_CLASS = r"\u0000-\u001f\u007f-\u009f"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_MULTILINE_CONTROL = re.compile(r"[\t\n]")


def clean_text(value: str, multiline: bool = False) -> str:
    """`value` in NFC with \\r\\n and \\r turned into \\n; ValueError naming the first bad
    character (a lone surrogate, a control character, or a tab/newline when not `multiline`)."""
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        raise ValueError(
            f"not valid Unicode: lone surrogate U+{ord(surrogate.group()):04X} "
            f"at character {surrogate.start()}"
        )
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n"))
    bad = _CONTROL.search(text) or (None if multiline else _MULTILINE_CONTROL.search(text))
    if bad is not None:
        allowed = "except newlines and tabs " if multiline else ""
        raise ValueError(
            f"control character U+{ord(bad.group()):04X} at character {bad.start()}; "
            f"control characters {allowed}are not allowed"
        )
    return text
