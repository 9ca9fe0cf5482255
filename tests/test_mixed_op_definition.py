"""The definition of a mixed op (analysis docstring), tested at its boundary: every constant-zero
candidate counts, the sum, stack and stack-plus-slot forms are found, and sums over different
inputs or over edges are not mixed ops -- with the reason in ``declined_sums``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supernets import edge_norm, nni_layerchoice
from topo_compiler import compile_supernet, lift, trace_supernet
from topo_compiler.analysis import declined_sums, find_mixed_ops


def _analysed(model, *args):
    ir = lift(trace_supernet(model, args))
    return ir, find_mixed_ops(ir), declined_sums(ir)


class _Zeros(nn.Module):
    """A candidate that is constant zero, written one of the ways supernets write it."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x):
        if self.form == "mul":
            return x.mul(0.)
        if self.form == "strided":
            return x[:, :, ::1, ::1].mul(0.)
        if self.form == "zeros_like":
            return torch.zeros_like(x)
        if self.form == "new_zeros":
            return x.new_zeros(x.shape)
        raise ValueError(self.form)


class _SumEdge(nn.Module):
    def __init__(self, zero_form):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), _Zeros(zero_form),
                                  nn.Identity()])
        self.alpha = nn.Parameter(torch.randn(3))

    def forward(self, x):
        w = F.softmax(self.alpha, -1)
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


@pytest.mark.parametrize("zero_form", ["mul", "strided", "zeros_like", "new_zeros"])
def test_every_constant_zero_candidate_counts(zero_form):
    _, ops, declined = _analysed(_SumEdge(zero_form), torch.randn(2, 4, 6, 6))
    (op,) = ops
    assert [c.kind for c in op.candidates] == ["op", "zero", "identity"]
    assert op.form == "sum" and not declined


class _StackEdge(nn.Module):
    """Stack form, optionally with NNI's zero slot for ``none`` appended."""

    def __init__(self, slot):
        super().__init__()
        self.slot = slot
        self.ops = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, 1, 1)])
        self.alpha = nn.Parameter(torch.randn(3 if slot else 2))

    def forward(self, x):
        outs = torch.stack([op(x) for op in self.ops])
        if self.slot:
            outs = torch.cat([outs, torch.zeros_like(outs[:1])], 0)
        w = F.softmax(self.alpha, -1).view(-1, 1, 1, 1, 1)
        return (outs * w).sum(0)


@pytest.mark.parametrize("slot", [False, True], ids=["stack", "stack+slot"])
def test_stack_forms(slot):
    ir, ops, _ = _analysed(_StackEdge(slot), torch.randn(2, 4, 6, 6))
    (op,) = ops
    assert op.form == ("stack+slot" if slot else "stack")
    assert [c.weight.index for c in op.candidates] == list(range(3 if slot else 2))
    kinds = [c.kind for c in op.candidates]
    assert kinds == (["op", "op", "zero"] if slot else ["op", "op"])
    assert [c.slot for c in op.candidates] == [False, False] + [True] * slot
    assert ir.node(op.output).desc.op == "sum"
    if slot:  # the slot's nodes (cat, slice, zeros_like) belong to the summing nodes
        assert {ir.node(n).desc.op for n in op.sum_nodes} >= {"stack", "cat", "zeros_like"}


def test_nni_zero_slot_supernet_has_every_layer_choice():
    model = nni_layerchoice.build_none_slot()
    _, ops, declined = _analysed(model, *nni_layerchoice.example_inputs())
    assert len(ops) == nni_layerchoice.NUM_MIXED_OPS == 10
    for op in ops:
        assert op.form == "stack+slot" and len(op.candidates) == 8
        assert op.candidates[-1].slot and op.candidates[-1].kind == "zero"
    # the DartsInputChoices stack different nodes' edges: declined, and said why
    assert len(declined) == nni_layerchoice.NUM_INPUT_CHOICES
    assert all("branches read different inputs" in d.reason for d in declined)


def test_a_stack_feeding_anything_else_is_no_slot_form():
    class Leaky(_StackEdge):
        def forward(self, x):
            outs = torch.stack([op(x) for op in self.ops])
            cat = torch.cat([outs, torch.zeros_like(outs[:1])], 0)
            w = F.softmax(self.alpha, -1).view(-1, 1, 1, 1, 1)
            return (cat * w).sum(0) + outs.mean()

    _, ops, _ = _analysed(Leaky(True), torch.randn(2, 4, 6, 6))
    assert ops == []


# --- sums that are not mixed ops ----------------------------------------------------------

