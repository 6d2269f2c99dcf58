"""``torch.compile`` for the quantized parts of a model, after data-driven initialisation, with an eager fallback.

Eager QAT pays the Python and dispatch overhead of every quantizer call (a RetinaNet R-18 has 166 of them,
most on small tensors) and, on a GPU, a kernel launch per element-wise op. Compiled, Inductor fuses each
quantizer into its neighbours (conv epilogue, BN, ReLU) and emits C++/OpenMP on CPU and Triton on GPU from
the same code. :func:`compile_modules` compiles chosen submodules ("units": a backbone, a head) in place:

* Only the unit's ``forward`` is replaced (an instance attribute), so the module keeps its class,
  parameters, buffers and state-dict keys (checkpoints load and save unchanged), and its forward hooks
  (e.g. distillation's) keep running eagerly around the compiled code.
* A unit runs eagerly while any quantizer in it is not initialised or is calibrating: data-driven
  initialisation (and its DDP all-reduce) happens in eager mode on the first batch, then the next call
  compiles. Afterwards the compiled code only reads Python flags that no longer change, so it is not
  recompiled every step (a change of train/eval mode, of grad mode or of input shapes compiles once more;
  shapes become dynamic after the first change).
* ``fullgraph=True``: a unit compiles to one graph or not at all. If compilation fails (no C++ compiler,
  an unsupported op, a graph break on data-dependent code), the call is run eagerly, every unit of that
  group stays eager from then on, and one ``RuntimeWarning`` names the unit and the cause. An error that
  the eager call raises too is the model's own and is raised as such.
* The backward graph is compiled together with the forward (not lazily at the first ``backward()``), so a
  backend failure surfaces where it can still be caught and the step retried eagerly.

``MODEL_QUANTIZATION_COMPILE_BACKEND`` overrides the default backend (``inductor``), e.g. ``aot_eager`` to
check whether a numerical difference comes from Inductor's code generation.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from model_quantization.quantizers import Quantizer

__all__ = ["CompileGroup", "CompiledForward", "compile_modules", "compiled_units", "uncompile"]

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "inductor"


def default_backend() -> str:
    """``$MODEL_QUANTIZATION_COMPILE_BACKEND`` or ``"inductor"``."""
    return os.environ.get("MODEL_QUANTIZATION_COMPILE_BACKEND", "").strip() or DEFAULT_BACKEND


def _cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: first line`` (dynamo wraps the real cause, e.g. the
    backend's error in ``BackendCompilerFailed.inner_exception``)."""
    root = exc
    seen = {id(root)}
    while True:
        nxt = getattr(root, "inner_exception", None) or root.__cause__
        if nxt is None and not root.__suppress_context__:
            nxt = root.__context__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        seen.add(id(nxt))
        root = nxt
    text = str(root).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


