"""``FusedAddReLU``: the residual join of a ResNet block, ``relu(x + identity)`` in one pass."""
import torch
import torch.fx
from torch import nn

from ..ops.add_relu import add_relu, add_relu_
from ._torchscript import NoTorchScript, refuse_jit_trace


def residual_add_relu(x: torch.Tensor, identity: torch.Tensor, inplace: bool,
                      backend: str) -> torch.Tensor:
    """``relu(x + identity)``, into x when ``inplace``: one node in a torch.fx graph."""
    if inplace:
        return add_relu_(x, identity, backend=backend)
    return add_relu(x, identity, backend=backend)


torch.fx.wrap("residual_add_relu")


class FusedAddReLU(NoTorchScript, nn.Module):
    """``relu(x + identity)``; with ``inplace=True`` the result is written into x (torchvision's
    ``out += identity; out = relu(out)``). No parameters, so any state_dict is unaffected."""

    def __init__(self, inplace: bool = False, backend: str = "auto"):
        super().__init__()
        self.inplace = inplace
        self.backend = backend

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        refuse_jit_trace(self)
        return residual_add_relu(x, identity, self.inplace, self.backend)

    def extra_repr(self) -> str:
        return f"inplace={self.inplace}, backend={self.backend!r}"
