"""Partial and floating module sharing: Table II counts, exactness, one-hot vertices,
an independent eager implementation of Eq. 4-13, fixed point and honest flags."""
import hashlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import strategies
from helpers import assert_same_step, logits_of
from supernets import FOREIGN
from topo_compiler import (AlreadyCompiledWarning, compile_supernet, lift, lower,
                           trace_supernet)
from topo_compiler.api import analyze
from topo_compiler.pass_manager import FixedPoint, PassManager
from topo_compiler.passes.floating_module_sharing import FloatingModuleSharing
from topo_compiler.passes.partial_module_sharing import PartialModuleSharing
from topo_compiler.spaces import build, default_input

SHARING = ("pms", "fms")


def darts_edge(pool_bn=False, C=4):
    model = build("darts", C=C, edge=True, pool_bn=pool_bn)
    return model, default_input("darts", C=C, edge=True, resolution=8)


def counts(report, stage):
    return str(report.stage(stage).counts)


# --- the paper's Table II ------------------------------------------------------------------

def test_table_ii_on_a_darts_edge():
    """Single normal-cell edge, the paper's Table I op set: 6/14/20 -> 6/8/14 -> 6/6/12."""
    model, x = darts_edge(pool_bn=False)
    pms = compile_supernet(model, x, passes=("pms",)).report
    assert counts(pms, "input") == "6/14/20"
    assert str(pms.final.counts) == "6/8/14"
    both = compile_supernet(model, x, passes=SHARING).report
    assert str(both.final.counts) == "6/6/12"
    (op,) = both.mixed_ops
    assert str(both.final.mixed_op_counts[op.name]) == "6/6/12"


def test_darts_pool_batchnorm_is_no_worse():
    model, x = darts_edge(pool_bn=True)
    pms = compile_supernet(model, x, passes=("pms",)).report
    both = compile_supernet(model, x, passes=SHARING).report
    assert counts(pms, "input") == "6/16/22"
    assert pms.final.counts.total <= 14 and both.final.counts.total <= 12


def test_competing_groupings_take_the_larger_saving():
    """Convs share ReLU and BN (6 removed) before pools+convs share BN (5 removed)."""
    model, x = darts_edge(pool_bn=True)
    report = compile_supernet(model, x, passes=("pms",)).report
    assert report.stages[1].name == "pms"
    (first,) = report.stages[1].decisions
    assert first == ("op over input x: SepConv 3x3, SepConv 5x5, DilConv 3x3 d2, DilConv 5x5 d2 "
                     "share their leading and trailing module (6 modules removed)")
    assert first.kind.startswith("SepConv 3x3") and first.removed == 6 and first.mixed_op == "op"


@pytest.mark.parametrize("space,layers", [("darts", 3), ("nb201", 1), ("wide", 2)])
def test_builtin_spaces_simplify(space, layers):
    model = build(space, C=4, layers=layers)
    x = default_input(space, resolution=8)
    report = compile_supernet(model, x, passes=SHARING).report
    assert report.final.counts.non_conv < report.input.counts.non_conv
    assert report.final.counts.conv == report.input.counts.conv


def test_ablation_rows_of_table_vi_compile_by_name():
    """Baseline, +PMS, +FMS, +both are pass lists (the benchmark compiles them by name)."""
    model, x = darts_edge()
    totals = {p: compile_supernet(model, x, passes=p).report.final.counts.total
              for p in [(), ("pms",), ("fms",), ("pms", "fms")]}
    assert totals == {(): 20, ("pms",): 14, ("fms",): 18, ("pms", "fms"): 12}


# --- exact mode -----------------------------------------------------------------------------

@given(strategies.cell_specs())
def test_exact_mode_keeps_outputs_and_gradients(spec):
    """exact=True: outputs and gradients (input, weights, alphas) equal the original for
    random softmax weights, in training mode."""
    model, x = strategies.build(spec)
    compiled = compile_supernet(model, x, passes=SHARING, exact=True)
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


def test_exact_mode_on_darts_shares_only_leading_relus():
    model, x = darts_edge()
    report = compile_supernet(model, x, passes=SHARING, exact=True).report
    assert str(report.final.counts) == "6/11/17"
    assert_same_step(model, compile_supernet(model, x, passes=SHARING, exact=True), (x,))


