"""torch.compile of quantized modules (model_quantization.compilation): the quantizers initialise eagerly on
the first batch, then the units compile once (no recompilation per step), compute what eager computes,
and a compiler that fails leaves training running eagerly after one warning naming the cause.

Kept small: a 3-conv residual stack at 12x12 px; the backends that do not generate code (``eager``,
``aot_eager``) where a test is about capture, guards and fallbacks, Inductor once, for the numerics.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from model_quantization import Add, QuantSpec, calibration, convert
from model_quantization import functional as F
from model_quantization.compilation import CompiledForward, compile_modules, compiled_units, uncompile

SPEC = {
    "weight": {"method": "lsq", "bits": 4},
    "activation": {"method": "lsq", "bits": 4, "signed": False},
    "rules": [
        {"pattern": "stem", "weight": {"bits": 8}, "activation": {"bits": 8, "signed": True}},
        {"pattern": "body.add", "activation": {"signed": True}},
    ],
}


class Body(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.add(x, self.bn2(self.conv2(y))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = Body(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


def quantized_net() -> nn.Module:
    torch.manual_seed(0)
    model, _ = convert(Net(), QuantSpec.from_dict(SPEC))
    return model.train()


def batches(n: int, size: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, size, size, generator=generator) for _ in range(n)]


def train(model: nn.Module, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """SGD steps on `inputs`; the losses and the last step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for x in inputs:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return losses, grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_quantizers_initialise_eagerly_then_each_unit_compiles_once_and_equals_eager():
    reference, model = quantized_net(), quantized_net()
    backend = CompileCounterWithBackend("aot_eager")  # dynamo + AOTAutograd, no code generation
    group = compile_modules({"body": model.body, "head": model.head}, backend=backend)
    inputs = batches(5)
    with F.backend("eager"):  # the ops a graph captures (the C kernels are for eager CPU calls only)
        expected_losses, expected_grads = train(reference, inputs)
        losses, grads = train(model, inputs)
    # The captured graphs compute exactly what eager computes, through quantizer initialisation and SGD.
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses, strict=True))
    assert all(torch.equal(grads[n], expected_grads[n]) for n in expected_grads)
    units = compiled_units(model)
    assert set(units) == {"body", "head"} and group.failure is None
    # Step 1 ran eagerly (data-driven initialisation); steps 2-5 ran compiled code, compiled once per unit.
    assert [(u.eager_calls, u.compiled_calls) for u in units.values()] == [(1, 4), (1, 4)]
    assert backend.frame_count == 2, "one graph per unit, no recompilation across steps"
    # Evaluation (eval mode, no grad) compiles once more per unit; training again reuses the first graphs.
    model.eval()
    with torch.no_grad():
        model(inputs[0])
        model(inputs[1])
    model.train()
    train(model, inputs[:2])
    assert backend.frame_count == 4
    # Other input sizes: one recompilation with dynamic shapes, then none.
    train(model, batches(3, size=16) + batches(2, size=20))
    assert backend.frame_count == 6


def test_inductor_losses_and_gradients_match_eager_within_float_tolerance():
    reference, model = quantized_net(), quantized_net()
    backend = CompileCounterWithBackend("inductor")
    compile_modules({"body": model.body, "head": model.head}, backend=backend)
    inputs = batches(3)
    expected_losses, expected_grads = train(reference, inputs)
    losses, grads = train(model, inputs)
    assert compiled_units(model)["body"].compiled_calls == 2
    assert backend.frame_count == 2
    # Inductor fuses BN's statistics and the quantizers' step-gradient sums in another order: float rounding
    # only (a 4-bit stack this small has no pre-quantization value within that rounding of a level boundary).
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=1e-5, atol=1e-7)
    for name, expected in expected_grads.items():
        error = (grads[name] - expected).norm() / expected.norm().clamp_min(1e-6)
        assert error < 1e-4, (name, error.item())


def test_a_failing_compiler_leaves_training_eager_after_one_warning_naming_the_cause():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C++ compiler found (test)")

    reference, model = quantized_net(), quantized_net()
    group = compile_modules({"body": model.body, "head": model.head}, backend=no_compiler)
    inputs = batches(4)
    expected_losses, expected_grads = train(reference, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, grads = train(model, inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "no working C++ compiler found (test)" in messages[0] and "eagerly" in messages[0]
    assert "body" in group.failure
    # Every step ran (eagerly) and trained exactly like the eager model.
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses, strict=True))
    assert all(torch.equal(grads[n], expected_grads[n]) for n in expected_grads)
    assert all(u.compiled_calls == 0 and u.eager_calls == 4 for u in compiled_units(model).values())


def test_an_error_of_the_model_itself_is_raised_not_hidden_by_the_fallback():
    model = quantized_net()
    group = compile_modules({"body": model.body}, backend="eager")
    model(batches(1)[0])
    with pytest.raises(RuntimeError, match="channels"):
        model.body(torch.randn(2, 5, 12, 12))  # wrong channel count: eager raises the same
    assert group.failure is None or "channels" in group.failure


def test_uninitialised_or_calibrating_quantizers_run_eagerly():
    model = quantized_net()
    backend = CompileCounterWithBackend("eager")
    compile_modules({"body": model.body}, backend=backend)
    unit = compiled_units(model)["body"]
    x = batches(1)[0]
    model(x)
    model(x)
    assert (unit.eager_calls, unit.compiled_calls, backend.frame_count) == (1, 1, 1)
    with calibration(model):  # every batch folds into the quantizers' state: eager
        model(x)
    assert (unit.eager_calls, unit.compiled_calls) == (2, 1)
    for q in model.body.modules():
        if hasattr(q, "reset_initialization"):
            q.reset_initialization()
    model(x)  # re-initialises eagerly
    model(x)  # compiled again
    assert (unit.eager_calls, unit.compiled_calls) == (3, 2)
    # At most one recompilation: calibration() leaves `calibrating` an instance attribute where it was the
    # class's default, which the guards see once; re-initialisation changes nothing they see.
    assert backend.frame_count <= 2
    model(x)
    assert backend.frame_count <= 2


def test_compiled_units_keep_state_dict_hooks_and_copy_and_pickle_safely():
    model = quantized_net()
    keys = list(model.state_dict())
    compile_modules({"body": model.body}, backend="eager")
    assert list(model.state_dict()) == keys, "checkpoints are unchanged"
    seen = []
    hook = model.body.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(batches(1)[0])
    model(batches(1)[0])
    assert len(seen) == 2, "forward hooks run around the compiled forward"
    hook.remove()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        wrapper = copied.body.__dict__["forward"]
        assert isinstance(wrapper, CompiledForward) and wrapper.module is copied.body
        torch.testing.assert_close(copied(batches(1)[0]), model(batches(1)[0]))
    with pytest.raises(ValueError, match="already compiled"):
        compile_modules({"body": model.body})
    with pytest.raises(ValueError, match="contains compiled units"):
        compile_modules({"model": model})
    assert uncompile(model) == 1 and not compiled_units(model)
    assert "forward" not in model.body.__dict__
