"""Every registered job type has exactly one worker handler."""

from __future__ import annotations

import pytest

from shared.core.jobtypes import JOB_TYPES
from workers.handlers import HANDLERS, handles


def test_every_type_has_a_handler_and_no_handler_lacks_a_type() -> None:
    assert set(HANDLERS) == set(JOB_TYPES)


def test_a_handler_for_an_unregistered_or_taken_type_is_refused() -> None:
    with pytest.raises(RuntimeError, match="not a registered type"):
        handles("karaoke")(lambda ctx: None)
    with pytest.raises(RuntimeError, match="registered twice"):
        handles("generate")(lambda ctx: None)
    assert "karaoke" not in HANDLERS
