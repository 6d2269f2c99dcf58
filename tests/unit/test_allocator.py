"""``keep_freed_memory``: a training step's large tensors are reused without page faults (glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from model_quantization import allocator

#: LSQ's fake quantization of a 512x512x3x3 conv weight (9.4 MB; four temporaries of that size) and the
#: conv on it, 20 times after 10 warm-up steps: print the minor page faults of each of the 20 steps.
_PROBE = textwrap.dedent(
    """
    import json, resource
    import torch
    from model_quantization.allocator import keep_freed_memory
    kept = keep_freed_memory()
    torch.set_num_threads(1)
    w, x = torch.randn(512, 512, 3, 3), torch.randn(2, 512, 4, 4)
    def step():
        q = (w / 0.01).round().clamp(-8, 7) * 0.01
        return torch.nn.functional.conv2d(x, q, padding=1)
    for _ in range(10):
        step()
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"kept": kept, "faults": faults}))
    """
)


def _probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MODEL_QUANTIZATION_MALLOC"}
    # One OpenMP thread: the pattern of allocations (and so glibc's default behaviour) is the same every run.
    env = {**environ, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only: other C libraries are left alone")
def test_kept_memory_is_reused_without_page_faults_and_system_opts_out():
    system = _probe(MODEL_QUANTIZATION_MALLOC="system")
    kept = _probe()
    pages = 512 * 512 * 9 * 4 // 4096  # one weight's worth of 4 KiB pages
    assert not system["kept"] and kept["kept"]
    # With glibc's defaults the kernel maps (and zero-fills) fresh pages step after step, how many depends
    # on where small allocations land between the big ones (measured here over 6 runs: 1 to 40 weights'
    # worth in 20 steps, in most runs at every step). Kept, the freed blocks are reused: the heap grows
    # in a step or two at most (a weight's worth each, sometimes late in the 20), and no other step faults.
    assert sum(f > 0 for f in kept["faults"]) <= 2, (kept, system)
    assert sum(kept["faults"]) <= 2 * pages, (kept, system)


def test_keep_freed_memory_is_idempotent_and_reported():
    first = allocator.keep_freed_memory()
    assert allocator.keep_freed_memory() == first == allocator.kept()
