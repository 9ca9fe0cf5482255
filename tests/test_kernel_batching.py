"""Lowering preparation (topo_compiler/kernel_batching.py): per-candidate kernel arithmetic
in a few batched calls.

Each check: the expected graph (no per-candidate ``place`` / ``separable_to_dense`` /
``weighted_kernel_sum`` left where a batch was possible), what it reports, nothing more on a
second run, the same outputs (bit for bit) and gradients as the graph without it, and no
more memory saved for backward.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from topo_compiler import compile_supernet, runtime
from topo_compiler.kernel_batching import batch_kernel_arithmetic
from topo_compiler.lift import lift, tag_mixed_ops
from topo_compiler.pass_manager import PassManager
from topo_compiler.passes import build_pipeline, normalize_names
from topo_compiler.tracer import trace_supernet
from topo_compiler.vectorize import vectorize_weights

from alternating import batches, fresh_model
from helpers import assert_gradients_close, logits_of, restored_step

PER_CANDIDATE = (runtime.place, runtime.separable_to_dense, runtime.weighted_kernel_sum)
BATCHED = (runtime.place_many, runtime.separable_to_dense_many, runtime.weighted_kernel_sums)


def _calls(gm: fx.GraphModule, targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _unbatched(model, x, **kw):
    with mock.patch("topo_compiler.api.batch_kernel_arithmetic", lambda ir: None):
        return compile_supernet(model, x, **kw)


@pytest.mark.parametrize("space,exact", [("darts", False), ("darts", True), ("nb201", False)])
def test_batched_kernels_keep_outputs_and_gradients_bitwise(space, exact):
    model = fresh_model(space, "cpu")
    x, y = batches(space, 1, batch=2, resolution=8, device="cpu")[0]
    before = _unbatched(model, x, exact=exact)
    after = compile_supernet(model, x, exact=exact)
    n_before = _calls(before, PER_CANDIDATE)
    line = [s for s in after.report.lowering if "kernel calls" in s]
    if n_before:
        assert _calls(after, PER_CANDIDATE) < n_before
        assert 0 < _calls(after, BATCHED) < n_before
        batched = n_before - _calls(after, PER_CANDIDATE)
        assert line == [f"{batched} per-candidate kernel calls -> {_calls(after, BATCHED)} "
                        f"batched calls"]
    else:
        assert not line
    (out0, g0) = restored_step(model, before, x, y)
    (out1, g1) = restored_step(model, after, x, y)
    assert torch.equal(out1, out0)
    # the weights' gradients sum the same products in another order
    assert_gradients_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_darts_kernel_calls_batched_and_second_run_changes_nothing():
    model = fresh_model("darts", "cpu")
    x = batches("darts", 1, batch=2, resolution=8, device="cpu")[0][0]
    after = compile_supernet(model, x)
    assert _calls(after, PER_CANDIDATE) == 0  # every one of them fit a batch
    assert _calls(after, (runtime.place_many,)) >= 1
    assert _calls(after, (runtime.weighted_kernel_sums,)) >= 1

    ir = lift(trace_supernet(model, x))
    assert batch_kernel_arithmetic(ir) is None  # a traced graph has no kernel arithmetic
    tag_mixed_ops(ir)
    PassManager(build_pipeline(normalize_names(None), None)).run(ir)
    vectorize_weights(ir)
    assert batch_kernel_arithmetic(ir).endswith("batched calls")
    ir.verify("batch")
    assert batch_kernel_arithmetic(ir) is None


def test_no_more_saved_for_backward_than_unbatched():
    """Autograd's graph of a batch would keep stacked copies of the kernels for backward;
    the batched functions keep the kernels they were given instead."""
    from benchmarks.measure import resident_tensors, saved_activation_bytes

    model = fresh_model("nb201", "cpu")
    x, y = batches("nb201", 1, batch=2, resolution=8, device="cpu")[0]
    resident = resident_tensors(model, x)

    def saved(module):
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits_of(module(x)), y).backward()
        return saved_activation_bytes(step, resident).bytes

    before, after = _unbatched(model, x), compile_supernet(model, x)
    assert _calls(after, BATCHED) > 0
    assert saved(after) <= saved(before)


def test_batched_functions_equal_their_per_candidate_forms():
    gen = torch.Generator().manual_seed(0)
    dws = [torch.randn(4, 1, 3, 3, generator=gen) for _ in range(3)]
    pws = [torch.randn(6, 4, 1, 1, generator=gen) for _ in range(3)]
    for dil, start, frame, fdil in (((1, 1), (-1, -1), (5, 5), (1, 1)),
                                    ((2, 2), (-2, -2), (5, 5), (1, 1))):
        many = runtime.place_many(dws, dil, start, frame, fdil)
        for d, m in zip(dws, many):
            assert torch.equal(m, runtime.place(d, dil, start, frame, fdil))
    for d, p, m in zip(dws, pws, runtime.separable_to_dense_many(dws, pws)):
        assert torch.equal(m, runtime.separable_to_dense(d, p))
    ws = [[torch.rand((), generator=gen) for _ in range(3)] for _ in range(2)]
    ks = [[torch.randn(6, 4, 5, 5, generator=gen) for _ in range(3)] for _ in range(2)]
    for i, m in enumerate(runtime.weighted_kernel_sums(ws, ks)):
        assert torch.equal(m, runtime.weighted_kernel_sum([ws[0][i], ws[1][i]],
                                                          [ks[0][i], ks[1][i]]))


def test_batched_functions_gradcheck():
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.double).requires_grad_()
    dws, pws = [leaf(3, 1, 3, 3) for _ in range(2)], [leaf(5, 3, 1, 1) for _ in range(2)]
    torch.autograd.gradcheck(lambda *t: runtime.separable_to_dense_many(t[:2], t[2:]),
                             (*dws, *pws))
    ws, ks = [leaf() for _ in range(4)], [leaf(5, 3, 3, 3) for _ in range(4)]
    torch.autograd.gradcheck(
        lambda *t: runtime.weighted_kernel_sums([t[0:2], t[2:4]], [t[4:6], t[6:8]]),
        (*ws, *ks))
    torch.autograd.gradcheck(
        lambda *t: runtime.place_many(t, (2, 2), (-2, -2), (5, 5), (1, 1)), tuple(dws))
