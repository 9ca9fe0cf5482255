"""Every way into a compiled supernet checks its guards (issue: guard entry points).

``compiled(x)`` checks the guards and re-traces when one fails; so must ``compiled.forward(x)``
(wrappers and trainers call ``self.model.forward(...)``), and module hooks registered on the
compiled module must run once per call whatever variant runs, as on the eager model.  Each
test compares with the eager model after a change that re-traces (``model.arch`` resampled,
SPOS-style: another path, another output).
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from supernets import stale_idioms as S
from topo_compiler import CompiledSupernet, compile_supernet
from topo_compiler.cuda_graphs import CudaGraphOptions, install

from emulated_cuda import Emulated


def _compiled(model: nn.Module, x: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, x, exact=True, **kw)


def _arch_net():
    torch.manual_seed(0)
    model = S.ModelArchNet().eval()  # eval: BatchNorm statistics stay put across calls
    x = S._x()
    return model, x, _compiled(model, x)


# -- compiled.forward ------------------------------------------------------------------------
def test_forward_checks_the_guards_and_retraces():
    model, x, compiled = _arch_net()
    before = model(x)
    torch.testing.assert_close(compiled.forward(x), before)
    model.arch = [1, 2]
    expected = model(x)
    assert not torch.allclose(expected, before)  # the first variant's answer is stale now
    torch.testing.assert_close(compiled.forward(x), expected)
    assert len(compiled.variants) == 2
    torch.testing.assert_close(compiled.forward(x=x), expected)  # keywords bind as well
    model.arch = [0, 0]  # back to the first variant: no new trace
    torch.testing.assert_close(compiled.forward(x), model(x))
    assert len(compiled.variants) == 2


class _Wrapper(nn.Module):
    """A trainer-side wrapper that calls the wrapped model's ``forward`` directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward(x) * 2


def test_wrapper_calling_forward_follows_the_model():
    model, x, compiled = _arch_net()
    wrapped = _Wrapper(compiled)
    model.arch = [3, 1]
    torch.testing.assert_close(wrapped(x), 2 * model(x))


def test_forward_survives_graph_edit_recompile_deepcopy_and_pickle():
    model, x, compiled = _arch_net()
    # the documented fx workflow: edit ``compiled.graph``, then ``recompile()`` (which writes
    # the generated code on the class again)
    (out,) = [n for n in compiled.graph.nodes if n.op == "output"]
    with compiled.graph.inserting_before(out):
        doubled = compiled.graph.call_function(torch.mul, (out.args[0], 2.0))
    out.args = (doubled,)
    compiled.recompile()
    torch.testing.assert_close(compiled(x), 2 * model(x))
    torch.testing.assert_close(compiled.forward(x), 2 * model(x))
    model.arch = [2, 2]  # a re-trace compiles the model as it is: the edit was to variant 1
    torch.testing.assert_close(compiled.forward(x), model(x))
    torch.testing.assert_close(compiled(x), model(x))

    twin = copy.deepcopy(compiled)
    loaded = pickle.loads(pickle.dumps(compiled))
    for other in (twin, loaded):
        other.source_model.arch = [1, 3]
        torch.testing.assert_close(other.forward(x), other.source_model(x))
        other.recompile()
        other.source_model.arch = [0, 1]
        torch.testing.assert_close(other.forward(x), other.source_model(x))


class _ForwardLossNet(S.ModelArchNet):
    """A model method calling ``self.forward(x)`` (no hooks on the eager model either)."""

    def loss(self, x):
        return self.forward(x).square().mean()


def test_model_method_calling_self_forward_is_guarded_and_hookless_like_eager():
    torch.manual_seed(0)
    model, x = _ForwardLossNet().eval(), S._x()
    compiled = _compiled(model, x)
    calls = []
    for m in (model, compiled):
        m.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(compiled.loss(x), model.loss(x))
    model.arch = [2, 1]
    torch.testing.assert_close(compiled.loss(x), model.loss(x))
    assert calls == []  # self.forward(x) runs no hook, on the model or the compiled module


def test_data_parallel_replica_is_refused_not_stale():
    """``nn.DataParallel`` over several GPUs calls ``_replicate_for_data_parallel``; fx's
    replica ran the first variant's code without guards (stale after ``model.arch`` changes).
    On one device DataParallel calls the module itself, guards included."""
    model, x, compiled = _arch_net()
    with pytest.raises(TypeError, match="DataParallel .* without its guards"):
        compiled._replicate_for_data_parallel()
    model.arch = [2, 3]
    torch.testing.assert_close(nn.DataParallel(compiled, device_ids=[])(x), model(x))


