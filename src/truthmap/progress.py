"""Progress bars for long stages (tqdm: plain enough for logs, live in a terminal)."""

from __future__ import annotations

import os
from contextlib import contextmanager

# The bar in progress, if any, and the innermost bar an exception left: what the CLI names when a run is stopped.
CURRENT: dict = {}
STOPPED: dict = {}


@contextmanager
def progress_bar(total: int, description: str, initial: int = 0, unit: str = "sample", enabled: bool = True):
    """Yields advance(n). Silenced with TRUTHMAP_PROGRESS=0 (tests, batch jobs) or enabled=False."""
    from tqdm.auto import tqdm

    disable = not enabled or os.environ.get("TRUTHMAP_PROGRESS", "1") == "0"
    outer = dict(CURRENT)
    CURRENT.update(description=description, done=initial, total=total, unit=unit)

    def advance(n: int = 1):
        CURRENT["done"] += n
        bar.update(n)

    try:
        bar = tqdm(total=total, initial=initial, desc=description, unit=unit, disable=disable, dynamic_ncols=True)
        with bar:
            yield advance
    except BaseException:
        if not STOPPED:
            STOPPED.update(CURRENT)
        raise
    finally:
        CURRENT.clear()
        CURRENT.update(outer)


def where() -> str:
    """Where a stopped run was: ' during Generating answers (32 of 90 samples done)', or '' outside any bar."""
    bar = STOPPED or CURRENT
    if not bar:
        return ""
    return f" during {bar['description']} ({bar['done']} of {bar['total']} {bar['unit']}s done)"
