"""Small building blocks shared by the heads: conv + norm + activation, and weight fills."""

from typing import Optional

import torch
from detectron2.layers import get_norm
from torch import nn

__all__ = ["ConvNormAct", "msra_fill", "xavier_fill"]


def msra_fill(module: nn.Module) -> None:
    """He (fan-out, ReLU) normal weights, zero bias: detectron2's ``c2_msra_fill``."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill (uniform, fan-in), zero bias: detectron2's ``c2_xavier_fill``."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class ConvNormAct(nn.Conv2d):
    """A 3x3 conv with an optional ``.norm`` (named as in detectron2's Conv2d) and a ReLU.

    Left with PyTorch's default initialisation: the heads fill their layers once all are built,
    in detectron2's order, so that one seed gives both models the same initial weights.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "", relu: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm)
        self.norm: Optional[nn.Module] = get_norm(norm, out_channels) if norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return torch.relu(x) if self.relu else x
