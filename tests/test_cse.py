"""Lowering preparation (topo_compiler/cse.py): repeated pure computations computed once.

Each check: the expected graph (op counts), the count the step returns (0 on a second run),
and the same outputs and gradients as the graph lowered without it; random ops, tensors
written in place and buffers updated mid-call are never merged.
"""
from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from topo_compiler import compile_supernet, spaces
from topo_compiler.cse import eliminate_common_subexpressions
from topo_compiler.lift import lift
from topo_compiler.tracer import trace_supernet


def _count(gm: fx.GraphModule, *names: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")
               and getattr(n.target, "__name__", n.target) in names)


def _without_cse(model, x, **kw):
    with mock.patch("topo_compiler.api.eliminate_common_subexpressions", lambda ir: 0):
        return compile_supernet(model, x, **kw)


def _step(model, module, x):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = module(x)
    out = out[-1] if isinstance(out, tuple) else out
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    return out.detach(), grads


def _assert_same_step(model, a, b, x):
    (out_a, g_a), (out_b, g_b) = _step(model, a, x), _step(model, b, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("exact", [False, True])
def test_darts_softmax_of_the_alphas_once_per_call(exact):
    """DARTS's forward takes softmax(alphas_normal) in each normal cell and
    softmax(alphas_reduce) in each reduction cell: 5 softmaxes in 5 cells, 2 after."""
    torch.manual_seed(0)
    model = spaces.build("darts", C=4, layers=5).train()
    x = spaces.default_input("darts", batch=2, resolution=8)
    traced = compile_supernet(model, x, passes=())  # the traced graph, as it is
    before = _without_cse(model, x, exact=exact)
    after = compile_supernet(model, x, exact=exact)
    assert _count(traced, "softmax") == _count(before, "softmax") == 5
    assert _count(after, "softmax") == 2
    softmaxed = sorted(n.args[0].target for n in after.graph.nodes
                       if getattr(n.target, "__name__", "") == "softmax")
    assert softmaxed == ["alphas_normal", "alphas_reduce"]
    merged = [line for line in after.report.lowering if "merged" in line]
    assert len(merged) == 1 and int(merged[0].split()[0]) >= 3
    assert len(after.graph.nodes) < len(before.graph.nodes)
    _assert_same_step(model, before, after, x)


def test_second_run_changes_nothing():
    torch.manual_seed(0)
    model = spaces.build("darts", C=4, layers=5).train()
    ir = lift(trace_supernet(model, spaces.default_input("darts", batch=2, resolution=8)))
    first = eliminate_common_subexpressions(ir)
    assert first >= 3
    ir.verify("cse")
    assert eliminate_common_subexpressions(ir) == 0


class _Unmergeable(nn.Module):
    """Pairs of equal-looking calls that must stay two: random draws, dropout, a product
    written in place, a sum written by item assignment, a buffer read before and after
    BatchNorm updates it; and one pair
    (softmax of the alphas) that is merged, so the test sees CSE at work."""

    def __init__(self, C: int = 4):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(3))
        self.ops = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1, bias=False),
                                  nn.Conv2d(C, C, 1, bias=False), nn.Identity()])
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        g1 = F.softmax(self.alpha + torch.rand_like(self.alpha), -1)  # Gumbel-style noise
        g2 = F.softmax(self.alpha + torch.rand_like(self.alpha), -1)
        w1 = F.softmax(self.alpha, -1)
        w2 = F.softmax(self.alpha, -1)
        d1 = F.dropout(x, 0.5, self.training)
        d2 = F.dropout(x, 0.5, self.training)
        h1 = x * 2
        h2 = x * 2
        h1.add_(1)
        s1 = x + 1
        s2 = x + 1
        s1[:, 0] = 0
        m1 = self.bn.running_mean * 2
        y = self.bn(x)
        m2 = self.bn.running_mean * 2
        mixed = sum(w * op(y) for w, op in zip(g1 * w1 + g2 * w2, self.ops))
        return mixed + d1 + d2 + h1 + h2 + s1 + s2 + (m1 + m2)[None, :, None, None]


def test_random_in_place_and_buffer_reads_are_not_merged():
    torch.manual_seed(0)
    model = _Unmergeable().train()
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, x, exact=True)
        unmerged = _without_cse(model, x, exact=True)
    gm = compiled
    assert _count(gm, "rand_like") == 2 and _count(gm, "dropout") == 2
    assert _count(gm, "softmax") == _count(unmerged, "softmax") - 1 == 3  # w1, w2 merged
    assert _count(gm, "mul") == _count(unmerged, "mul")  # x * 2 and running_mean * 2 kept
    assert _count(gm, "add") == _count(unmerged, "add")  # x + 1 kept

    # random ops draw anew: the same seed gives the eager model's values
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = model(x)
    model.load_state_dict(state)
    torch.manual_seed(1)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    model.load_state_dict(state)
    _assert_same_step(model, unmerged, compiled, x)
