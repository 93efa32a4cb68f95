"""``ExactReLU``: torch.nn.ReLU whose result stays torch's under torch.compile, NaN included.

Under torch.compile with inductor's freezing on the CPU, inductor folds a ReLU that follows a
linear layer it hands to oneDNN (bf16; fp32 linears go to MKL) into oneDNN's post-op, which turns
NaN into 0: a bf16 VGG's classifier (Linear -> ReLU) then hides a NaN that eager PyTorch puts in
the logits. ExactReLU is an nn.ReLU (same constructor, ``inplace``, no state) that, while such a
graph is traced, records the ReLU as deeparch::relu_, which inductor can't fold; everywhere else
it is ``F.relu``. fuse() and the VGG builders put it after every Linear in an nn.Sequential; the
convolutions' own ReLUs are the fused ops' (ops/conv.py).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.add_relu import inductor_folds_relu
from ._torchscript import NoTorchScript
from .common import is_relu, rebuild_as

__all__ = ["ExactReLU", "exact_relus_after_linears"]


class ExactReLU(NoTorchScript, nn.ReLU):
    """torch.nn.ReLU, also under torch.compile with inductor's freezing (NaN kept, see above)."""

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy) and inductor_folds_relu(x):  # (fx: traced as F.relu)
            y = x if self.inplace else x.clone()
            torch.ops.deeparch.relu_(y)
            return y
        return F.relu(x, inplace=self.inplace)


def exact_relus_after_linears(seq: nn.Sequential) -> list:
    """Each torch nn.ReLU right after an nn.Linear in ``seq`` becomes an ExactReLU (the same
    module's attributes and hooks: rebuild_as); returns the names replaced."""
    names, mods = list(seq._modules), list(seq._modules.values())
    done = []
    for i in range(1, len(mods)):
        if is_relu(mods[i]) and type(mods[i - 1]) is nn.Linear:
            setattr(seq, names[i], rebuild_as(ExactReLU, mods[i]))
            done.append(names[i])
    return done
