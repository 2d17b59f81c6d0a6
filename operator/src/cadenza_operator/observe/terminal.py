"""Printing rich renderables (a run tree, a table) for people and for pipes alike.

On a terminal, rich fits the output to the window. Piped (`cadenza get RUN | grep`), the
output is not cut to some width: a 300-character message stays one line. rich's own
`soft_wrap` would crop a tree's lines instead, so a pipe gets a console wide enough for
any line and the padding rich adds to fill it is stripped.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from rich.console import Console

PIPE_WIDTH = 100_000
"""Columns of the console that renders for a pipe: wider than any line we print (the
tree clips a message at observe.tree.MAX_DETAIL_CHARS)."""


def show(renderable: Any, file: IO[str] | None = None) -> None:
    """Print `renderable` to `file` (stdout): fitted to a terminal, unwrapped to a pipe."""
    out = file or sys.stdout
    if out.isatty():
        Console(file=out).print(renderable)
        return
    console = Console(width=PIPE_WIDTH, color_system=None, force_terminal=False, file=out)
    with console.capture() as captured:
        console.print(renderable)
    out.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