def test_exact_mode_is_exact_for_weights_summing_to_zero():
    chains = ((("relu", "module"), ("conv", 3, 1, False, False)),
              (("relu", "method"), ("conv", 1, 1, False, False)),
              ("identity",))
    spec = strategies.CellSpec(4, 6, (1,), (chains,), 1.0, 3)
    model, x = strategies.build_with_weights(spec)
    w = torch.tensor([[1.0, -1.0, 0.5]])
    compiled = compile_supernet(model, (x, w), passes=SHARING, exact=True)
    assert compiled.report.final.counts.non_conv < compiled.report.input.counts.non_conv
    torch.testing.assert_close(compiled(x, w), model(x, w))


# --- default (paper) mode -------------------------------------------------------------------

@given(strategies.cell_specs())
def test_paper_mode_at_simplex_vertices_is_the_discrete_subnetwork(spec):
    """At one-hot weights the compiled supernet computes exactly the chosen candidate's
    output (the discrete sub-network); forward and backward stay finite (w_S = 0 guarded)."""
    model, x = strategies.build_with_weights(spec)
    onehots = strategies.one_hot_rows(spec)
    compiled = compile_supernet(model, (x, onehots[0]), passes=SHARING)
    for w in onehots:
        w = w.clone().requires_grad_(True)
        out = compiled(x, w)
        torch.testing.assert_close(out, model(x, w), rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        assert torch.isfinite(w.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.grad is not None)
        model.zero_grad()


@given(strategies.cell_specs())
def test_paper_mode_with_affine_common_children_is_exact(spec):
    """With every shared trailing module affine and identical (BatchNorm in eval mode with
    equal statistics), PMS in the paper's form equals the original for arbitrary weights."""
    spec = strategies.affine_trailing(spec)
    model, x = strategies.build(spec)
    strategies.equalize_batchnorm_statistics(model)
    model.eval()
    compiled = compile_supernet(model, x, passes=("pms",))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


def _eq_4_13_darts_edge(model, x):
    """Eq. 4-13 on a DARTS edge, written out by hand (independent of the compiler)."""
    ops = model.op._ops
    w = F.softmax(model.alpha, -1)
    S = [4, 5, 6, 7]                               # the convolutions: ReLU ... BN
    w_S = w[S].sum()
    wp = w / w_S                                   # w'_i = w_i / w_S          (7, 8)
    h = ops[4].op[0](x)                            # the shared leading ReLU
    sep3, sep5, dil3, dil5 = (ops[i].op for i in S)
    # FMS inside S: the separable convs share BN-ReLU between their halves (11-13)
    Fg = [0, 1]
    w_F = wp[4] + wp[5]
    wpp = [wp[4] / w_F, wp[5] / w_F]
    y = wpp[0] * sep3[2](sep3[1](h)) + wpp[1] * sep5[2](sep5[1](h))          # (12)
    z = sep3[4](sep3[3](y))
    stacked = w_F * (wpp[0] * sep3[6](sep3[5](z)) + wpp[1] * sep5[6](sep5[5](z)))  # (13)
    inner = stacked + wp[6] * dil3[2](dil3[1](h)) + wp[7] * dil5[2](dil5[1](h))
    group = w_S * sep3[7](inner)                   # the shared trailing BN     (4, 10)
    del Fg
    return w[0] * ops[0](x) + w[1] * ops[1](x) + w[2] * ops[2](x) + w[3] * x + group


def _eq_4_10_nb201_edge(model, x):
    edge = model.edge
    w = F.softmax(model.alpha, -1)
    c1, c3 = edge[2].op, edge[3].op                # ReLU-Conv-BN, 1x1 and 3x3
    w_S = w[2] + w[3]
    h = c1[0](x)
    inner = (w[2] / w_S) * c1[1](h) + (w[3] / w_S) * c3[1](h)
    return w[0] * edge[0](x) + w[1] * x + w_S * c1[2](inner) + w[4] * edge[4](x)


@pytest.mark.parametrize("space,reference", [("darts", _eq_4_13_darts_edge),
                                             ("nb201", _eq_4_10_nb201_edge)])
def test_paper_mode_equals_independent_eager_equations(space, reference):
    model = build(space, C=4, edge=True, **({"pool_bn": False} if space == "darts" else {}))
    with torch.no_grad():
        model.alpha.normal_()
    x = default_input(space, C=4, edge=True, resolution=8)
    compiled = compile_supernet(model, x, passes=SHARING)
    for mode in (True, False):
        model.train(mode)
        torch.testing.assert_close(compiled(x), reference(model, x), rtol=1e-5, atol=1e-6)


def test_zero_group_weight_from_gdas_hard_weights_is_finite():
    net = FOREIGN["gdas_hard_weights"]
    model = net.build()
    x, hard = net.example_inputs()
    compiled = compile_supernet(model, (x, hard), passes=SHARING)
    assert compiled.report.final.counts.total < compiled.report.input.counts.total
    hard = hard.detach().clone().requires_grad_(True)
    out = logits_of(compiled(x, hard))
    torch.testing.assert_close(out, logits_of(model(x, hard)))
    out.sum().backward()
    assert torch.isfinite(hard.grad).all()


# --- fixed point, flags, order ---------------------------------------------------------------

def _ir(model, x):
    ir = lift(trace_supernet(model, x))
    analyze(ir)
    return ir


def _manager(pms_seed=None, fms_seed=None, exact=False):
    return PassManager([FixedPoint((PartialModuleSharing(pms_seed),
                                    FloatingModuleSharing(fms_seed)))], exact=exact)


@pytest.mark.slow  # every pass twice over three built-in networks
def test_second_run_changes_nothing():
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    ir = _ir(model, x)
    first = _manager().run(ir)
    assert any(s.changed for s in first)
    second = _manager().run(ir)
    assert not any(s.changed for s in second)
    compiled = compile_supernet(model, x, passes=SHARING)
    retraced = _manager().run(_ir(compiled, x))  # the lowered graph is a fixed point too
    assert [s.changed for s in retraced] == [False, False, False]
    with pytest.warns(AlreadyCompiledWarning, match="compiling its source model"):
        again = compile_supernet(compiled, x, passes=SHARING)
    assert again.source_model is model
    assert again.report.final.counts == compiled.report.final.counts


@settings(max_examples=10)
@given(strategies.cell_specs())
def test_changed_flags_are_honest(spec):
    model, x = strategies.build(spec)
    ir = _ir(model, x)
    for p in (PartialModuleSharing(), FloatingModuleSharing(), PartialModuleSharing()):
        before = lower(ir).code
        changed = p.run(ir, __import__("topo_compiler").pass_manager.PassContext())
        assert changed == (lower(ir).code != before)


def _structure_hash(ir):
    """A hash of the IR's structure that node names and creation order do not enter: each
    node hashes its descriptor with the sorted hashes of its inputs (a Merkle hash of the
    DAG), and the graph hashes the sorted node hashes."""
    node_hash = {}
    for name in ir.topological_order():
        node = ir.node(name)
        inputs = sorted(node_hash[r] for r in node.inputs)
        node_hash[name] = hashlib.sha256(
            repr((node.desc.signature, inputs)).encode()).hexdigest()
    return hashlib.sha256(repr(sorted(node_hash.values())).encode()).hexdigest()


@pytest.mark.slow  # four compilations of a 3-cell DARTS network
def test_result_does_not_depend_on_visit_order():
    """Rewriting the mixed ops in shuffled orders gives the same graph up to node names, and
    the same function."""
    model = build("darts", C=4, layers=3).eval()
    x = default_input("darts", resolution=8)
    hashes, outputs = set(), []
    for seed in (None, 1, 2, 3):
        ir = _ir(model, x)
        _manager(seed, seed).run(ir)
        hashes.add(_structure_hash(ir))
        with torch.no_grad():
            outputs.append(lower(ir)(x))
    assert len(hashes) == 1
    assert _structure_hash(_ir(model, x)) not in hashes  # the hash sees the rewrites
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)


