"""What long jobs and commands show on the terminal: tqdm progress bars and one table formatter.

Bars go to stderr, with units (bytes/s, tokens/s, steps/s) and an ETA; they are silent when stderr is
not a terminal or the caller passes ``enabled=False`` (every command's ``--quiet``). Tables are plain
aligned text, the same for every command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, *, unit: str = "B", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr; ``unit="B"`` shows sizes and rates in kB/MB/GB, other units in k/M counts."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000, dynamic_ncols=True,
                leave=False, file=sys.stderr, disable=None if enabled else True)


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.23MB'`` (decimal units, as the bars show them)."""
    return tqdm.format_sizeof(n, suffix="B", divisor=1000)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, note: str = "") -> str:
    """Columns aligned to their widest cell; numbers and signed cells right-aligned, text left-aligned."""
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = [all(_is_numeric(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([note] if note else []))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, note: str = "", file=None) -> None:
    print(format_table(headers, rows, note=note), file=file or sys.stdout)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def _is_numeric(cell: str) -> bool:
    head = cell.split(" ")[0].replace("±", "")
    try:
        float(head.replace(",", ""))
        return True
    except ValueError:
        return cell == "-"
