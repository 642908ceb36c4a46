"""Where the CLI writes, and how: plain text only.

Much of what the CLI prints comes from people and VMs it does not trust: VM names and rule ids from the
policy, event fields, process names and agent versions from guests, error messages that quote them. So the
consoles never interpret markup or emoji codes (`[/x]` in a guest's process name is printed as `[/x]`, not
parsed), and `plain` turns control characters into visible escapes (`model/text.py`). Colour, where wanted,
is given as a `rich.text.Text` with a style, never as markup in a string. Nor do they wrap long lines: a
located problem, a policy (`policy show`) or a ruleset (`ruleset show`) stays one line per line, also when
piped, where rich would otherwise break it at 80 columns (tables still fit the terminal).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from hyperfence.model.text import printable

out = Console(markup=False, highlight=False, emoji=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)


def plain(value: object) -> str:
    """`value` as text that shows exactly what it is: control characters escaped."""
    return printable(str(value))


def plain_lines(value: object) -> str:
    """Like `plain`, for text whose line breaks are ours (an error listing one problem per line)."""
    return "\n".join(printable(line) for line in str(value).split("\n"))


def styled(text: str, style: str) -> Text:
    return Text(plain(text), style=style)