def test_inplace_modules_never_clobber_a_shared_input():
    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self._ops = nn.ModuleList([
                nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1)),
                nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)),
                nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True)),
            ])
            self.alpha = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            x = x * 1.0
            w = self.alpha.softmax(0)
            return sum(wi * op(x) for wi, op in zip(w, self._ops))

    x = torch.randn(2, 4, 6, 6)
    model = Edge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, x, passes=SHARING, exact=True)
    ir = _ir(compiled, x)
    for node in ir.nodes():
        if node.desc.inplace:
            data = [r for r in node.inputs if ir.node(r).is_tensor]
            assert all(len(ir.users(r)) == 1 for r in data), node.name
    shared = [n for n in compiled.graph.nodes if n.op == "call_module"
              and isinstance(compiled.get_submodule(n.target), nn.ReLU)
              and compiled.get_submodule(n.target).inplace]
    assert len(shared) == 1, "only the ReLU on the third candidate's own conv stays in place"


@pytest.mark.parametrize("relu_", [lambda x: F.relu(x, inplace=True), lambda x: x.relu_()],
                         ids=["F.relu(inplace=True)", "Tensor.relu_"])
def test_inplace_functions_never_clobber_a_shared_input(relu_):
    """The functional and method forms of an in-place leading module, once shared, compute out
    of place: the compiled step equals the out-of-place supernet's (the in-place original
    clobbers the edge input the third candidate reads, and cannot even backpropagate)."""
    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1),
                                        nn.Conv2d(4, 4, 1)])
            self.alpha = nn.Parameter(torch.randn(3))
            self.act = relu_

        def forward(self, x):
            x = x * 1.0
            w = self.alpha.softmax(0)
            return w[0] * self.convs[0](self.act(x)) + w[1] * self.convs[1](self.act(x)) + \
                w[2] * self.convs[2](x)

    x = torch.randn(2, 4, 6, 6)
    model = Edge()
    compiled = compile_supernet(model, x, passes=SHARING, exact=True)
    assert "share their leading module" in compiled.report.stages[1].decisions[0]
    ir = _ir(compiled, x)
    assert not [n.name for n in ir.nodes() if n.desc.inplace]
    model.act = F.relu  # the reference: the same supernet computing out of place
    assert_same_step(model, compiled, (x,))


