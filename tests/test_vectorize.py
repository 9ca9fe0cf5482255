"""Lowering preparation (topo_compiler/vectorize.py): the weight program and dropped identities.

Each check: the expected graph (fewer scalar ops, one weight program), what it reports, and
the same outputs (bitwise: the same elementwise operations) and gradients as the graph
lowered without it.
"""
from __future__ import annotations

import operator
from unittest import mock

import pytest
import torch
import torch.fx as fx
from torch import nn

from topo_compiler import compile_supernet
from topo_compiler.lift import lift
from topo_compiler.runtime import WeightProgram, nonzero_or_one
from topo_compiler.tracer import trace_supernet
from topo_compiler.vectorize import drop_identity_arithmetic, vectorize_weights

from alternating import batches, fresh_model
from helpers import assert_gradients_close, restored_step


def _unvectorized(model, x, **kw):
    with mock.patch("topo_compiler.api.vectorize_weights", lambda ir: None), \
            mock.patch("topo_compiler.api.drop_identity_arithmetic", lambda ir: 0):
        return compile_supernet(model, x, **kw)


def _scalar_ops(gm: fx.GraphModule) -> int:
    """Tensor ops giving 0-dim tensors (an item of a Python tuple is no op)."""
    def tensor(v):
        return isinstance(v, torch.Tensor)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and tensor(n.meta.get("val")) and n.meta["val"].dim() == 0
               and (n.target is not operator.getitem or tensor(n.args[0].meta.get("val"))))


@pytest.mark.parametrize("space,exact", [("darts", False), ("darts", True), ("nb201", False)])
def test_weight_program_keeps_outputs_and_gradients(space, exact):
    model = fresh_model(space, "cpu")
    x, y = batches(space, 1, batch=2, resolution=8, device="cpu")[0]
    before = _unvectorized(model, x, exact=exact)
    after = compile_supernet(model, x, exact=exact)
    programs = [m for m in after.modules() if isinstance(m, WeightProgram)]
    assert len(programs) == 1
    assert _scalar_ops(after) < _scalar_ops(before) // 10
    assert any("scalar weight ops" in line for line in after.report.lowering)
    assert "### Lowering" in after.report.to_markdown()
    assert set(after.state_dict()) == set(before.state_dict())  # index buffers not persistent
    out0, g0 = restored_step(model, before, x, y)
    out1, g1 = restored_step(model, after, x, y)
    assert torch.equal(out0, out1)
    assert_gradients_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_weight_program_runs_once_and_is_idempotent():
    model = fresh_model("nb201", "cpu")
    x = batches("nb201", 1, batch=2, resolution=8, device="cpu")[0][0]
    ir = lift(trace_supernet(model, x))
    from topo_compiler.lift import tag_mixed_ops
    tag_mixed_ops(ir)
    line = vectorize_weights(ir)
    assert line is not None and "one program" in line
    ir.verify("vectorize")
    assert vectorize_weights(ir) is None  # nothing left to vectorize
    program = [n for n in ir.nodes() if n.opcode == "call_module" and
               isinstance(ir.modules[n.target], WeightProgram)]
    assert len(program) == 1
    # computed before the stem: the weights do not depend on the input
    order = [n.name for n in ir.nodes()]
    first_conv = next(n.name for n in ir.nodes() if n.desc.op.startswith("conv"))
    assert order.index(program[0].name) < order.index(first_conv)


def test_weight_program_arithmetic():
    """Levels, groups, constants and exports, against the scalar computation."""
    src = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]], requires_grad=True)
    # values: leaves a=src[0,0] b=src[0,1] c=src[1,0] d=src[1,2]
    # level 1: s = a + b, t = c + 0.0 (const), z = nonzero_or_one(c)
    # level 2: q = a / s, r = 1 - d   -> exports q, r, z, b
    program = WeightProgram(
        leaves=[0, 1, 3, 5],
        levels=[[("add", [("v", [0, 2]), ("v", [1, 2])]),  # a+b, c+c
                 ("nonzero_or_one", [("v", [2])])],
                [("truediv", [("v", [0]), ("v", [4])]),
                 ("sub", [("c", 1.0), ("v", [3])])]],
        exports=[7, 8, 6, 1])
    q, r, z, b = program(src)
    a_, b_, c_, d_ = src[0, 0], src[0, 1], src[1, 0], src[1, 2]
    torch.testing.assert_close(q, a_ / (a_ + b_), rtol=0, atol=0)
    torch.testing.assert_close(r, 1.0 - d_, rtol=0, atol=0)
    torch.testing.assert_close(z, nonzero_or_one(c_), rtol=0, atol=0)
    torch.testing.assert_close(b, b_, rtol=0, atol=0)
    (q + 2 * r + 3 * z + 4 * b).backward()
    expected = torch.zeros(2, 3)
    s = float((a_ + b_).detach())
    a = float(a_.detach())
    expected[0, 0] = 1 / s - a / s ** 2
    expected[0, 1] = -a / s ** 2 + 4
    expected[1, 2] = -2
    torch.testing.assert_close(src.grad, expected)
    assert "levels=2" in repr(program)
    assert not program.state_dict()
    assert program.to(torch.float64).leaves.dtype == torch.long


class _Identities(nn.Module):
    def forward(self, x):
        a = 0 + x
        b = a * 1
        c = b / 1
        d = 1 + c  # not an identity
        e = d - 0
        f = e * 1
        f.relu_()  # in place: f must stay a tensor of its own
        return f + 0  # handed out: stays


def test_drop_identity_arithmetic():
    model = _Identities()
    x = torch.randn(2, 3)
    ir = lift(trace_supernet(model, x))
    assert drop_identity_arithmetic(ir) == 4  # 0 + x, * 1, / 1, - 0
    ir.verify("drop")
    assert drop_identity_arithmetic(ir) == 0
    from topo_compiler.lower import lower
    gm = lower(ir)
    torch.testing.assert_close(gm(x), model(x))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(operator.add) == 2 and operator.truediv not in ops


def test_identity_whose_result_is_assigned_into_is_kept():
    """``y = x + 0; y[0] = 1``: dropping the addition would make the item assignment write
    into ``x``."""
    class Assign(nn.Module):
        def forward(self, x):
            y = x + 0
            y[0] = 1.0
            return x * 2 + y

    x = torch.randn(3, 4)
    ir = lift(trace_supernet(Assign(), (x,)))
    assert drop_identity_arithmetic(ir) == 0
