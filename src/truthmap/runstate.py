"""The state of a run directory while commands write it: one writer at a time (run_lock), finished batches kept
as checkpoints (Checkpoints), and the resume checks that refuse work made with other settings (check_matches).

rundir.py says where every file lives and what it holds; this module says who may write them now and what a
rerun may reuse.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from truthmap.errors import StoreError
from truthmap.rundir import Checkpoint, RunDir, read_json, read_parquet, write_json, write_parquet

# How a changed setting is described when its raw values say little.
CHANGED = {
    "custom_sha256": "from another content of the custom file (sha256 {saved:.12}..., now {value:.12}...: edited since)",
    "import_sha256": "from another answers file (sha256 {saved:.12}..., this one {value:.12}...)",
    "extraction_prompt": "with extraction prompt {saved}, and this truthmap has prompt {value} (the exact answers "
                         "would mix two prompts)",
}


def check_matches(saved: dict, wanted: dict, where: Path) -> None:
    """Refuse to resume work made with other settings; name the first key that differs."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            made = CHANGED[key].format(saved=saved[key], value=value) if key in CHANGED else (
                f"with {key}={saved[key]!r}, not {value!r}")
            raise StoreError(
                f"{where} was made {made}. Use another --runs-dir, or delete that directory to start over."
            )


def check_checkpoints(directory: Path, settings: dict) -> None:
    """Refuse checkpoints made with other settings (before any model loads, and when they are opened)."""
    meta_path = Checkpoint(directory).settings
    if meta_path.exists():
        check_matches(read_json(meta_path), settings, directory)


_HELD: set[str] = set()  # locks this process holds: run_all holds the lock its stages take again


@contextlib.contextmanager
def run_lock(run: RunDir):
    """One writer per run directory: a second process stops at once, naming the first one's pid.

    An flock on run.lock: the kernel drops it when its holder dies, even by kill -9, so a lock never outlives its
    run. The file is removed on release (checked by inode on taking it), and so are the directories that were
    created only to hold it, so a command that fails on its input leaves nothing behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not locked there
        yield
        return
    path = run.lock
    key = os.path.abspath(path)
    if key in _HELD:
        yield
        return
    created = [p for p in (run.path, *run.path.parents[:3]) if not p.exists()]
    while True:
        run.path.mkdir(parents=True, exist_ok=True)  # again: a holder that just ended may have removed it
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise StoreError(
                f"{run.path} is in use by another truthmap run ({who}); wait for it to finish, or stop it, "
                "then run this again."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        f.close()  # the previous holder removed the file after we opened it: lock the one there now
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        path.unlink(missing_ok=True)
        f.close()
        for directory in created:  # deepest first; one that now holds anything stays
            with contextlib.suppress(OSError):
                directory.rmdir()


class Checkpoints:
    """Finished batches of a stage, one parquet part each, keyed by record id; resume skips what is done.

    A part is never changed once written (a damaged one is deleted and its batch written again under a new
    number), so each is read once: a stage that asks after every batch what is done reads only the new parts."""

    def __init__(self, directory: Path, settings: dict):
        self.directory = Path(directory)
        self.folder = Checkpoint(directory)
        self.read: dict[Path, object] = {}  # part -> its frame
        meta_path = self.folder.settings
        if meta_path.exists():
            check_checkpoints(self.directory, settings)
        else:
            write_json(meta_path, settings)

    def parts(self) -> list[Path]:
        return self.folder.parts()

    def batches(self) -> list:
        """Each finished batch's frame, in the order they were written."""
        parts = self.parts()
        fix = "delete it and rerun the same command: that batch is made again"
        self.read = {p: self.read[p] if p in self.read else read_parquet(p, fix=fix) for p in parts}
        return list(self.read.values())

    def load(self):
        import pandas as pd

        frames = self.batches()
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def done_ids(self) -> set[str]:
        frame = self.load()
        return set(frame["id"]) if len(frame) else set()

    def write(self, frame) -> None:
        # After the last part, not at the count of parts: once a damaged part is deleted, the count is a taken number.
        parts = self.parts()
        number = Checkpoint.number(parts[-1]) + 1 if parts else 0
        path = self.folder.part(number)
        write_parquet(path, frame)
        self.read.pop(path, None)  # read back on the next load, as parquet gives it (dtypes)
