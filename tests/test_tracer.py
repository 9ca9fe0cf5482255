"""The tracer on the idioms real supernets are written in, and on what it must refuse."""
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

from helpers import arch_tensors, assert_same_step, logits_of
from supernets import FOREIGN, IDIOMS, UNTRACEABLE
from topo_compiler import TraceError, compile_supernet, find_mixed_ops, lift, trace_supernet


def _extra_alphas(model, idiom_or_net):
    """Alphas held outside parameters() (plain tensors, buffers) and need their gradients."""
    params = {id(p) for p in model.parameters()}
    return [a for a in arch_tensors(model) if id(a) not in params]


def _compile_quiet(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, args, passes=(), **kw)


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_round_trip(name):
    """Each idiom traces; outputs and gradients (weights, input, alphas) match eager."""
    idiom = IDIOMS[name]
    model = idiom.factory()
    args = idiom.example_inputs()
    compiled = _compile_quiet(model, args)
    assert len(compiled.report.mixed_ops) == idiom.num_mixed_ops
    assert_same_step(model, compiled, args, _extra_alphas(model, idiom))


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_other_batch_size(name):
    """Shapes come from the example, but the batch size is not baked in."""
    idiom = IDIOMS[name]
    model = idiom.factory().eval()
    compiled = _compile_quiet(model, idiom.example_inputs(batch_size=2))
    args = idiom.example_inputs(batch_size=5)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled(*args)), logits_of(model(*args)))


@pytest.mark.parametrize("name", ["alphas_parameter", "alphas_buffer", "alphas_plain_tensor",
                                  "weights_forward_arg"])
def test_alphas_stay_live(name):
    """Changing alpha after compiling changes the output, as in the eager model; gradients
    reach alpha however it is held."""
    idiom = IDIOMS[name]
    model = idiom.factory().eval()
    args = idiom.example_inputs()
    compiled = _compile_quiet(model, args)
    before = logits_of(compiled(*args)).detach()
    if idiom.weight_args:
        (pos,) = idiom.weight_args
        alphas = args[pos]
    else:
        (alphas,) = arch_tensors(model)[:1]
    with torch.no_grad():
        alphas.add_(torch.randn_like(alphas))
    after = logits_of(compiled(*args))
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, logits_of(model(*args)))
    if alphas.requires_grad:
        alphas.grad = None
        after.sum().backward()
        assert alphas.grad is not None and alphas.grad.abs().sum() > 0


def test_plain_fx_freezes_plain_tensor_alphas_and_we_do_not():
    """The motivating bug: plain fx computes softmax(alpha) once when alpha is a plain
    requires-grad tensor (DARTS's original code); our trace reads alpha on every call."""
    net = FOREIGN["darts_original"]
    model = net.build().eval()
    (x,) = net.example_inputs()
    frozen = fx.symbolic_trace(model)
    compiled = _compile_quiet(model, (x,))
    with torch.no_grad():
        for a in net.get_alphas(model):
            a.mul_(50.0)
        want = model(x)
        assert not torch.allclose(frozen(x), want, atol=1e-3)
        torch.testing.assert_close(compiled(x), want)


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_supernets(name):
    """Supernets written like DARTS, PC-DARTS, AutoDL NB201/GDAS and NNI trace, lift and
    lower to the same function, and every mixed op is found."""
    net = FOREIGN[name]
    model = net.build()
    args = net.example_inputs()
    compiled = _compile_quiet(model, args)
    assert len(compiled.report.mixed_ops) == net.num_mixed_ops
    extra = [a for a in (net.get_alphas(model) if net.get_alphas else [])
             if id(a) not in {id(p) for p in model.parameters()}]
    assert_same_step(model, compiled, args, extra)


@pytest.mark.parametrize("name", sorted(UNTRACEABLE))
def test_untraceable_constructs_raise_trace_error(name):
    """Value-dependent branching, .item() control flow and trace-time random sampling raise a
    TraceError naming the module, the source line and the way out -- never a silently
    specialised graph."""
    case = UNTRACEABLE[name]
    model = case.factory()
    with pytest.raises(TraceError) as info:
        compile_supernet(model, case.example_inputs(), passes=(), partial=False)
    err = info.value
    message = str(err)
    assert case.culprit_substring in message
    assert err.module_path is not None and "in module `" in message
    assert "way out:" in message and "leaf" in message


