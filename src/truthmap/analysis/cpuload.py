"""Threads on a shared CPU: how busy other processes keep the CPUs (read from /proc/stat), how many threads the
probe fits should use beside them, and torch's thread setting for a block of work."""

from __future__ import annotations

import time
from contextlib import contextmanager


def cpu_sample():
    """(wall seconds, CPU seconds spent by everything on the CPUs this process may use, CPU seconds of this
    process), read from /proc; None where there is no /proc/stat (not Linux)."""
    import os

    try:
        allowed = os.sched_getaffinity(0)
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy += sum(ticks) - ticks[3] - ticks[4]  # steal too: a VM's CPU lent elsewhere is not ours
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def busy_elsewhere(before, after) -> float:
    """CPUs kept busy by other processes between two cpu_sample()s (0 when either is None)."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def threads_to_use(ceiling: int, busy: float) -> int:
    """Threads for the fits: the CPUs this process may use that others leave free, at most `ceiling`, at least 1.
    A thread count above the free CPUs makes every parallel op wait for a thread that is not running."""
    import os

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return max(1, min(ceiling, round(usable - busy)))


@contextmanager
def torch_threads(n):
    """Run torch with n intra-op threads (None: unchanged), restoring the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FreeCpus:
    """CPUs for the next fits: `ceiling`, less what other processes kept busy since the last look.

    With measure=False (threads given, or fits on a GPU) `free` stays `ceiling`. Otherwise the first look is a
    short one (0.1 s) while this process is idle, and each `update` looks at the time since the one before."""

    def __init__(self, ceiling: int, measure: bool):
        self.ceiling = self.free = ceiling
        self.sample = cpu_sample() if measure else None
        if self.sample is not None:
            time.sleep(0.1)
            self.update()

    def update(self) -> None:
        if self.sample is not None:
            now = cpu_sample()
            self.free = threads_to_use(self.ceiling, busy_elsewhere(self.sample, now))
            self.sample = now