class CompileGroup:
    """Settings and shared fate of the units compiled together (one model): one failure, one warning.

    Attributes:
        backend, dynamic, mode, options: passed to ``torch.compile``.
        failure: why compilation was given up (``None`` while it works); then every unit runs eagerly.
    """

    def __init__(
        self,
        backend: str | Callable | None = None,
        *,
        dynamic: bool | None = None,
        mode: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = backend if backend is not None else default_backend()
        self.dynamic = dynamic
        self.mode = mode
        self.options = dict(options) if options else None
        self.failure: str | None = None
        self.units: dict[str, CompiledForward] = {}

    def compile(self, fn: Callable, device: torch.device | None = None) -> Callable:
        kwargs: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": True}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        options = dict(self.options or {})
        if self.backend == "inductor" and device is not None and device.type == "cpu":
            # Inductor's layout optimisation turns conv inputs channels-last; on CPU that made oneDNN's
            # convolution backward 1.8x slower here (float RetinaNet-like stack, AVX2), more than the
            # whole fusion gains. GPUs keep it (tensor cores want channels-last).
            options.setdefault("layout_optimization", False)
        if options:
            kwargs["options"] = options
        return torch.compile(fn, **kwargs)

    def give_up(self, unit: str, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = f"{unit}: {_cause(exc)}"
        backend = (
            self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        )
        message = (
            f"model_quantization: torch.compile ({backend}) failed in {self.failure}; training and inference "
            f"go on eagerly (same results, without the compiled speed-up) for "
            f"{', '.join(self.units) or unit}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning("%s", message)


def _tracing_for_export() -> bool:
    """Inside another tracer (torch.export, ONNX export, jit trace, an outer torch.compile): stay eager."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())


class CompiledForward:
    """The ``forward`` of a compiled unit: compiled once its quantizers are ready, eager otherwise.

    Installed as the instance attribute ``forward`` of the unit (``nn.Module.__call__`` looks it up there
    first), so the class's forward, hooks and state are untouched. Picklable and deep-copyable: a copy
    compiles its own module afresh.
    """

    def __init__(self, module: nn.Module, name: str, group: CompileGroup) -> None:
        self.module = module
        self.name = name
        self.group = group
        self.compiled_calls = 0
        self.eager_calls = 0
        self._compiled: Callable | None = None
        self._quantizers: list[Quantizer] | None = None

    # ------------------------------------------------------------------------------------------- state

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # compiled code is bound to this very module; a copy compiles its own
        state["_quantizers"] = None
        return state

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """The class's own forward, looked up at call time (conversion may swap the class after wrapping)."""
        return type(self.module).forward(self.module, *args, **kwargs)

    def quantizers(self) -> list[Quantizer]:
        """The enabled quantizers inside the unit (found on the first call, after conversion)."""
        if self._quantizers is None:
            self._quantizers = [m for m in self.module.modules() if isinstance(m, Quantizer) and m.enabled]
        return self._quantizers

    def ready(self) -> bool:
        """Whether the compiled code may run: every quantizer initialised, none calibrating, no failure."""
        if self.group.failure is not None or _tracing_for_export():
            return False
        return all(q.is_initialized and not q.calibrating for q in self.quantizers())

    # ------------------------------------------------------------------------------------------- call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.ready():
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        if self._compiled is None:
            device = next((p.device for p in self.module.parameters()), None)
            self._compiled = self.group.compile(
                types.MethodType(type(self.module).forward, self.module), device
            )
        try:
            # Compile backward with the forward so that a backend failure surfaces here, where the step
            # can still run eagerly, instead of inside loss.backward().
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                out = self._compiled(*args, **kwargs)
        except Exception as exc:
            # Compilation fails before the graph runs, so nothing was applied twice; if the eager call
            # fails too, the error is the model's own, not the compiler's.
            out = self.eager(*args, **kwargs)
            self.group.give_up(self.name, exc)
            self.eager_calls += 1
            return out
        self.compiled_calls += 1
        return out

    def __repr__(self) -> str:
        state = f"failed ({self.group.failure})" if self.group.failure else "ok"
        return (
            f"CompiledForward({self.name}, {state}, compiled calls={self.compiled_calls}, "
            f"eager calls={self.eager_calls})"
        )


def compile_modules(
    units: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]],
    *,
    backend: str | Callable | None = None,
    dynamic: bool | None = None,
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> CompileGroup:
    """Compile the forward of each unit in place (see the module docstring); returns their group.

    Args:
        units: qualified name -> module, e.g. ``{"backbone": model.backbone, "head": model.head}``. A unit
            that is already compiled is an error (compile the parent, or uncompile first).
        backend, dynamic, mode, options: ``torch.compile``'s (``backend`` defaults to
            :func:`default_backend`; ``dynamic=None``: shapes become dynamic after the first change).
    """
    group = CompileGroup(backend, dynamic=dynamic, mode=mode, options=options)
    items = list(units.items()) if isinstance(units, Mapping) else list(units)
    for name, module in items:
        if isinstance(module.__dict__.get("forward"), CompiledForward):
            raise ValueError(f"{name} is already compiled")
        inner = compiled_units(module)
        if inner:
            raise ValueError(f"{name} contains compiled units ({', '.join(inner)}); compile one or the other")
    for name, module in items:
        wrapper = CompiledForward(module, name, group)
        module.forward = wrapper
        group.units[name] = wrapper
    return group


def compiled_units(model: nn.Module) -> dict[str, CompiledForward]:
    """Qualified module name (relative to ``model``) -> the :class:`CompiledForward` of each compiled unit."""
    return {
        name: module.__dict__["forward"]
        for name, module in model.named_modules()
        if isinstance(module.__dict__.get("forward"), CompiledForward)
    }


def uncompile(model: nn.Module) -> int:
    """Restore the class's forward on every compiled unit in ``model``; returns how many there were."""
    found = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CompiledForward):
            del module.__dict__["forward"]
            found += 1
    return found
