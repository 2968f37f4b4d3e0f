"""Small text-formatting helpers shared by the CLI commands (sizes, tables)."""
from __future__ import annotations

import re


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"


def table(rows: list[list], header: list[str]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def ranges(rows: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else str(r))
            start = None
    return ", ".join(out)



_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'50G' -> 53687091200: a number of bytes, optionally followed by K, M, G, T or P (powers of 1024, as
    human_bytes prints them; 50GiB, 50GB and 50g read the same). ValueError for anything else or under a byte."""
    m = _SIZE.fullmatch(str(text).strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (a number of bytes, or one with K, M, G, T or P, such as 50G)")
    value = int(float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2).upper() or " "))
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return value
