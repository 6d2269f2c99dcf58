"""Data-driven initialisation is rank-consistent: 2 real gloo processes, different data on each rank."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_quantization.distributed import all_reduce_mean, is_distributed
from tests.unit.quantizer_factory import make_quantizer

WORLD_SIZE = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(1000 + rank)
        x = torch.randn(4, 8, 6, 6) * (rank + 1) + rank  # different data, different scale per rank
        lsq = make_quantizer("lsq", 4, True)
        lsq(x)
        observer = make_quantizer("minmax", 8, True)
        observer(x)
        lqnet = make_quantizer("lqnet", 2, True)
        lqnet(x)
        result = {
            "lsq_step": lsq.step.detach(),
            "local_estimate": 2 * x.abs().mean() / math.sqrt(7),
            "min": observer.min_val,
            "max": observer.max_val,
            "local_min": x.min(),
            "local_max": x.max(),
            "lqnet_basis": lqnet.basis,
            "value": all_reduce_mean(torch.tensor([float(rank)])),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_initial_values_are_identical_across_two_gloo_ranks(tmp_path):
    init_file = tmp_path / "rendezvous"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert results[0]["local_estimate"] != results[1]["local_estimate"]  # the ranks really saw different data
    assert torch.equal(results[0]["lsq_step"], results[1]["lsq_step"])
    mean_estimate = (results[0]["local_estimate"] + results[1]["local_estimate"]) / 2
    torch.testing.assert_close(results[0]["lsq_step"], mean_estimate)
    assert torch.equal(results[0]["min"], results[1]["min"]) and torch.equal(
        results[0]["max"], results[1]["max"]
    )
    assert results[0]["min"] == min(r["local_min"] for r in results)
    assert results[0]["max"] == max(r["local_max"] for r in results)
    assert torch.equal(results[0]["lqnet_basis"], results[1]["lqnet_basis"])
    assert results[0]["value"].item() == results[1]["value"].item() == 0.5


def test_helpers_are_no_ops_without_a_process_group():
    assert not is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]
