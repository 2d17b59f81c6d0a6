"""The run list of `cadenza list`: one row per run, newest first, like `argo list`.

Rows are run summaries (`engine.view.summary`), read from the runs bucket or, for a client
credential that may read runs by id only, answered by an engine (the control operation
`list`). Cells hold user data (a run's message) as `rich.text.Text`, never as markup.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from .tree import phase_text, seconds


def parse_since(text: str) -> float:
    """`90s`, `15m`, `1h`, `2d` (or plain seconds) as seconds; ValueError naming the text."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"--since {text!r}: not a duration (90s, 15m, 1h, 2d)") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"--since {text!r}: not a duration above 0")
    return value


def run_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    wide: bool = False,
    namespaces: bool = False,
    now: float | None = None,
) -> Table:
    """The table `cadenza list` prints: NAMESPACE (with -A), NAME, WORKFLOW, PHASE, STARTED
    (age), DURATION, PROGRESS, MESSAGE; wide adds the retried run and usage."""
    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    columns = ["NAME", "WORKFLOW", "PHASE", "STARTED", "DURATION", "PROGRESS"]
    columns = (["NAMESPACE"] if namespaces else []) + columns
    if wide:
        columns += ["RETRY OF", "TOKENS", "COST"]
    for name in [*columns, "MESSAGE"]:
        table.add_column(name, no_wrap=True, overflow="ignore")
    for row in rows:
        cells: list[Text | str] = [Text(str(row["namespace"]))] if namespaces else []
        cells += [
            Text(str(row["run"])),
            Text(str(row["workflow"])),
            phase_text(str(row["phase"])),
            seconds(max(0.0, now - float(row["createdAt"]))) + " ago",
            seconds(row.get("durationSeconds")),
            str(row.get("progress", "")),
        ]
        if wide:
            usage = row.get("usage") or {}
            tokens = int(usage.get("inputTokens", 0)) + int(usage.get("outputTokens", 0))
            cells += [
                Text(str(row.get("retryOf") or "")),
                str(tokens) if tokens else "",
                f"{usage['cost']:.6g}" if usage.get("cost") else "",
            ]
        cells.append(Text(str(row.get("message") or "")))
        table.add_row(*cells)
    return table
