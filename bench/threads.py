"""Two torch processes on one machine: what OpenMP's thread settings cost (``nox -s bench -- threads``).

Users run an evaluation next to a training all the time. With one OpenMP thread per core in each process,
the threads of one process busy-wait while the other's hold the cores. This measures a small conv
network's training step (forward + backward + SGD) alone and next to an identical second process, under
each setting, so the defaults this project sets (``demo/threads.py``, the nox sessions) are measured ones:

* ``default``: torch's defaults (one thread per core; libgomp's own wait policy);
* ``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep instead of spinning;
* ``OMP_NUM_THREADS=<cores / 2>``: each process keeps to its share of the cores.

The step time of each process is the median over ``--steps`` steps after a warm-up; the two-process rows
start both processes together and report the slower one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench._load import LoadCheck  # noqa: E402

SETTINGS = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=cores/2": {"OMP_NUM_THREADS": str(max((os.cpu_count() or 2) // 2, 1))},
}


def child(steps: int) -> None:
    """One process: a ResNet-ish conv stack on 8 x 3 x 128 x 128 inputs; prints the median step time."""
    import statistics

    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU()]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 128, 128)
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times[3:])}))


def _run(env_extra: dict, copies: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", "--steps", str(steps)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"benchmark child failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1])["step_s"])
    return max(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.child:
        child(args.steps)
        return
    with LoadCheck() as load:
        rows = [(name, _run(env, 1, args.steps), _run(env, 2, args.steps)) for name, env in SETTINGS.items()]
    print(f"Conv training step (8 x 3 x 128 x 128), {os.cpu_count()} cores, median of {args.steps} steps.\n")
    print("| setting | alone s/step | with a second process s/step | slowdown |")
    print("|---|---:|---:|---:|")
    for name, alone, shared in rows:
        print(f"| {name} | {alone:.3f} | {shared:.3f} | {shared / alone:.1f}x |")
    print(f"\n{load.line()}")


if __name__ == "__main__":
    main()
