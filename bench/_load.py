"""Whether the cores were free while a benchmark measured: every benchmark prints it with its table.

Timings taken while another process uses the cores are not the machine's: two torch processes with one
OpenMP thread per core each ran a training step 30x slower on 2 cores. A benchmark cannot make the machine
idle, so it says how loaded it was (the 1-minute load average before and after) and flags the table as
untrustworthy when another process was already running when it started.
"""

from __future__ import annotations

import os

__all__ = ["BUSY_LOAD", "LoadCheck"]

#: A 1-minute load average above this when a benchmark starts (its own process has barely run yet) means
#: another process shares the cores.
BUSY_LOAD = 0.5


class LoadCheck:
    """``with LoadCheck() as load: ...measure...`` then ``print(load.line())``."""

    def __init__(self) -> None:
        self.before = os.getloadavg()[0]
        self.after: float | None = None

    def __enter__(self) -> LoadCheck:
        self.before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.after = os.getloadavg()[0]

    @property
    def busy(self) -> bool:
        return self.before > BUSY_LOAD

    def line(self) -> str:
        after = os.getloadavg()[0] if self.after is None else self.after
        text = f"load average {self.before:.2f} before, {after:.2f} after"
        if self.busy:
            text += (
                f" -- BUSY: another process was using the cores (load > {BUSY_LOAD} at the start); these timings "
                "are not this machine's, measure again on an idle machine"
            )
        return text
