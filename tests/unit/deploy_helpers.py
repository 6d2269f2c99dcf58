"""A detector-shaped toy network for the deploy tests (torch only): the structures the exporter must handle.

``ToyDetector`` has, in a few hundred thousand multiply-adds: a stem conv with its BN and ReLU inside its own
forward (like detectron2's ``Conv2d``) on a signed 8-bit input; a residual block whose sum is quantized
after the addition only (the conv before it has no quantizer after it); a shared head tower called once
per level with per-level BN (like detectron2's ``CycleBatchNormList``) whose input feeds nothing else;
a prediction conv whose outputs are the network's. Quantizers are initialised from data by
:func:`quantized_toy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_quantization import Add, QuantSpec, convert
from model_quantization.deploy import CONV_EPILOGUES, NORM_AFFINES
from model_quantization.deploy.lowering import Epilogue
from model_quantization.deploy.norms import batch_norm_affine

OUTPUTS = ("level0", "level1")


class NormConv2d(nn.Conv2d):
    """Like detectron2.layers.Conv2d: conv, then ``norm``, then ``activation``, inside forward."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class LevelBN(nn.ModuleList):
    """One BN per level, cycled call by call (detectron2's CycleBatchNormList, AdelaiDet's ModuleListDial)."""

    def __init__(self, levels: int, channels: int):
        super().__init__([nn.BatchNorm2d(channels) for _ in range(levels)])
        self.position = 0

    def forward(self, x):
        out = self[self.position](x)
        self.position = (self.position + 1) % len(self)
        return out


CONV_EPILOGUES.add(NormConv2d, lambda m: Epilogue(m.norm, m.activation))
NORM_AFFINES.add(
    LevelBN, lambda n: [batch_norm_affine(b.running_mean, b.running_var, b.eps, b.weight, b.bias) for b in n]
)


class ToyDetector(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 4):
        super().__init__()
        c = channels
        self.stem = NormConv2d(
            3, c, 3, stride=2, padding=1, bias=False, norm=nn.BatchNorm2d(c), activation=F.relu
        )
        self.conv1 = NormConv2d(c, c, 3, padding=1, bias=False, norm=nn.BatchNorm2d(c), activation=F.relu)
        self.conv2 = NormConv2d(c, c, 3, padding=1, bias=False, norm=nn.BatchNorm2d(c))
        self.residual_add = Add()
        self.tower = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), LevelBN(2, c), nn.ReLU())
        self.predict = nn.Conv2d(c, classes, 3, padding=1)

    def forward(self, image):
        x = self.stem((image - 110.0) / 60.0)
        x = F.relu(self.residual_add(self.conv2(self.conv1(x)), x))
        return tuple(self.predict(self.tower(level)) for level in (x, F.max_pool2d(x, 2)))


def toy_spec(method: str = "lsq", bits: int = 4) -> QuantSpec:
    """The project's mixed recipe on the toy: 8-bit signed stem input and sum, ``method``/``bits`` elsewhere.

    ``method`` names the activation method (weights: LSQ, except DoReFa with DoReFa and XNOR with binary).
    """
    weight_method = {"dorefa": "dorefa", "binary": "binary"}.get(method, "lsq")
    activation = {"method": method, "bits": 1 if method == "binary" else bits, "signed": method == "binary"}
    return QuantSpec.from_dict(
        {
            "weight": {"method": weight_method, "bits": 1 if method == "binary" else bits},
            "activation": activation,
            "rules": [
                {
                    "pattern": "stem",
                    "weight": {"method": "lsq", "bits": 8},
                    "activation": {"method": "lsq", "bits": 8, "signed": True},
                },
                {"pattern": "residual_add", "activation": {"method": "lsq", "bits": 8, "signed": True}},
            ],
        }
    )


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 255.0


def initialised(model: nn.Module) -> nn.Module:
    """``model`` with its quantizers and BN statistics set from 3 training batches, in eval mode."""
    model.train()
    with torch.no_grad():
        for step in range(3):
            model(images(4, seed=100 + step))
    return model.eval()


def quantized_toy(method: str = "lsq", bits: int = 4, seed: int = 0) -> nn.Module:
    """The toy, quantized with :func:`toy_spec`, its quantizers and BN statistics set from 3 batches."""
    torch.manual_seed(seed)
    model, _ = convert(ToyDetector(), toy_spec(method, bits))
    return initialised(model)
