"""The one resumable batch loop: every stage that works through many items in batches and may be killed runs here.

Generation, resampling, extraction of exact answers, reading a cell's activations and scoring imported answers
all do the same: leave out the items a checkpoint already holds, put the rest longest first (similar lengths share
a batch: less padding), cut them into batches, do a batch, checkpoint it, advance the progress bar. A killed run
is resumed by running the same call again: what was checkpointed is not done twice.

The order is a stable sort, so the batches of a resumed run are those the first run would have made of the same
remaining items, and the bytes written do not depend on where a run was stopped.
"""

from __future__ import annotations

from typing import Callable, Sequence

from truthmap.progress import progress_bar


def longest_first(items: Sequence, length: Callable) -> list:
    """items sorted by decreasing length(item), stable: equal lengths keep their order."""
    return sorted(items, key=lambda item: -length(item))


def in_batches(items: Sequence, size: int) -> list[list]:
    """Consecutive runs of at most `size` items."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def run_batches(items: Sequence, work: Callable, checkpoints, *, batch_size: int, description: str,
                key: Callable | None = None, length: Callable | None = None, done: set | None = None,
                cut: Callable | None = None, size: Callable | None = None, progress: bool = True,
                total: int | None = None, after_batch: Callable | None = None) -> int:
    """Run work(batch) -> frame over the items not done yet, checkpointing each frame; returns the batches run.

    key(item): the id the checkpoints hold for it (default: the item itself); done: the keys already done
    (default: checkpoints.done_ids()). length(item): sort longest first (None: keep the given order). cut(items)
    -> batches replaces cutting into batch_size runs (batches bounded by tokens, not rows). size(item): what an
    item counts on the progress bar (default 1); total: the bar's total (default: the items' sizes).
    after_batch(): called once a batch is checkpointed (to give memory back). work may return None to write no
    checkpoint (a store that says itself what is done; then checkpoints may be None).
    """
    key = key or (lambda item: item)
    done = checkpoints.done_ids() if done is None else done
    todo = [item for item in items if key(item) not in done]
    if length is not None:
        todo = longest_first(todo, length)
    cut_batches = cut(todo) if cut is not None else in_batches(todo, batch_size)
    size = size or (lambda item: 1)
    total = sum(map(size, items)) if total is None else total
    left = sum(map(size, todo))
    with progress_bar(total=total, initial=total - left, description=description, enabled=progress) as advance:
        for batch in cut_batches:
            frame = work(batch)
            if frame is not None:
                checkpoints.write(frame)
            del frame
            if after_batch is not None:
                after_batch()
            advance(sum(map(size, batch)))
    return len(cut_batches)


def load_in_order(checkpoints, keys: Sequence):
    """The checkpointed rows of `keys`, in that order (the last write of a key wins)."""
    frame = checkpoints.load().drop_duplicates("id", keep="last").set_index("id")
    return frame.loc[list(keys)]
