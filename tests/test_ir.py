"""lift -> lower round trips, canonical descriptors and the IR verifier."""
import inspect
import operator

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import strategies
from helpers import assert_same_step
from topo_compiler import (IRVerificationError, SupernetIR, compile_supernet, lift, lower,
                           trace_supernet)
from topo_compiler.descriptors import Kind, OpDesc, Ref
from topo_compiler.spaces import build, default_input

SMALL = {"darts": dict(C=4, layers=3), "nb201": dict(C=4, layers=1),
         "wide": dict(C=4, layers=2)}


@pytest.mark.parametrize("space", sorted(SMALL))
def test_builtin_space_round_trip(space):
    """Lift then lower with no passes: same outputs and gradients w.r.t. input, weights and
    alphas, in training mode (BatchNorm batch statistics)."""
    model = build(space, **SMALL[space])
    x = default_input(space, resolution=8, **SMALL[space])
    compiled = compile_supernet(model, x, passes=())
    assert_same_step(model, compiled, (x,))


@given(strategies.cell_specs())
def test_random_cells_round_trip(spec):
    """Hypothesis-generated supernets (random candidate chains, widths, strides, alphas)."""
    model, x = strategies.build(spec)
    compiled = compile_supernet(model, x, passes=())
    assert len(compiled.report.mixed_ops) == len(spec.strides)
    assert_same_step(model, compiled, (x,))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_ir_is_a_wrapped_digraph_with_typed_nodes():
    model = build("darts", C=4, layers=1)
    ir = lift(trace_supernet(model, default_input("darts", resolution=8)))
    assert isinstance(ir.graph, nx.DiGraph) and not isinstance(ir, nx.DiGraph)
    for name in ir.topological_order():
        node = ir.node(name)
        assert isinstance(node.desc, OpDesc) and node.name == name
        assert set(node.inputs) == set(ir.graph.predecessors(name))
    convs = [n for n in ir.nodes() if n.kind is Kind.CONV]
    assert convs and all(n.shape is not None and n.dtype == torch.float32 for n in convs)
    assert all(n.desc.params for n in convs), "module descriptors name the parameters read"


def test_lowering_is_stable_and_readable():
    model = build("nb201", C=4, layers=1)
    x = default_input("nb201", resolution=8)
    a = compile_supernet(model, x, passes=()).code
    b = compile_supernet(model, x, passes=()).code
    assert a == b
    (arg,) = inspect.signature(model.forward).parameters
    assert f"def forward(self, {arg})" in a
    # modules are reached through one attribute named after their path, not a getattr chain
    assert "softmax" in a and "self._cells_0_" in a and "getattr(" not in a


def _desc_of(fn):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            if isinstance(fn, nn.Module):
                self.fn = fn
            else:
                self.__dict__["fn"] = fn

        def forward(self, x):
            return self.fn(x)

    ir = lift(trace_supernet(M(), torch.randn(2, 3, 6, 6)))
    (node,) = [n for n in ir.nodes() if n.opcode not in ("placeholder", "output", "get_attr")
               and n.kind is not Kind.SHAPE]
    return node.desc


