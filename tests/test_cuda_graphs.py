"""CUDA-graph execution, without a GPU: fallbacks on CPU models and the capture bookkeeping.

The device calls go through a backend object; ``Emulated`` stands in for CUDA: "capturing"
runs the body once and keeps its result as the static memory, "replaying" runs the body again
and copies the fresh values into that memory.  Everything else (static inputs, the gradient
buffer handed to autograd, warm-up undone on BatchNorm buffers, cache keys, fallbacks) is the
real code, so the DARTS alternating loop through an emulated capture must match the uncaptured
module exactly.  tests/test_cuda_graphs_gpu.py runs the same loop with real CUDA graphs.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from topo_compiler import compile_supernet
from topo_compiler.cuda_graphs import (
    CaptureKey,
    CudaGraphFallbackWarning,
    CudaGraphOptions,
    CudaGraphs,
    host_syncs,
    install,
)

from alternating import assert_same_runs, batches, fresh_model, run_loop
from emulated_cuda import Emulated


def _compiled(space="darts", **kw):
    model = fresh_model(space, "cpu")
    data = batches(space, 2, batch=2, resolution=8, device="cpu")
    return model, compile_supernet(model, data[0][0], **kw), data


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_alternating_loop_matches_uncaptured(space):
    """Arch and weight steps through one emulated capture == the uncaptured compiled module:
    outputs, losses, every gradient (alphas accumulate across the two steps), BN buffers."""
    data = batches(space, 3, batch=2, resolution=8, device="cpu")
    ref_model = fresh_model(space, "cpu")
    ref = compile_supernet(ref_model, data[0][0])
    expected = run_loop(ref_model, ref, data)

    model = fresh_model(space, "cpu")
    compiled = compile_supernet(model, data[0][0])
    backend = Emulated()
    runner = install(compiled, CudaGraphOptions(warmup=2, capture_on_call=1), backend)
    actual = run_loop(model, compiled, data)

    assert_same_runs(expected, actual)
    assert runner.stats.captured == 1
    assert runner.stats.replays == len(data) and runner.stats.backward_replays == len(data)
    assert not runner.stats.fallbacks
    assert backend.events.count("capture") == 2  # forward and backward, once


def test_gradients_accumulate_without_zero_grad():
    """Two backward passes without clearing: ``.grad`` holds the sum, as in eager (a ``.grad``
    aliasing the graph's static memory would hold twice the last gradient instead)."""
    model, compiled, data = _compiled()
    ref_model = fresh_model("darts", "cpu")
    ref = compile_supernet(ref_model, data[0][0])
    install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    for m, module in ((ref_model, ref), (model, compiled)):
        for x, y in data[:3]:
            F.cross_entropy(module(x), y).backward()
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def test_grads_are_not_views_of_static_memory():
    model, compiled, data = _compiled()
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    F.cross_entropy(compiled(data[0][0]), data[0][1]).backward()
    alpha = model.arch_parameters()[0]
    kept = alpha.grad.clone()
    capture = next(iter(runner._captures.values()))
    static = capture.grads.flat[alpha.dtype]
    assert alpha.grad.untyped_storage().data_ptr() != static.untyped_storage().data_ptr()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(data[1][0]), data[1][1]).backward()
    assert not torch.equal(alpha.grad, kept)  # a new batch, a new gradient...
    assert kept.data_ptr() != alpha.grad.data_ptr()


def test_keys_capture_on_call_and_fallback_reasons():
    """First call of a key runs uncaptured; the second captures; another shape (a partial
    batch) is a new key; eval mode is a new key; grad disabled never captures."""
    model, compiled, data = _compiled()
    backend = Emulated()
    runner = install(compiled, CudaGraphOptions(warmup=1, capture_on_call=2, max_captures=2,
                                                warn=False), backend)
    x, y = data[0]
    for _ in range(3):
        F.cross_entropy(compiled(x), y).backward()
    assert runner.stats.captured == 1 and runner.stats.replays == 2
    assert runner.stats.fallbacks == {"key seen 1 time(s), captured on call 2": 1}

    partial = x[:1]
    out = compiled(partial)
    assert out.shape[0] == 1 and runner.stats.replays == 2
    assert runner.stats.fallbacks["key seen 1 time(s), captured on call 2"] == 2

    with torch.no_grad():
        compiled(x)
    assert runner.stats.fallbacks["grad disabled (only training-style calls are captured)"] == 1

    compiled.eval()
    ref = type(compiled).graph_forward(compiled, x)  # uncaptured
    for _ in range(2):
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref)
    assert runner.stats.captured == 2  # train and eval keys
    keys = list(runner._captures)
    assert [k.training for k in keys] == [True, False]

    compiled.train()
    # second sight of the partial batch, both slots taken: the train capture, last replayed
    # 4 capturable calls ago (> max_captures), is stale and evicted for it
    compiled(partial).sum().backward()
    assert runner.stats.evicted == 1 and runner.stats.captured == 3
    assert [(k.training, k.inputs[0][0][0]) for k in runner._captures] == [(False, 2),
                                                                           (True, 1)]
    # the full batch again: eval was replayed 2 calls ago, the partial batch just now; both
    # in use, so it runs uncaptured instead of evicting (no recapture ping-pong)
    out = compiled(x)
    assert runner.stats.fallbacks["max_captures=2 keys captured and in use"] == 1
    assert runner.stats.evicted == 1 and len(runner._captures) == 2