def test_edge_normalization_is_not_a_mixed_op():
    """``b0 * bn0(mixed0(s0)) + b1 * bn1(mixed1(s1))`` with s0, s1 read by nothing else:
    the exclusive branches reach back to one tensor, but each term is a whole edge."""
    model = edge_norm.build()
    ir, ops, declined = _analysed(model, *edge_norm.example_inputs())
    assert len(ops) == edge_norm.NUM_MIXED_OPS == 4
    assert all(ir.node(op.input).module_path.endswith(("preprocess0", "preprocess1"))
               or "preprocess" in op.input for op in ops)
    (cell0,) = [d for d in declined if d.output in
                {n.name for n in ir.nodes() if n.module_path == "cells.0"}]
    assert "branches read different inputs" in cell0.reason
    assert cell0.where.startswith("edge_norm.py:")
    assert "edge_norm.py" in cell0.describe()


def test_edges_over_one_tensor_are_not_a_mixed_op():
    """Two edges of their own (each a mixed op over its own alphas) reading the same x and
    weighted by betas: a sum over edges, even with one input."""
    class TwoEdges(nn.Module):
        def __init__(self):
            super().__init__()
            self.edges = nn.ModuleList([_SumEdge("mul"), _SumEdge("mul")])
            self.bns = nn.ModuleList([nn.BatchNorm2d(4, affine=False) for _ in range(2)])
            self.beta = nn.Parameter(torch.randn(2))

        def forward(self, x):
            b = F.softmax(self.beta, -1)
            return b[0] * self.bns[0](self.edges[0](x)) + b[1] * self.bns[1](self.edges[1](x))

    _, ops, declined = _analysed(TwoEdges(), torch.randn(2, 4, 6, 6))
    assert len(ops) == 2
    (d,) = declined
    assert "hold mixed ops over other architecture weights" in d.reason


def test_a_candidate_holding_a_choice_of_its_own_is_still_a_candidate():
    """A hierarchical choice: one candidate is itself a mixed op over other weights."""
    class Hierarchical(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _SumEdge("zeros_like")
            self.pool = nn.AvgPool2d(3, 1, 1)
            self.alpha = nn.Parameter(torch.randn(2))

        def forward(self, x):
            w = F.softmax(self.alpha, -1)
            return w[0] * self.inner(x).relu() + w[1] * self.pool(x)

    _, ops, declined = _analysed(Hierarchical(), torch.randn(2, 4, 6, 6))
    assert len(ops) == 2 and not declined
    outer = max(ops, key=lambda o: len(o.nodes))
    assert outer.input == ops[0].input == ops[1].input


def test_data_dependent_gate_is_declined_with_its_reason():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            g = x.mean().sigmoid()
            return g * self.a(x) + (1 - g) * self.b(x)

    _, ops, declined = _analysed(Gate(), torch.randn(2, 4, 5, 5))
    assert ops == []
    (d,) = declined
    assert "depends on the data" in d.reason


def test_sums_over_edges_are_declined_residual_adds_are_not_weighted_sums():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x, y):
            w = self.alpha.softmax(0)
            residual = x + self.a(x)
            across = w[0] * self.a(x) + w[1] * self.b(y)
            return residual * across

    _, ops, declined = _analysed(Net(), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6))
    assert ops == []
    (d,) = declined
    assert d.reason.startswith("branches read different inputs (term 0 reads x; term 1 reads y")


def test_nested_selections_from_the_sums_own_weights_stay_inside_their_candidate():
    """After PMS, the group's inner selection (w'_i = w_i / w_S) is part of one candidate of
    the outer mixed op, which is found again, whole."""
    from topo_compiler.spaces import build, default_input
    model = build("darts", C=4, edge=True, pool_bn=False)
    x = default_input("darts", C=4, edge=True, resolution=8)
    compiled = compile_supernet(model, x, passes=("pms",))
    ir, ops, declined = _analysed(compiled, x)
    outer = max(ops, key=lambda o: len(o.nodes))
    assert len(outer.candidates) < 8 and outer.input == ir.placeholders()[0].name
    assert len(ops) > 1 and not declined


# --- edge normalization end to end ----------------------------------------------------------

def test_edge_normalization_one_hot_alphas_give_the_chosen_subnetwork():
    """At one-hot alphas (the betas stay soft) the paper-mode supernet computes the chosen
    sub-network: no pass shares the edges' BatchNorms across the betas."""
    torch.manual_seed(0)
    model = edge_norm.build()
    (x,) = edge_norm.example_inputs()
    shape = model.alphas_normal.shape
    compiled = compile_supernet(model, (x, F.softmax(model.alphas_normal, -1)),
                                passes=("pms", "fms", "merge"))
    for j in range(shape[1]):
        w = torch.zeros(shape)
        w[:, j] = 1.0
        torch.testing.assert_close(compiled(x, w), model(x, w), rtol=1e-5, atol=1e-6)