def test_descriptors_normalise_functional_and_method_forms():
    relu = {_desc_of(nn.ReLU()), _desc_of(F.relu), _desc_of(lambda x: x.relu()),
            _desc_of(torch.relu), _desc_of(nn.ReLU(inplace=True))}
    assert len({d.signature for d in relu}) == 1
    assert next(iter(relu)).kind is Kind.ACT
    inplace = [_desc_of(nn.ReLU(inplace=True)), _desc_of(lambda x: F.relu(x, inplace=True)),
               _desc_of(lambda x: F.relu(x, True)), _desc_of(lambda x: x.relu_())]
    assert all(d.inplace for d in inplace)
    out_of_place = [_desc_of(nn.ReLU()), _desc_of(F.relu), _desc_of(lambda x: x.relu()),
                    _desc_of(lambda x: F.relu(x, inplace=False))]
    assert not any(d.inplace for d in out_of_place)
    pools = [_desc_of(nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
             _desc_of(lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
             _desc_of(lambda x: F.avg_pool2d(x, (3, 3), stride=1, padding=(1, 1),
                                              count_include_pad=False))]
    assert len({d.signature for d in pools}) == 1
    assert pools[0].hparam("kernel_size") == (3, 3)
    assert _desc_of(nn.AvgPool2d(3, 1, 1)).signature != pools[0].signature
    maxes = [_desc_of(nn.MaxPool2d(3, 1, 1)), _desc_of(lambda x: F.max_pool2d(x, 3, 1, 1))]
    assert maxes[0].signature == maxes[1].signature
    assert _desc_of(lambda x: x.mul(0.)).kind is Kind.ZERO
    assert _desc_of(lambda x: x * 2.0).kind is Kind.ARITH


def test_modules_with_other_parameters_differ():
    a, b = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.a(x) + self.b(x) + self.a(x)

    ir = lift(trace_supernet(M(), torch.randn(1, 3, 5, 5)))
    convs = [n for n in ir.nodes() if n.kind is Kind.CONV]
    assert convs[0].desc.signature == convs[2].desc.signature
    assert convs[0].desc.signature != convs[1].desc.signature


def _small_ir():
    model = build("darts", C=4, layers=1)
    return lift(trace_supernet(model, default_input("darts", resolution=8)))


def test_verifier_catches_broken_invariants():
    ir = _small_ir()
    ir.verify()
    some = next(n for n in ir.nodes() if n.desc.op == "mul")
    ir.graph.remove_edge(some.inputs[0], some.name)
    with pytest.raises(IRVerificationError, match="edges"):
        ir.verify("test")
    ir = _small_ir()
    some = next(n for n in ir.nodes() if n.desc.op == "mul")
    assert some.inputs  # read once, so a cached answer exists to go stale
    some.kwargs["alpha"] = Ref(ir.placeholders()[0].name)  # an edit behind the IR's back
    with pytest.raises(IRVerificationError, match="edges"):
        ir.verify("test")
    ir = _small_ir()
    out = ir.output()
    ir.graph.add_edge(out.name, ir.placeholders()[0].name)
    with pytest.raises(IRVerificationError):
        ir.verify()


def test_ir_edits_keep_edges_and_meta_consistent():
    ir = _small_ir()
    x = ir.placeholders()[0]
    stem = ir.users(x.name)[0]
    double = ir.add_node("call_function", operator.mul, (Ref(stem), 2.0), origin="test")
    assert double.shape == ir.node(stem).shape
    user = next(u for u in ir.users(stem) if u != double.name)
    ir.replace_all_uses(stem, double.name, skip=[double.name])
    assert ir.users(stem) == [double.name]
    assert double.name in ir.node(user).inputs
    ir.verify()
    with pytest.raises(IRVerificationError, match="still read"):
        ir.remove_node(double.name)
    with pytest.raises(IRVerificationError, match="unknown node"):
        ir.add_node("call_function", operator.add, (Ref("nope"), 1))
    with pytest.raises(IRVerificationError, match="fails on its inputs"):
        ir.add_node("call_function", torch.cat, ([Ref(stem), Ref(x.name)],), {"dim": 2})
    gm = lower(ir)
    assert "mul" in gm.code


def test_compiled_shares_modules_and_state_dict_keys():
    model = build("darts", C=4, layers=2)
    x = default_input("darts", resolution=8)
    compiled = compile_supernet(model, x, passes=())
    assert list(compiled.state_dict()) == list(model.state_dict())
    ours = {id(p) for p in compiled.parameters()}
    assert ours == {id(p) for p in model.parameters()}
    assert compiled.get_submodule("cells.0._ops.0._ops.4.op.1") is \
        model.get_submodule("cells.0._ops.0._ops.4.op.1")


def test_supernet_ir_public_surface():
    ir = _small_ir()
    assert isinstance(ir, SupernetIR) and len(ir) == ir.graph.number_of_nodes()
    assert ir.output().opcode == "output"
    forward_args = list(inspect.signature(build("darts", C=4, layers=1).forward).parameters)
    assert [p.target for p in ir.placeholders()] == forward_args