def test_distributed_data_parallel_wraps_the_guarded_module(tmp_path):
    """The way out the DataParallel refusal names: DistributedDataParallel calls the compiled
    module itself (one gloo process on CPU here), so a change that re-traces is followed and
    the model's parameters get eager's gradients."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    model, x, compiled = _arch_net()
    eager = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(compiled)
        model.arch = eager.arch = [1, 2]
        ddp(x).square().sum().backward()
        eager(x).square().sum().backward()
    finally:
        dist.destroy_process_group()
    assert len(compiled.variants) == 2
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


# -- hooks on the compiled module ------------------------------------------------------------
def _hooked_pair():
    model, x, compiled = _arch_net()
    calls = {"model": [], "compiled": []}
    handles = {}
    for name, m in (("model", model), ("compiled", compiled)):
        def pre(mod, args, name=name):
            calls[name].append("pre")
            return (args[0] * 0.5,)

        def post(mod, args, out, name=name):
            calls[name].append("post")
            return out + 1.0
        handles[name] = (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
    return model, x, compiled, calls, handles


def test_hooks_run_once_per_call_across_a_retrace():
    model, x, compiled, calls, handles = _hooked_pair()
    for arch in ([0, 0], [1, 2], [3, 3], [1, 2]):
        model.arch = arch
        torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled.variants) == 3
    assert calls["compiled"] == calls["model"] == ["pre", "post"] * 4
    for h in handles["model"] + handles["compiled"]:
        h.remove()
    model.arch = [2, 0]
    torch.testing.assert_close(compiled(x), model(x))  # removed hooks no longer run
    assert calls["compiled"] == calls["model"] == ["pre", "post"] * 4


def test_hooks_with_keywords_and_global_hooks_run_once():
    model, x, compiled = _arch_net()
    seen = []

    def pre(mod, args, kwargs):
        seen.append(("pre", tuple(kwargs)))
        return args, {"x": kwargs["x"] * 3}
    compiled.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_pre_hook(pre, with_kwargs=True)
    everywhere = []  # compiled modules a global hook sees: the one called, not its variant
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: everywhere.append(mod is compiled)
        if isinstance(mod, CompiledSupernet) else None)
    try:
        model.arch = [1, 1]
        torch.testing.assert_close(compiled(x=x), model(x=x))
        assert everywhere == [True]
    finally:
        handle.remove()
    assert seen == [("pre", ("x",))] * 2


def test_backward_hook_runs_once_per_backward_across_a_retrace():
    model, x, compiled = _arch_net()
    grads = {"model": [], "compiled": []}
    for name, m in (("model", model), ("compiled", compiled)):
        m.register_full_backward_hook(
            lambda mod, gin, gout, name=name: grads[name].append(gout[0].clone()))
    for arch in ([0, 0], [2, 1]):
        model.arch = arch
        for m in (model, compiled):
            m(x.clone().requires_grad_()).square().sum().backward()
    assert len(grads["compiled"]) == len(grads["model"]) == 2
    for g, e in zip(grads["compiled"], grads["model"]):
        torch.testing.assert_close(g, e)


# -- CUDA graphs (emulated on CPU) -----------------------------------------------------------
def test_forward_goes_through_the_cuda_graph_runner_of_each_variant():
    torch.manual_seed(0)
    model, x = S.ModelArchNet(), S._x()
    compiled = _compiled(model, x)
    runner = install(compiled, CudaGraphOptions(warmup=0, capture_on_call=1), Emulated())
    compiled.forward(x).sum().backward()
    assert runner.stats.captured == 1
    model.arch = [2, 3]
    ref = model(x)
    out = compiled.forward(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert len(compiled.variants) == 2
    assert [k.variant for k in runner._captures] == [1, 2]
    compiled.forward(x).sum().backward()  # the new variant's capture replays
    assert runner.stats.replays == 3 and not runner.stats.fallbacks  # a capture replays too
    compiled.recompile()  # the runners stay in place; the recompiled code is a new key
    model.arch = [0, 0]
    compiled.forward(x).sum().backward()
    assert runner.stats.captured == 3 and [k.variant for k in runner._captures][-1] == 1


def test_pickle_keeps_cuda_graphs():
    torch.manual_seed(0)
    model, x = S.ModelArchNet(), S._x()
    compiled = _compiled(model, x)
    options = CudaGraphOptions(warmup=0, capture_on_call=1, max_captures=3)
    install(compiled, options, Emulated())
    loaded = pickle.loads(pickle.dumps(compiled))
    runner = loaded.cuda_graphs
    assert runner is not compiled.cuda_graphs and runner.module is loaded
    assert runner.options == options and isinstance(runner.backend, Emulated)
    assert loaded.report.cuda_graphs is runner.stats
    loaded(x).sum().backward()
    loaded.source_model.arch = [1, 1]
    torch.testing.assert_close(loaded(x), loaded.source_model(x))
    assert runner.stats.captured == 2  # the loaded module captures again, every variant

    asked = _compiled(S.ModelArchNet(), x, cuda_graphs=CudaGraphOptions(warn=False))
    again = pickle.loads(pickle.dumps(asked))  # compile_supernet(cuda_graphs=...) on CPU
    assert again.cuda_graphs.options == CudaGraphOptions(warn=False)
    again(x)
    assert again.report.cuda_graphs.fallbacks  # CPU tensors: uncaptured, and counted