def test_leaf_module_is_the_way_out():
    """The error names the module whose forward branches on a tensor value; marking that
    module as a leaf (by class or by path) makes the model traceable and equivalent."""
    class Pruned(nn.Module):  # drops candidates whose weight is tiny: value-dependent
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Identity()])

        def forward(self, x, w):
            out = 0
            for wi, op in zip(w, self.ops):
                if wi > 1e-3:
                    out = out + wi * op(x)
            return out

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.edge = Pruned()
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.edge(x, self.alpha.softmax(0))

    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(TraceError) as info:
        trace_supernet(Net(), x)
    assert info.value.module_path == "edge" and "Pruned" in str(info.value)
    assert "leaf_modules=['edge']" in str(info.value)
    model = Net()
    for leaf in ([Pruned], ["edge"]):
        compiled = _compile_quiet(model, x, leaf_modules=leaf)
        torch.testing.assert_close(compiled(x), model(x))


def test_user_leaf_by_name_and_type():
    class Cand(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Cand(), Cand()
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            w = self.alpha.softmax(0)
            return w[0] * self.a(x) + w[1] * self.b(x)

    x = torch.randn(2, 4, 6, 6)
    traced = trace_supernet(Net(), x, leaf_modules=[Cand])
    assert {"a", "b"} <= traced.leaf_paths
    traced = trace_supernet(Net(), x, leaf_modules=["a"])
    assert "a" in traced.leaf_paths and "b" not in traced.leaf_paths
    assert "b.conv" in traced.leaf_paths
    with pytest.raises(TypeError, match="leaf_modules"):
        trace_supernet(Net(), x, leaf_modules=[3])


def test_meta_values_and_sources_recorded():
    """Every traced value carries its shape from the example inputs and where it came from."""
    idiom = IDIOMS["shape_arithmetic"]
    model = idiom.factory()
    traced = trace_supernet(model, idiom.example_inputs())
    ir = lift(traced)
    (op,) = find_mixed_ops(ir)
    x = ir.node(op.input)
    assert x.shape is not None and x.shape[0] == 2
    assert all(ir.node(n).source is not None for n in op.sum_nodes)
    sizes = [n for n in ir.nodes() if n.desc.op == "size"]
    assert sizes, "x.size(1) stays a graph node (symbolic), not a baked constant"


def test_shape_branch_is_recorded_as_specialization():
    idiom = IDIOMS["shape_comparison"]
    compiled = _compile_quiet(idiom.factory(), idiom.example_inputs())
    assert any("shape" in s or "eq" in s for s in compiled.report.specializations)


def test_shape_error_in_model_names_module():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(TraceError, match="conv") as info:
        trace_supernet(Broken(), torch.randn(2, 5, 8, 8))
    assert "example_inputs" in str(info.value)


def test_example_inputs_must_fit_the_signature():
    idiom = IDIOMS["weights_forward_arg"]
    model = idiom.factory()
    x, _w = idiom.example_inputs()
    with pytest.raises(TypeError, match="lacks a value"):
        trace_supernet(model, (x,))
    with pytest.raises(TypeError, match="positional"):
        trace_supernet(model, (x, _w, x))


def test_varargs_forward_is_refused_with_a_way_out():
    class VarArgs(nn.Module):
        def forward(self, *xs):
            return xs[0]

    with pytest.raises(TraceError, match="wrap the model"):
        trace_supernet(VarArgs(), torch.randn(1))


def test_non_tensor_inputs_are_baked_and_reported():
    class Tau(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x, tau: float = 1.0):
            w = (self.alpha / tau).softmax(0)
            return w[0] * x.relu() + w[1] * x.sigmoid()

    compiled = _compile_quiet(Tau(), (torch.randn(2, 3), 0.5))
    assert compiled.report.baked_inputs == {"tau": "0.5"}


def test_baked_list_and_tuple_inputs_bind_each_item():
    """Single-path supernets take the sampled architecture as a list (SPOS, FairNAS): fx makes
    one placeholder per item, and each must see its own value, not the whole list."""
    class SinglePath(nn.Module):
        def __init__(self):
            super().__init__()
            self.choices = nn.ModuleList([nn.ModuleList([nn.Conv2d(3, 3, k, padding=k // 2)
                                                         for k in (1, 3, 5)])
                                          for _ in range(2)])

        def forward(self, x, architecture, scale):
            for layer, choice in zip(self.choices, architecture):
                x = layer[choice](x) * scale[0] + scale[1]
            return x

    model, x = SinglePath(), torch.randn(2, 3, 8, 8)
    compiled = _compile_quiet(model, (x, [2, 0], (2, 1)))
    torch.testing.assert_close(compiled(x, [2, 0], (2, 1)), model(x, [2, 0], (2, 1)))
    assert compiled.report.baked_inputs == {"architecture": "[2, 0]", "scale": "(2, 1)"}

    class Defaulted(SinglePath):
        def forward(self, x, architecture, scale=(2, 1)):
            return super().forward(x, architecture, scale)

    with pytest.raises(TraceError, match="container argument.*architecture.*scale"):
        trace_supernet(Defaulted(), (x, [2, 0]))

