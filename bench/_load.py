"""Whether the cores were free while a benchmark measured: every benchmark prints it with its table.

Timings taken while another process uses the cores are not the machine's: two torch processes with one
OpenMP thread per core each ran a training step 6x slower on 2 cores (``bench/threads.py``). A benchmark
cannot make the machine idle, so it says how busy the cores were just before it started and how loaded
the machine was around it, and flags the table as untrustworthy when other processes held the cores.

Why not the load average alone: it is a 1-minute moving average, so a job that ended seconds ago still
shows, and one that started just before does not yet. The busy share of the cores over one second
(``/proc/stat``, while this process sleeps) says what is running now; the load average is printed beside
it for the whole span.
"""

from __future__ import annotations

import os
import time

__all__ = ["BUSY_SHARE", "LoadCheck", "busy_share"]

#: Share of all cores busy with other processes, in the second before a benchmark starts, above which its
#: timings are flagged.
BUSY_SHARE = 0.15


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, or None where ``/proc/stat`` does not exist."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 1.0) -> float | None:
    """Share (0-1) of all cores busy during `seconds` while the caller sleeps; None if unknown."""
    first = _cpu_times()
    time.sleep(seconds)
    second = _cpu_times()
    if first is None or second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1])


class LoadCheck:
    """``with LoadCheck() as load: ...measure...`` then ``print(load.line())``."""

    def __init__(self) -> None:
        self.busy_before: float | None = None
        self.load_before = os.getloadavg()[0]
        self.load_after: float | None = None

    def __enter__(self) -> LoadCheck:
        self.busy_before = busy_share()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.load_after = os.getloadavg()[0]

    @property
    def busy(self) -> bool:
        return self.busy_before is not None and self.busy_before > BUSY_SHARE

    def line(self) -> str:
        after = os.getloadavg()[0] if self.load_after is None else self.load_after
        cores = "unknown" if self.busy_before is None else f"{self.busy_before:.0%}"
        text = f"cores busy before the start {cores}; load average {self.load_before:.2f} before, {after:.2f} after"
        if self.busy:
            text += (
                f" -- BUSY: other processes held {cores} of the cores when it started (> {BUSY_SHARE:.0%}); "
                "these timings are not this machine's, measure again on an idle machine"
            )
        return text
