"""Option parsing shared by ``cddrec-bench`` and the benchmark scripts (``python -m cddrec.benchmarks.X``)."""

from __future__ import annotations

import click


def int_list(s: str) -> list[int]:
    """``"1,8,64"`` -> [1, 8, 64]: comma-separated integers >= 1, else a usage error."""
    try:
        values = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated integers >= 1, got {s!r}")
    return values