def test_key_parts():
    model, compiled, data = _compiled()
    values = {"v": 0}
    runner = CudaGraphs(compiled, compiled.forward,
                        CudaGraphOptions(guard_values=lambda: values["v"]), Emulated())
    x = data[0][0]
    k1 = runner.key((x,), {})
    assert isinstance(k1, CaptureKey) and k1.training and k1.guards == 0
    assert k1.inputs == ((tuple(x.shape), tuple(x.stride()), x.dtype, "cpu", False),)
    values["v"] = 1
    assert runner.key((x,), {}) != k1
    values["v"] = 0
    assert runner.key((x,), {}) == k1
    assert runner.key((x.double(),), {}) != k1
    assert runner.key((x.contiguous(memory_format=torch.channels_last),), {}) != k1
    alpha = model.arch_parameters()[0]
    alpha.requires_grad_(False)
    assert runner.key((x,), {}).grad_flags != k1.grad_flags
    alpha.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert runner.key((x,), {}).autocast == (True, torch.bfloat16)
    assert runner.key((x,), {"flag": 1}) == "keyword arguments"
    assert runner.key((x, 3), {}) == "a non-tensor (or no) positional argument"
    with torch.inference_mode():
        assert runner.key((x,), {}).startswith("grad disabled")
    for p in model.parameters():
        p.requires_grad_(False)
    assert runner.key((x,), {}) == "nothing requires grad"
    assert "train(" in k1.describe() and "2x3x8x8" in k1.describe()


