"""TorchScript is refused by every fused module, at once, with what to use instead.

The modules pick a backend and fold BatchNorm in Python at each call, which TorchScript can't
compile (torch.jit.script) or record faithfully (torch.jit.trace would freeze the folds and the
backend choice as constants). PyTorch deprecates both for torch.compile and torch.export, which
take the fused ops as built-ins.
"""
import torch

_INSTEAD = ("use torch.compile(model) or torch.export.export(model, args) instead (both take "
            "the fused ops as built-ins; torch.jit.script/trace are deprecated by PyTorch)")


def torchscript_error(module: object, what: str) -> RuntimeError:
    return RuntimeError(f"{what} can't compile deeparch_kernels' {type(module).__name__}: its "
                        f"forward chooses a backend and folds BatchNorm in Python; {_INSTEAD}")


def refuse_jit_trace(module: object) -> None:
    """Raise at once when torch.jit.trace is running ``module``'s forward."""
    if torch.jit.is_tracing():
        raise torchscript_error(module, "torch.jit.trace")


class NoTorchScript:
    """Mixin: torch.jit.script calls ``__prepare_scriptable__`` on every module before compiling
    anything, so the refusal comes first and names the module."""

    def __prepare_scriptable__(self):
        raise torchscript_error(self, "torch.jit.script")
