"""The ``deeparch`` torch.library namespace, shared by the op files."""
import torch

lib = torch.library.Library("deeparch", "DEF")  # noqa: TOR901 - schemas are defined in Python

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


def check(cond: bool, op: str, msg: str, exc=ValueError) -> None:
    """Raise ``exc`` with '<op>: <msg>' unless cond."""
    if not cond:
        raise exc(f"{op}: {msg}")


def formats(t: torch.Tensor) -> frozenset:
    """The dense memory formats t is laid out in: a 4-D tensor can be both (C == 1, H == W == 1),
    either, or neither (a strided view)."""
    out = set()
    if t.is_contiguous():
        out.add("contiguous")
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        out.add("channels_last")
    return frozenset(out)


def check_same_format(op: str, ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    """Mixed dense memory formats are refused (a hidden layout copy, usually a model bug); a
    strided view is accepted and made dense by the op."""
    a, b = formats(ref), formats(t)
    if a and b and not (a & b):
        raise ValueError(f"{op}: {name} is {'/'.join(sorted(b))} but {ref_name} is "
                         f"{'/'.join(sorted(a))}; mixed memory formats are not supported: convert "
                         f"{name} with .contiguous(memory_format=...)")


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one block of memory with no gaps or overlaps, in some dim
    order (what a flat kernel can walk): the strides, sorted, are the running product of sizes."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
