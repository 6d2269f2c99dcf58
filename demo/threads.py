"""Thread settings for the CPU work this project starts (the demo, the benchmarks, the test suite).

Two processes that each run one OpenMP thread per core on a 2-core machine do not share it gracefully:
GNU OpenMP's idle threads spin, and a training step measured 5.7 s instead of 0.17 s next to an
evaluation. Passive waiting (idle threads sleep) makes oversubscription cost its fair share only. Set
before torch is imported (OpenMP reads its settings when it loads); an explicit ``OMP_NUM_THREADS`` or
``OMP_WAIT_POLICY`` in the environment always wins.
"""

from __future__ import annotations

import os

__all__ = ["default_thread_settings"]


def default_thread_settings() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise (``OMP_NUM_THREADS`` is left to
    torch's default, one thread per core, unless set)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
