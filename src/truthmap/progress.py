"""Progress bars for long stages (tqdm: plain enough for logs, live in a terminal)."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, description: str, initial: int = 0, unit: str = "sample", enabled: bool = True):
    """Yields advance(n). Silenced with TRUTHMAP_PROGRESS=0 (tests, batch jobs) or enabled=False."""
    from tqdm.auto import tqdm

    disable = not enabled or os.environ.get("TRUTHMAP_PROGRESS", "1") == "0"
    with tqdm(total=total, initial=initial, desc=description, unit=unit, disable=disable, dynamic_ncols=True) as bar:
        yield bar.update
