"""``FusedAddReLU``: the residual join of a ResNet block, ``relu(x + identity)`` in one pass."""
import torch
from torch import nn

from ..ops.add_relu import add_relu, add_relu_


class FusedAddReLU(nn.Module):
    """``relu(x + identity)``; with ``inplace=True`` the result is written into x (torchvision's
    ``out += identity; out = relu(out)``). No parameters, so any state_dict is unaffected."""

    def __init__(self, inplace: bool = False, backend: str = "auto"):
        super().__init__()
        self.inplace = inplace
        self.backend = backend

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return add_relu_(x, identity, backend=self.backend)
        return add_relu(x, identity, backend=self.backend)

    def extra_repr(self) -> str:
        return f"inplace={self.inplace}, backend={self.backend!r}"
