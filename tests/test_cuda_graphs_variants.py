"""CUDA graphs for every variant a compiled supernet re-traces (issue 13), without a GPU.

The guards re-trace the model when a value the trace assumed changes (a temperature becomes a
run-time input, an alpha is replaced, ``model.arch`` is resampled).  Each new variant must run
through the same capture logic as the first trace: keys of its own (``CaptureKey.variant``),
one shared budget of ``max_captures`` captures with stale ones evicted, the same counts in
``report.cuda_graphs``, and the same outputs and gradients as the uncaptured compiled module.
tests/test_cuda_graphs_gpu.py repeats the DARTS case with real CUDA graphs.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from topo_compiler import compile_supernet
from topo_compiler.cuda_graphs import CudaGraphOptions, install

from alternating import assert_same_runs, batches, fresh_model, run_loop
from emulated_cuda import Emulated
from supernets import stale_idioms as S


def _replace_alphas(model: nn.Module, seed: int) -> None:
    """P-DARTS / DARTS-PT style: new alpha Parameters on the model (a re-trace)."""
    gen = torch.Generator().manual_seed(seed)
    for name in ("alphas_normal", "alphas_reduce"):
        shape = getattr(model, name).shape
        setattr(model, name, nn.Parameter(0.1 * torch.randn(shape, generator=gen)))


def test_darts_retraced_variant_is_captured_in_the_alternating_loop():
    data = batches("darts", 2, batch=2, resolution=8, device="cpu")
    runs = []
    for captured in (False, True):
        model = fresh_model("darts", "cpu")
        compiled = compile_supernet(model, data[0][0])
        if captured:
            runner = install(compiled, CudaGraphOptions(warmup=1, capture_on_call=1),
                             Emulated())
        first = run_loop(model, compiled, data)
        _replace_alphas(model, seed=3)
        second = run_loop(model, compiled, data)
        assert len(compiled.variants) == 2
        runs.append(first + second)
    assert_same_runs(runs[0], runs[1])

    stats = compiled.report.cuda_graphs
    assert stats is runner.stats
    assert [r.key.split(" ")[:2] for r in stats.captures] == [["variant", "1"],
                                                              ["variant", "2"]]
    assert stats.captured == 2 and not stats.fallbacks
    assert stats.replays == stats.backward_replays == 2 * len(data)
    new = compiled.variants[0].module
    assert new.cuda_graphs.cache is runner.cache and new.graph_forward is new.cuda_graphs
    assert [k.variant for k in runner._captures] == [1, 2]


def _temperature_step(model, compiled, tau, x):
    model.set_tau(tau)
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    out.square().mean().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def test_run_time_temperature_variant_is_captured_per_value_and_bounded():
    """tau changes: the re-traced variant reads it from a 0-d CPU tensor at run time.  A CUDA
    kernel would take that value by argument (frozen by a capture), so its value is part of
    the key: a new tau is a new capture, and the stale ones are evicted (max_captures=2)."""
    x = torch.randn(2, 3, 8, 8)
    taus = (10.0, 5.0, 5.0, 5.0, 2.0, 2.0, 2.0)
    runs = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = S.TemperatureNet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = compile_supernet(model, x)
        if captured:
            runner = install(compiled, CudaGraphOptions(warmup=1, capture_on_call=1,
                                                        max_captures=2), Emulated())
        steps = []
        for tau in taus:
            steps.append(_temperature_step(model, compiled, tau, x))
            if captured:
                assert len(runner._captures) <= 2
        runs.append(steps)
    for (out0, g0), (out1, g1) in zip(*runs):
        torch.testing.assert_close(out1, out0)
        assert g0.keys() == g1.keys()
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], msg=name)

    assert len(compiled.variants) == 2  # tau is read at run time after its first change
    stats = runner.stats
    keys = [(k.variant, k.host_scalars) for k in runner._captures]
    assert keys == [(2, (5.0,)), (2, (2.0,))]
    assert stats.captured == 3 and stats.evicted == 1  # variant 1 (tau 10) was stale
    assert stats.replays == len(taus) and not stats.fallbacks
    assert "run-time numbers [2.0]" in stats.captures[-1].key


def test_variants_share_one_bounded_budget_without_ping_pong():
    """SPOS-style ``model.arch`` resampled: one variant per path.  Three variants cycling
    through two slots: the third runs uncaptured while the other two are in use (no
    recapture on every call); once it is the only one called, a stale capture makes room."""
    x = torch.randn(2, 3, 8, 8)
    arches = ([0, 0], [1, 1], [2, 2], [0, 0], [1, 1], [2, 2], [2, 2], [2, 2])
    outs = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = S.ModelArchNet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = compile_supernet(model, x)
            if captured:
                runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1,
                                                            max_captures=2, warn=False),
                                 Emulated())
            run = []
            for arch in arches:
                model.arch = list(arch)
                out = compiled(x)
                out.sum().backward()
                run.append(out.detach())
                if captured:
                    assert len(runner._captures) <= 2
        outs.append(run)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)
    assert len(compiled.variants) == 3
    stats = runner.stats
    assert stats.fallbacks == {"max_captures=2 keys captured and in use": 2}
    assert stats.evicted == 1 and stats.captured == 3
    assert [k.variant for k in runner._captures] == [2, 3]
    assert stats.replays == len(arches) - 2


def test_deepcopy_shares_one_new_cache_over_the_copied_variants():
    import copy

    data = batches("darts", 1, batch=2, resolution=8, device="cpu")
    model = fresh_model("darts", "cpu")
    compiled = compile_supernet(model, data[0][0])
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    x, y = data[0]
    F.cross_entropy(compiled(x), y).backward()
    _replace_alphas(model, seed=1)
    F.cross_entropy(compiled(x), y).backward()
    assert runner.stats.captured == 2
    twin = copy.deepcopy(compiled)
    caches = {id(v.module.cuda_graphs.cache) for v in twin.variants}
    assert len(caches) == 1 and id(runner.cache) not in caches
    assert twin.report.cuda_graphs is twin.cuda_graphs.stats
    assert twin.cuda_graphs.stats.captured == 0
    out = twin(x)
    out.sum().backward()
    assert twin.cuda_graphs.stats.captured == 1 and runner.stats.captured == 2
    assert [k.variant for k in twin.cuda_graphs._captures] == [2]
