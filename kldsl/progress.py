"""The progress bar every long loop shows (tqdm; on by default only on a terminal)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def bar(total: int, desc: str, enabled: bool | None, unit: str = "seq") -> Any:
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if enabled is None else not enabled,
        dynamic_ncols=True,
        leave=False,
    )