def test_pending_backward_runs_uncaptured():
    """Two forwards before one backward (losses summed): the second must not overwrite the
    first's activations, so it runs uncaptured; the sum's gradients equal the uncaptured ones."""
    model, compiled, data = _compiled()
    ref_model = fresh_model("darts", "cpu")
    ref = compile_supernet(ref_model, data[0][0])
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1, warn=False),
                     Emulated())
    (x1, y1), (x2, y2) = data[:2]
    for m, module in ((ref_model, ref), (model, compiled)):
        loss = F.cross_entropy(module(x1), y1) + F.cross_entropy(module(x2), y2)
        loss.backward()
    assert runner.stats.fallbacks == {
        "the previous captured call's backward has not run yet": 1}
    for p, q in zip(ref_model.parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    # once backward ran, the next call replays again
    F.cross_entropy(compiled(x1), y1).backward()
    assert runner.stats.replays == 2


def test_warm_up_leaves_batchnorm_buffers_as_one_call_does():
    model, compiled, data = _compiled()
    ref_model = fresh_model("darts", "cpu")
    ref = compile_supernet(ref_model, data[0][0])
    install(compiled, CudaGraphOptions(warmup=3, capture_on_call=1), Emulated())
    x = data[0][0]
    ref(x).sum().backward()
    compiled(x).sum().backward()
    for (name, b), c in zip(ref_model.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, msg=name)
    tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and max(int(t) for t in tracked) == 1  # not 1 + warm-up runs


def test_capture_failure_is_refused_and_reported():
    model, compiled, data = _compiled()
    error = RuntimeError("operation not permitted when stream is capturing")
    runner = install(compiled, CudaGraphOptions(warmup=1, capture_on_call=1),
                     Emulated(fail_capture=error))
    x = data[0][0]
    ref = type(compiled).graph_forward(compiled, x)  # uncaptured
    with pytest.warns(CudaGraphFallbackWarning, match="stream is capturing"):
        out = compiled(x)
    torch.testing.assert_close(out, ref)
    out2 = compiled(x)  # refused once, not retried
    assert [r.status for r in runner.stats.captures] == ["refused"]
    assert "RuntimeError: operation not permitted" in runner.stats.captures[0].note
    assert sum(runner.stats.fallbacks.values()) == 2
    assert out2.shape == ref.shape


class _Syncs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * y.abs().max().item()


def test_host_sync_is_refused_before_capturing():
    gm = fx.symbolic_trace(_Syncs())
    assert host_syncs(gm.graph) == ["item: .item()"]
    backend = Emulated()
    runner = install(gm, CudaGraphOptions(warmup=1, capture_on_call=1, warn=False), backend)
    x = torch.randn(2, 4)
    out = gm(x)
    out.sum().backward()
    assert "capture" not in backend.events
    assert runner.stats.captures[0].status == "refused"
    assert "host sync in the graph (item: .item())" in runner.stats.captures[0].note


def test_moved_parameters_drop_captures():
    model, compiled, data = _compiled()
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    x, y = data[0]
    F.cross_entropy(compiled(x), y).backward()
    alpha = model.arch_parameters()[0]
    alpha.data = alpha.data.clone()  # a new storage under the same Parameter
    F.cross_entropy(compiled(x), y).backward()
    assert runner.stats.dropped == 1 and runner.stats.captured == 2


def test_option_on_cpu_model_falls_back_clearly():
    """The real CUDA backend with a CPU model: every call runs uncaptured, with a warning
    that says why, the same outputs and gradients, and the report counts it."""
    model, compiled, data = _compiled(cuda_graphs=True)
    ref_model = fresh_model("darts", "cpu")
    ref = compile_supernet(ref_model, data[0][0])
    x, y = data[0]
    with pytest.warns(CudaGraphFallbackWarning, match="CUDA is not available|not CUDA"):
        loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per reason
        compiled(x)
    stats = compiled.report.cuda_graphs
    assert stats is compiled.cuda_graphs.stats
    assert stats.captured == 0 and sum(stats.fallbacks.values()) == 2
    assert "uncaptured x2" in compiled.report.to_markdown()
    assert compiled.report.as_dict()["cuda_graphs"]["fallbacks"]


def test_option_is_checked():
    model = fresh_model("nb201", "cpu")
    with pytest.raises(TypeError, match="cuda_graphs"):
        compile_supernet(model, torch.randn(2, 3, 8, 8), cuda_graphs="yes")
    with pytest.raises(ValueError):
        CudaGraphOptions(capture_on_call=0)


def _logits(out):
    return out[-1] if isinstance(out, tuple) else out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("exact", [False, True])
def test_bf16_autocast_uncaptured(exact):
    """Under CPU bf16 autocast the compiled graph runs in bf16 like the eager supernet, and its
    outputs and gradients drift from its own fp32 ones no more than the eager supernet's drift
    from its fp32 ones (bf16 keeps ~3 significant digits; at batch 2 BatchNorm amplifies it)."""
    model = fresh_model("darts", "cpu")
    x, y = batches("darts", 1, batch=2, resolution=8, device="cpu")[0]
    compiled = compile_supernet(model, x, exact=exact)
    drift = {}
    for name, module in (("eager", model), ("compiled", compiled)):
        runs = []
        for amp in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = _logits(module(x))
                loss = F.cross_entropy(out, y)
            loss.backward()
            grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            runs.append((out, torch.cat(grads), len(grads)))
        (out32, g32, n32), (out16, g16, n16) = runs
        assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16 and n32 == n16
        drift[name] = (_cosine(out16, out32), _cosine(g16, g32))
    assert drift["compiled"][0] > 0.999
    assert drift["compiled"][1] > min(0.9, drift["eager"][1] - 0.05), drift


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_channels_last_uncaptured(space):
    """channels_last parameters and inputs give the contiguous run's outputs and gradients."""
    model = fresh_model(space, "cpu")
    x, y = batches(space, 1, batch=2, resolution=8, device="cpu")[0]
    compiled = compile_supernet(model, x)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out = _logits(compiled(x.contiguous(memory_format=fmt)))
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad.contiguous() for p in model.parameters()
                                       if p.grad is not None]))
        model.load_state_dict(state)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for p in model.parameters())
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-5)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_autocast_and_channels_last_through_emulated_capture():
    """The capture specializes to the autocast state and the memory format; the loop through
    it matches the uncaptured loop under the same autocast and layout."""
    data = batches("nb201", 2, batch=2, resolution=8, device="cpu")
    runs = []
    for captured in (False, True):
        model = fresh_model("nb201", "cpu").to(memory_format=torch.channels_last)
        compiled = compile_supernet(model, data[0][0])
        runner = install(compiled, CudaGraphOptions(warmup=1, capture_on_call=1),
                         Emulated()) if captured else None

        def module(x, compiled=compiled):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(x)
        runs.append(run_loop(model, module, data, memory_format=torch.channels_last))
    assert_same_runs(runs[0], runs[1], rtol=1e-2, atol=1e-3)
    key = next(iter(runner._captures))
    assert key.autocast == (True, torch.bfloat16)
    assert runner.stats.replays == len(data)


