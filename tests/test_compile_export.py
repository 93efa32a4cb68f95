"""torch.compile(fullgraph=True) and torch.export of a small fused ResNet: no graph break from the
fused modules or ops, the fused convolutions (with the residual) in the graph, the same outputs
as eager."""
import pytest
import torch

from deeparch_kernels.models import FusedResNet
from deeparch_kernels.nn import FusedBasicBlock, FusedBottleneck
from deeparch_kernels.verify import randomize_batchnorm
from helpers import rel_err


def _tiny_resnet(block=FusedBasicBlock, seed=0):
    torch.manual_seed(seed)
    m = FusedResNet(block, [1, 1, 1, 1], num_classes=10, backend="cpu")
    return randomize_batchnorm(m, torch.Generator().manual_seed(seed))


def _x(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fused_conv_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "fused_conv2d" in str(n.target)]


def test_compile_fullgraph_inductor_eval():
    m, x = _tiny_resnet().eval(), _x()
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x)
        out = torch.compile(m, fullgraph=True)(x)
    assert rel_err(out, want) <= 1e-5


def test_compile_fullgraph_graph_has_fused_ops_and_follows_new_weights():
    m, x = _tiny_resnet(FusedBottleneck, seed=1).eval(), _x(1)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=capture)
    with torch.no_grad():
        assert rel_err(compiled(x), m(x)) <= 1e-6
        nodes = _fused_conv_nodes(graphs[0])
        # stem + 4 blocks x 3 convs + 4 downsamples, each one fused conv; 4 carry the residual
        assert len(nodes) == 1 + 4 * 3 + 4
        assert sum(n.args[3] is not None for n in nodes) == 4
        # new weights loaded after compiling: the folded buffers are refreshed in place
        other = _tiny_resnet(FusedBottleneck, seed=2)
        m.load_state_dict(other.state_dict())
        other.eval()
        assert rel_err(compiled(x), other(x)) <= 1e-6


def test_compile_fullgraph_train_step_matches_eager():
    eager, x = _tiny_resnet(seed=3).train(), _x(3)
    compiled_model = _tiny_resnet(seed=3).train()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    out, want = compiled(x), eager(x)
    assert rel_err(out, want) <= 1e-5
    out.square().sum().backward(), want.square().sum().backward()
    for (n, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-4, n


def test_export_eval():
    m, x = _tiny_resnet(seed=4).eval(), _x(4)
    with torch.no_grad():
        want = m(x)
        ep = torch.export.export(m, (x,))
        out = ep.module()(x)
    assert rel_err(out, want) <= 1e-6
    nodes = _fused_conv_nodes(ep.graph_module)
    assert len(nodes) == 1 + 4 * 2 + 3 and sum(n.args[3] is not None for n in nodes) == 4
    assert not any(k.startswith("_fold") or "._fold_" in k for k in ep.state_dict)  # non-persistent
    x2 = _x(5)
    with torch.no_grad():
        assert rel_err(ep.module()(x2), m(x2)) <= 1e-6


@pytest.mark.parametrize("strict", [False, True])
def test_export_train_mode(strict):
    m, x = _tiny_resnet(seed=6).train(), _x(6)
    ep = torch.export.export(m, (x,), strict=strict)
    want = _tiny_resnet(seed=6).train()(x)
    assert rel_err(ep.module()(x), want) <= 1e-5
    assert any("add_relu" in str(n.target) for n in ep.graph.nodes)


def test_compile_fullgraph_vgg_bn_features():
    """FusedSequential (VGG-BN's features) traces without a graph break; its Conv -> BN -> ReLU
    runs are fused convolutions in the graph."""
    from deeparch_kernels.models import vgg11_bn

    torch.manual_seed(7)
    m = randomize_batchnorm(vgg11_bn(num_classes=10, backend="cpu"), torch.Generator().manual_seed(7)).eval()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = _x(7)
    with torch.no_grad():
        out = torch.compile(m.features, fullgraph=True, backend=capture)(x)
        assert rel_err(out, m.features(x)) <= 1e-6
    assert len(_fused_conv_nodes(graphs[0])) == 8
