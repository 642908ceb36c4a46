"""Text from VMs and users, made safe to show."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.model.text import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("sshd", "sshd"),
        ("[/x] [bold]", "[/x] [bold]"),  # markup is the printer's business: kept as text
        ("a\nb", "a\\x0ab"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # a bidi override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("tab\there", "tab\\x09here"),
        ("\x7f\x9b", "\\x7f\\x9b"),  # DEL, a C1 control (CSI)
        ("héllo wörld ✓", "héllo wörld ✓"),
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown


@given(st.text())
def test_nothing_hidden_survives_and_visible_text_is_kept(text: str) -> None:
    shown = printable(text)
    assert not [ch for ch in shown if unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}]
    if text.isprintable():
        assert shown == text
