"""Text that came from a VM or a user, made safe to show: no control characters reach a terminal or a log.

A guest chooses its process names, event fields and agent version; an operator chooses VM names and rule
ids. Printed raw, a newline forges a log line, an escape sequence rewrites the terminal, a bidi override
hides what follows. `printable` replaces every such character by a visible escape (`\\x1b`, `\\u202e`) and
leaves all other text, including non-ASCII letters, as it is. (Markup is the printer's business: the CLI
passes this text to rich as plain text, never as markup.)
"""

from __future__ import annotations

import unicodedata

# Unicode categories that do not print: controls (C0, DEL, C1), format characters (bidi overrides, zero
# width joiners), line/paragraph separators, surrogates, private use, unassigned.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str) -> str:
    """`text` with every non-printing character replaced by its escape."""
    if text.isprintable():  # the common case, at C speed (a space is printable; a tab or newline is not)
        return text
    return "".join(ch if unicodedata.category(ch) not in _HIDDEN else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
