"""CUDA-graph execution on a real GPU (skipped without CUDA; benchmarks/gpu_cuda_graphs.sh runs
it first): captured == uncaptured over the DARTS alternating loop (also for a re-traced variant
and a run-time temperature), fallbacks, eval mode, bf16 autocast, channels_last, and refusals
of graphs that sync with the host."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from topo_compiler import compile_supernet
from topo_compiler.cuda_graphs import CudaGraphFallbackWarning, CudaGraphOptions

from alternating import assert_same_runs, batches, fresh_model, run_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NOW = CudaGraphOptions(warmup=2, capture_on_call=1, warn=False)


@pytest.fixture(autouse=True)
def _deterministic():
    """Same kernels in both runs: cuDNN's nondeterministic algorithms would differ anyway."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


def _pair(space, data, exact=False, options=NOW, memory_format=None):
    """(model, uncaptured compiled), (model, captured compiled): same initial weights."""
    out = []
    for cuda_graphs in (False, options):
        model = fresh_model(space, "cuda")
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
        out.append((model, compile_supernet(model, data[0][0], exact=exact,
                                            cuda_graphs=cuda_graphs)))
    return out


@pytest.mark.parametrize("space,exact", [("darts", False), ("nb201", False), ("darts", True)])
def test_alternating_loop_captured_equals_uncaptured(space, exact):
    data = batches(space, 4, batch=4, resolution=16, device="cuda")
    (m0, ref), (m1, captured) = _pair(space, data, exact)
    expected = run_loop(m0, ref, data)
    actual = run_loop(m1, captured, data)
    assert_same_runs(expected, actual, rtol=1e-4, atol=1e-5)
    stats = captured.cuda_graphs.stats
    assert stats.captured == 1 and not stats.fallbacks
    assert stats.replays == stats.backward_replays == len(data)


