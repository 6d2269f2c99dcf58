"""MODEL.QUANTIZATION.COMPILE on a real detector: RetinaNet R-18 LSQ w4a4 (shapes config, 128 px, batch 2).

The backend is ``aot_eager`` (dynamo's capture, guards and AOTAutograd, no code generation): what this test
is about is the integration (which units compile, eager initialisation first, no graph breaks, no
recompilation per step, training and inference equal to eager, checkpoints unchanged), and Inductor's
code generation for the whole detector takes minutes on 2 cores. Inductor's numerics are tested on a
small quantized stack (tests/unit/test_compilation.py); its speed is what ``nox -s bench -- qat_step``
measures.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from model_quantization import functional as F
from model_quantization.compilation import compiled_units
from tests.integration.d2_helpers import CONFIG_DIR, load_cfg, shapes_batch

pytestmark = pytest.mark.integration

CONFIG = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"


def test_compiled_retinanet_trains_and_infers_like_eager_and_compiles_once(patched_tree, monkeypatch) -> None:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    monkeypatch.setenv("MODEL_QUANTIZATION_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model(load_cfg(CONFIG))
    compiled = build_model(load_cfg(CONFIG, "MODEL.QUANTIZATION.COMPILE", True))
    assert list(compiled.state_dict()) == list(eager.state_dict()), "checkpoints are unchanged"
    compiled.load_state_dict(eager.state_dict())
    units = compiled_units(compiled)
    assert set(units) == {"backbone", "head"}

    batches = [shapes_batch(2, seed=seed) for seed in range(3)]
    history: dict[str, list] = {"eager": [], "compiled": []}
    with EventStorage(0), F.backend("eager"):  # the ops the graphs capture (C kernels are eager-only)
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.train()
            for batch in batches:
                losses = model(batch)
                model.zero_grad()
                sum(losses.values()).backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                history[name].append(({k: v.item() for k, v in losses.items()}, grads))
    # No optimizer step: two *eager* runs of this model already differ in the last bits of some weight
    # gradients (oneDNN's convolution backward), and after an SGD step a 4-bit network can turn that into
    # a different level somewhere; with the same weights the comparison is exact up to float rounding.

    # The first batch initialised the quantizers eagerly; the next two ran one compiled graph per unit.
    assert [(u.eager_calls, u.compiled_calls) for u in units.values()] == [(1, 2), (1, 2)]
    assert compiled.compile_group.failure is None
    assert counters["stats"]["unique_graphs"] == 2, "no recompilation from step to step"
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (got_losses, got_grads), (want_losses, want_grads) in zip(
        history["compiled"], history["eager"], strict=True
    ):
        assert got_losses == pytest.approx(want_losses, rel=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for name, want in want_grads.items():
            error = (got_grads[name] - want).norm() / want.norm().clamp_min(1e-12)
            assert error < 1e-5 or (got_grads[name] - want).abs().max() < 1e-8, (name, error.item())

    # Inference: one more graph per unit (eval mode, no grad), the same detections.
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        image = [{"image": batches[0][0]["image"]}]
        got, want = compiled(image)[0]["instances"], eager(image)[0]["instances"]
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor) and torch.equal(got.scores, want.scores)
    assert counters["stats"]["unique_graphs"] == 4
