"""Where the CLI writes, and how: plain text only.

Much of what the CLI prints comes from people and VMs it does not trust: VM names and rule ids from the
policy, event fields, process names and agent versions from guests, error messages that quote them. So the
consoles never interpret markup or emoji codes (`[/x]` in a guest's process name is printed as `[/x]`, not
parsed), and `plain` turns control characters into visible escapes (`model/text.py`). Colour, where wanted,
is given as a `rich.text.Text` with a style, never as markup in a string.

Width. Text is never wrapped: a located problem, a policy (`policy show`), a ruleset (`ruleset show`), a
traffic event (`logs`) stays one line per line. Output that is not a terminal (a pipe, a file) has no width
at all: rich would otherwise assume 80 columns there, and squeeze tables into it, cutting a VM's UUID to
`13f989…`. So piped tables are as wide as their widest cell and a script can read every cell whole. On a
terminal, tables fit its width, and a cell too long for its column is folded onto more lines (`table`),
never cut.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from hyperfence.model.text import printable

UNBOUNDED = 1_000_000
"""The width of output that is not a terminal: wider than any line the CLI prints."""


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, markup=False, highlight=False, emoji=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = UNBOUNDED
    return console


out = _console(stderr=False)
err = _console(stderr=True)


def table(*headers: str) -> Table:
    """A table whose cells are folded, never cut, when the terminal is too narrow for them."""
    return Table(*(Column(h, overflow="fold") for h in headers))


def plain(value: object) -> str:
    """`value` as text that shows exactly what it is: control characters escaped."""
    return printable(str(value))


def plain_lines(value: object) -> str:
    """Like `plain`, for text whose line breaks are ours (an error listing one problem per line)."""
    return "\n".join(printable(line) for line in str(value).split("\n"))


def styled(text: str, style: str) -> Text:
    return Text(plain(text), style=style)