def test_functional_convs_with_their_own_weights_are_never_shared():
    """``F.conv2d(x, self.w1)`` and ``F.conv2d(x, self.w2)`` agree in every hyperparameter
    but are different functions: the weights they are handed tell them apart."""
    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.alpha = nn.Parameter(torch.randn(2))

        def forward(self, x):
            w = F.softmax(self.alpha, 0)
            return w[0] * F.conv2d(x, self.w1, padding=1).relu() + \
                w[1] * F.conv2d(x, self.w2, padding=1).sigmoid()

    torch.manual_seed(0)
    model, x = Edge(), torch.randn(2, 4, 8, 8)
    for exact in (True, False):
        compiled = compile_supernet(model, x, passes=SHARING, exact=exact)
        assert not compiled.report.stages[1].decisions
        assert_same_step(model, compiled, (x,))


def test_exact_sharing_keeps_modules_with_their_own_running_statistics_apart():
    """Two ``BatchNorm(affine=False)`` siblings compute the same training-mode function, but in
    eval mode each reads its own running statistics: the exact form keeps them apart (and
    both keep being updated); the paper's form shares them, as Table II counts."""
    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.ModuleList([nn.BatchNorm2d(4, affine=False) for _ in range(2)])
            self.conv = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)])
            self.alpha = nn.Parameter(torch.randn(2))

        def forward(self, x):
            w = F.softmax(self.alpha, 0)
            return w[0] * self.conv[0](self.bn[0](x)) + w[1] * self.conv[1](self.bn[1](x))

    torch.manual_seed(0)
    model, x = Edge(), torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # as a warm-up or a loaded checkpoint would leave them
        model.bn[1].running_mean.fill_(0.5)
        model.bn[1].running_var.fill_(2.0)
    paper = compile_supernet(model, x, passes=("pms",))
    assert "share their leading module" in paper.report.stages[1].decisions[0]
    compiled = compile_supernet(model, x, passes=("pms",), exact=True)
    assert not compiled.report.stages[1].decisions
    model.eval()
    compiled.eval()
    assert_same_step(model, compiled, (x,))
    model.train()
    compiled.train()
    compiled(x + 1.0)
    assert model.bn[1].running_mean[0].item() != 0.5


def test_each_shared_module_is_annotated_for_the_pictures():
    model, x = darts_edge()
    ir = _ir(model, x)
    _manager().run(ir)
    shared = {n.notes.shared for n in ir.nodes()} - {None}
    assert shared == {"sibling", "common child", "floating"}
    assert math.isfinite(sum(1 for _ in ir.nodes()))