def test_gpu_script_ratios_and_table():
    """benchmarks/gpu_cuda_graphs.py: ratios to the eager row of the same precision/layout and
    to the hand-captured eager row; rows that did not run say why."""
    from benchmarks.gpu_cuda_graphs import _ratios, section

    rows = [{"name": "eager", "status": "measured", "note": "", "step_s": 0.4, "peak_bytes": 100},
            {"name": "eager, captured by hand", "status": "measured", "note": "",
             "step_s": 0.1, "peak_bytes": 120},
            {"name": "compiled, cuda_graphs", "status": "measured", "note": "", "step_s": 0.08,
             "peak_bytes": 50, "cuda_graphs": {"captures": [{"status": "captured"}],
                                               "replays": 7, "fallbacks": {"x": 1}}},
            {"name": "eager, bf16", "status": "measured", "note": "", "step_s": 0.2},
            {"name": "compiled, bf16", "status": "measured", "note": "", "step_s": 0.1},
            {"name": "exact, cuda_graphs", "status": "failed", "note": "RuntimeError: boom"}]
    _ratios(rows)
    assert rows[2]["time_ratio"] == pytest.approx(0.2)
    assert rows[2]["time_vs_eager_captured"] == pytest.approx(0.8)
    assert rows[2]["peak_ratio"] == pytest.approx(0.5)
    assert rows[4]["time_ratio"] == pytest.approx(0.5)  # to eager, bf16
    assert rows[5]["time_ratio"] is None
    result = {"meta": {"machine": {"device": "cpu", "cpu": "x", "cores": 2, "torch": "t",
                                   "date": "d"}, "command": "c", "revision": "r", "steps": 5,
                       "warmup": 1, "seconds": 1.0},
              "spaces": [{"space": "darts", "sizes_text": "s", "rows": rows}],
              "check": ["darts: ok"], "peers": [{"space": "darts", "peer": "torch.compile(x)",
                                                 "status": "timed out", "note": "no result"}],
              "peers_note": "n"}
    text = section(result)
    assert "| darts | compiled, cuda_graphs | 80.0 | 0.20 | 0.80 |" in text
    assert "1 capture(s), 7 replays, 1 uncaptured: x x1" in text
    assert "failed: RuntimeError: boom" in text and "| timed out |" in text


def test_key_follows_eval_of_the_source_model():
    """``model.eval()`` on the source switches the shared BatchNorm leaves, not the compiled
    module's own flag: the key must still change (a train-mode capture would be wrong)."""
    model, compiled, data = _compiled()
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    x = data[0][0]
    k_train = runner.key((x,), {})
    model.eval()
    k_eval = runner.key((x,), {})
    assert compiled.training and k_train != k_eval
    ref = type(compiled).graph_forward(compiled, x)  # uncaptured
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    assert runner.stats.captured == 1 and runner.stats.replays == 1


def test_deepcopy_gives_a_fresh_layer_for_the_copy():
    import copy

    model, compiled, data = _compiled()
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    x, y = data[0]
    F.cross_entropy(compiled(x), y).backward()
    assert runner.stats.captured == 1
    twin = copy.deepcopy(compiled)
    assert twin.cuda_graphs is not runner and twin.cuda_graphs.module is twin
    assert twin.graph_forward is twin.cuda_graphs and twin.cuda_graphs.stats.captured == 0
    assert twin.report.cuda_graphs is twin.cuda_graphs.stats
    out = twin(x)
    torch.testing.assert_close(out, compiled(x).detach(), rtol=1e-5, atol=1e-6)
    assert twin.cuda_graphs.stats.captured == 1 and runner.stats.captured == 1
