"""Mixed-op analysis: every weighted sum of candidates reading one input, and nothing else."""
import pytest
import torch
from torch import nn

from supernets import FOREIGN
from topo_compiler import find_mixed_ops, lift, trace_supernet
from topo_compiler.spaces import build, default_input


def _ops(model, *args):
    return find_mixed_ops(lift(trace_supernet(model, args)))


def test_darts_8_cells_has_112_mixed_ops():
    model = build("darts", C=2, layers=8)
    ops = _ops(model, default_input("darts", resolution=8))
    assert len(ops) == 112 == model.num_mixed_ops
    assert len({o.name for o in ops}) == 112
    assert ops[0].name == "cells.0._ops.0"
    first = ops[0]
    assert [c.kind for c in first.candidates] == ["zero", "op", "op", "identity", "op", "op",
                                                   "op", "op"]
    assert all(c.weight.index is None for c in first.candidates)


@pytest.mark.parametrize("space,layers,expected", [("nb201", 1, 18), ("wide", 2, 28)])
def test_builtin_spaces_mixed_op_counts(space, layers, expected):
    model = build(space, C=4, layers=layers)
    assert len(_ops(model, default_input(space, resolution=8))) == expected == \
        model.num_mixed_ops


def test_pc_darts_edge_normalisation_is_not_a_mixed_op():
    """PC-DARTS weights each edge's output by beta and sums over edges: weighted, but over
    different inputs, so only the 27 inner mixed ops are found (each on its channel slice)."""
    net = FOREIGN["pc_darts"]
    ops = _ops(net.build(), *net.example_inputs())
    assert len(ops) == net.num_mixed_ops
    ir = lift(trace_supernet(net.build(), net.example_inputs()))
    for op in find_mixed_ops(ir):
        assert ir.node(op.input).desc.op == "getitem", "the partial-channel slice x[:, :C//k]"


def test_residual_and_cell_sums_are_not_mixed_ops():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x, y):
            w = self.alpha.softmax(0)
            residual = x + self.a(x)                    # unweighted: residual add
            across = w[0] * self.a(x) + w[1] * self.b(y)  # weighted, but two inputs
            mixed = w[0] * self.a(x) + w[1] * self.b(x)   # the one mixed op
            scaled = 2.0 * x + 3.0 * self.b(x)          # literal weights, not one-element nodes
            return residual + across + mixed + scaled

    x = torch.randn(2, 4, 6, 6)
    ops = _ops(Net(), x, torch.randn(2, 4, 6, 6))
    assert len(ops) == 1
    assert len(ops[0].candidates) == 2


def test_weight_that_depends_on_the_input_is_not_an_architecture_weight():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            g = x.mean().sigmoid()              # data-dependent gate: not a mixed op weight
            return g * self.a(x) + (1 - g) * self.b(x)

    assert _ops(Attention(), torch.randn(2, 4, 5, 5)) == []


def test_stack_form_and_candidate_branches():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
                                      nn.Identity(), nn.MaxPool2d(3, 1, 1)])
            self.alpha = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            w = self.alpha.softmax(-1)
            out = torch.stack([op(x) for op in self.ops])
            return (out * w.view(-1, 1, 1, 1, 1)).sum(0)

    ir = lift(trace_supernet(Stack(), torch.randn(2, 4, 5, 5)))
    (op,) = find_mixed_ops(ir)
    assert op.form == "stack" and len(op.candidates) == 3
    assert [c.weight.index for c in op.candidates] == [0, 1, 2]
    relu_conv, ident, pool = op.candidates
    assert [ir.node(n).desc.op for n in relu_conv.branch] == ["relu", "conv2d"]
    assert ident.kind == "identity"
    assert [ir.node(n).desc.op for n in pool.branch] == ["max_pool2d"]
    assert ir.node(op.output).desc.op == "sum"


def test_mixed_op_nodes_are_exclusive_to_candidates():
    model = build("nb201", C=4, layers=1)
    ir = lift(trace_supernet(model, default_input("nb201", resolution=8)))
    ops = find_mixed_ops(ir)
    seen = set()
    for op in ops:
        for c in op.candidates:
            for n in c.branch:
                assert n not in seen
                seen.add(n)
                assert set(ir.users(n)) <= set(c.branch) | {c.term}
        assert op.output in op.sum_nodes
        assert ir.node(op.output).desc.op == "add"