def test_partial_batch_and_eval_and_no_grad():
    data = batches("darts", 2, batch=4, resolution=16, device="cuda")
    (m0, ref), (m1, captured) = _pair("darts", data, options=CudaGraphOptions(
        warmup=1, capture_on_call=2, max_captures=2, warn=False))
    for model, module in ((m0, ref), (m1, captured)):
        for x, y in data:
            F.cross_entropy(module(x), y).backward()
            model.zero_grad(set_to_none=True)
    stats = captured.cuda_graphs.stats
    assert stats.captured == 1 and stats.replays == len(data) - 1
    x, y = data[0]
    for model, module in ((m0, ref), (m1, captured)):
        F.cross_entropy(module(x[:3]), y[:3]).backward()  # the last partial batch
    assert stats.replays == len(data) - 1
    assert stats.fallbacks["key seen 1 time(s), captured on call 2"] == 2
    for p, q in zip(m0.parameters(), m1.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)

    for model, module in ((m0, ref), (m1, captured)):
        model.eval()
    for _ in range(2):
        outs = [module(x) for module in (ref, captured)]
        for o in outs:
            o.sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert stats.captured == 2 and [k.training for k in captured.cuda_graphs._captures] == \
        [True, False]
    for b0, b1 in zip(m0.buffers(), m1.buffers()):
        torch.testing.assert_close(b1, b0, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(captured(x), ref(x), rtol=1e-4, atol=1e-5)
    assert stats.fallbacks["grad disabled (only training-style calls are captured)"] == 1


def test_bf16_autocast_captured():
    data = batches("nb201", 3, batch=4, resolution=16, device="cuda")
    pair = _pair("nb201", data)
    runs = []
    for model, module in pair:
        def step(x, module=module):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(x)
        runs.append(run_loop(model, step, data))
    assert_same_runs(runs[0], runs[1], rtol=2e-2, atol=2e-3)
    keys = list(pair[1][1].cuda_graphs._captures)
    assert [k.autocast for k in keys] == [(True, torch.bfloat16)]
    assert runs[1][0]["out"].dtype == torch.bfloat16


def test_channels_last_captured():
    data = batches("darts", 3, batch=4, resolution=16, device="cuda")
    pair = _pair("darts", data, memory_format=torch.channels_last)
    runs = [run_loop(m, mod, data, memory_format=torch.channels_last) for m, mod in pair]
    assert_same_runs(runs[0], runs[1], rtol=1e-4, atol=1e-5)
    assert pair[1][1].cuda_graphs.stats.replays == len(data)


class _ItemInGraph(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y / y.abs().max().item()


class _OpaqueSync(nn.Module):
    """Syncs inside a leaf the graph cannot see into."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if bool((y > 1e9).any()):  # a host sync: forbidden while capturing
            y = y * 0
        return y


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _OpaqueSync()

    def forward(self, x):
        return self.inner(x).relu()


def test_host_syncs_refused_and_context_still_usable():
    from topo_compiler.cuda_graphs import install

    x = torch.randn(4, 8, device="cuda")
    gm = fx.symbolic_trace(_ItemInGraph()).cuda()
    runner = install(gm, NOW)
    ref = type(gm).forward(gm, x)
    out = gm(x)
    torch.testing.assert_close(out, ref)
    assert runner.stats.captures[0].status == "refused"
    assert "item" in runner.stats.captures[0].note

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, _OpaqueSync) or super().is_leaf_module(m, name)
    root = _Wrap().cuda()
    gm2 = fx.GraphModule(root, Leaf().trace(root))
    runner2 = install(gm2, CudaGraphOptions(warmup=1, capture_on_call=1))
    with pytest.warns(CudaGraphFallbackWarning, match="refused"):
        out = gm2(x)
    out.sum().backward()
    torch.testing.assert_close(out, root(x))
    assert runner2.stats.captures[0].status == "refused"
    # the device still works after the failed capture
    assert torch.isfinite((torch.randn(64, 64, device="cuda") @ torch.randn(64, 64,
                                                                            device="cuda"))
                          .sum()).item()


def _replace_alphas(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for name in ("alphas_normal", "alphas_reduce"):
        shape = getattr(model, name).shape
        setattr(model, name, nn.Parameter(0.1 * torch.randn(shape, generator=gen).cuda()))


def test_retraced_variant_captured_equals_uncaptured():
    """Alphas replaced on the model (a re-trace): the new variant is captured too, and the
    alternating loop through it equals the uncaptured compiled module's."""
    data = batches("darts", 2, batch=4, resolution=16, device="cuda")
    (m0, ref), (m1, captured) = _pair("darts", data)
    runs = []
    for model, module in ((m0, ref), (m1, captured)):
        first = run_loop(model, module, data)
        _replace_alphas(model, seed=3)
        runs.append(first + run_loop(model, module, data))
        assert len(module.variants) == 2
    assert_same_runs(runs[0], runs[1], rtol=1e-4, atol=1e-5)
    stats = captured.report.cuda_graphs
    assert [r.key.split(" ")[:2] for r in stats.captures] == [["variant", "1"],
                                                              ["variant", "2"]]
    assert stats.captured == 2 and not stats.fallbacks
    assert stats.replays == stats.backward_replays == 2 * len(data)


def test_run_time_temperature_is_not_frozen_by_a_capture():
    """A temperature read at run time from a 0-d CPU tensor reaches CUDA kernels by value: a
    capture would freeze it.  Changing it after capturing must change the outputs exactly as
    the uncaptured module's do (a new capture per value)."""
    import warnings

    from supernets import stale_idioms as S

    x = torch.randn(4, 3, 8, 8, device="cuda")
    outs = []
    for options in (False, NOW):
        torch.manual_seed(0)
        model = S.TemperatureNet().cuda()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = compile_supernet(model, x, cuda_graphs=options)
        run = []
        for tau in (10.0, 5.0, 5.0, 2.0, 2.0):
            model.set_tau(tau)
            out = compiled(x)
            out.square().mean().backward()
            run.append((out.detach(), model.arch_parameters_.grad.clone()))
            model.zero_grad(set_to_none=True)
        outs.append(run)
    for (o0, g0), (o1, g1) in zip(*outs):
        torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    stats = compiled.cuda_graphs.stats
    assert [k.host_scalars for k in compiled.cuda_graphs._captures][-2:] == [(5.0,), (2.0,)]
    assert stats.replays == 5
