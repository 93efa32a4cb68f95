"""Where the C++ ops' autograd lives: in C++ (csrc/autograd.cpp) when the extension is built, so
no Python runs on a call's path, and in Python when it is not. Both give torch's gradients; a
call that needs no gradient records no graph."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import _ext
from helpers import randn, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(_ext.cpu_reason() is not None, reason=str(_ext.cpu_reason()))


@needs_ext
def test_cpp_autograd_is_registered():
    assert dk._ext.build_info()["cpp_autograd"] is True
    x = randn(1, 4, 5, 5).requires_grad_(True)
    w = randn(3, 4, 3, 3)
    assert "FusedConv2dFn" in dk.fused_conv2d(x, w, backend="cpu").grad_fn.name()
    assert "AddReLUFn" in dk.add_relu(x, x, backend="cpu").grad_fn.name()


@needs_ext
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (False, False, True),
                                                (True, False, False), (False, True, False)])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_grads_match_torch(gen, bias, residual, relu, stride):
    """Gradients of every input, against autograd through plain torch in float64."""
    x = randn(2, 5, 9, 7, gen=gen)
    w = randn(6, 5, 3, 3, gen=gen, scale=0.3)
    b = randn(6, gen=gen) if bias else None
    Ho, Wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    r = randn(2, 6, Ho, Wo, gen=gen) if residual else None
    ins = [t for t in (x, w, b, r) if t is not None]
    for t in ins:
        t.requires_grad_(True)
    go = randn(2, 6, Ho, Wo, gen=gen)
    y = dk.fused_conv2d(x, w, b, stride=stride, residual=r, relu=relu, backend="cpu")
    grads = torch.autograd.grad(y, ins, go)

    d = [t.detach().double().requires_grad_(True) for t in ins]
    xd, wd = d[0], d[1]
    bd = d[2] if bias else None
    rd = d[-1] if residual else None
    yd = F.conv2d(xd, wd, bd, stride, 1)
    if rd is not None:
        yd = yd + rd
    yd = torch.relu(yd) if relu else yd
    want = torch.autograd.grad(yd, d, go.double())
    for g, gw in zip(grads, want):
        assert rel_err(g, gw) <= 1e-5


@needs_ext
def test_add_relu_grads_and_zero_grad_at_masked(gen):
    x = randn(3, 7, 5, gen=gen).requires_grad_(True)
    y = randn(3, 7, 5, gen=gen).requires_grad_(True)
    out = dk.add_relu(x, y, backend="cpu")
    go = randn(3, 7, 5, gen=gen)
    gx, gy = torch.autograd.grad(out, (x, y), go)
    want = go * ((x + y) > 0)
    assert torch.equal(gx, want) and torch.equal(gy, want)


@needs_ext
def test_only_the_inputs_that_need_grad_get_one(gen):
    x = randn(1, 4, 6, 6, gen=gen)
    w = randn(4, 4, 3, 3, gen=gen).requires_grad_(True)
    r = randn(1, 4, 6, 6, gen=gen)
    y = dk.fused_conv2d(x, w, residual=r, backend="cpu")
    y.sum().backward()
    assert w.grad is not None and x.grad is None and r.grad is None


@needs_ext
def test_no_graph_without_grad(gen):
    x = randn(1, 4, 6, 6, gen=gen).requires_grad_(True)
    w = randn(4, 4, 3, 3, gen=gen)
    with torch.no_grad():
        assert dk.fused_conv2d(x, w, backend="cpu").grad_fn is None
    with torch.inference_mode():
        assert not dk.fused_conv2d(x, w, backend="cpu").requires_grad
    assert dk.fused_conv2d(x.detach(), w, backend="cpu").grad_fn is None


def test_python_autograd_without_the_extension():
    """DEEPARCH_NO_EXTENSION=1: the schemas still have an autograd kernel (Python's), the C++
    backends say why they are off, and the other backends still differentiate."""
    code = textwrap.dedent("""
        import torch, deeparch_kernels as dk
        for op in ("deeparch::fused_conv2d", "deeparch::add_relu"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"), op
        dump = torch._C._dispatch_dump("deeparch::fused_conv2d")
        assert "autograd.cpp" not in dump, dump
        av = dk.available_backends()
        assert "DEEPARCH_NO_EXTENSION" in str(av), av
        x = torch.randn(2, 3, requires_grad=True)
        dk.add_relu(x, x, backend="aten").sum().backward()
        assert x.grad is not None
        print("ok")
    """)
    env = dict(os.environ, DEEPARCH_NO_EXTENSION="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


@needs_ext
def test_double_backward_matches_torch(gen):
    """create_graph=True: d/dw of <dL/dx, v>, through the C++ backward, against float64 torch."""
    x = randn(1, 4, 6, 5, gen=gen)
    w = randn(5, 4, 3, 3, gen=gen, scale=0.3)
    b = randn(5, gen=gen)
    r = randn(1, 5, 6, 5, gen=gen)
    go, v = randn(1, 5, 6, 5, gen=gen), randn(1, 4, 6, 5, gen=gen)

    def second_order(conv, x, w, b, r):
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        y = conv(x, w, b, r)
        (gx,) = torch.autograd.grad(y, x, go.to(y.dtype), create_graph=True)
        (gw,) = torch.autograd.grad((gx * v.to(gx.dtype)).sum(), w)
        return gx, gw

    ours = second_order(lambda x, w, b, r: dk.fused_conv2d(x, w, b, residual=r, backend="cpu"),
                        x, w, b, r)
    ref = second_order(lambda x, w, b, r: torch.relu(F.conv2d(x, w, b, 1, 1) + r),
                       x.double(), w.double(), b.double(), r.double())
    for a, e in zip(ours, ref):
        assert rel_err(a, e) <= 1e-5
