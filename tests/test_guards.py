"""Guards and re-tracing (issue 10): a compiled supernet computes what the model computes for
the same call, or raises a clear error; it never silently returns a stale function."""
from __future__ import annotations

import copy
import functools
import inspect
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from helpers import assert_same_step, logits_of
from supernets import stale_idioms as S
from topo_compiler import (CompiledSupernet, NoMixedOpWarning, TraceError, compile_supernet,
                           spaces)
from topo_compiler.guards import BakedValueWarning, RecompileLimitError


def _compile(model, call, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, call.args(), example_kwargs=call.kwargs or None, **kw)


def _assert_same(model, compiled, call, exact=True):
    """Outputs and gradients of ``compiled`` agree on ``call`` with the model's own (exact
    mode) or with a fresh compile of the model as it is now (the default mode changes the
    supernet on purpose, so the eager model is not its oracle)."""
    torch.manual_seed(0)
    args = call.args()
    if exact:
        oracle = functools.partial(model, **call.kwargs)
    else:
        oracle = functools.partial(_compile(model, S.Call(lambda: args, call.kwargs)),
                                   **call.kwargs)
    assert_same_step(_Bound(model, oracle), _Bound(model, functools.partial(compiled,
                                                                             **call.kwargs)),
                     args, rtol=1e-4, atol=1e-5)


class _Bound(nn.Module):
    """Calls ``fn`` but names parameters and state as ``model`` (whose tensors it uses)."""

    def __init__(self, model, fn):
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "fn", fn)

    def named_parameters(self, *a, **k):
        return self.model.named_parameters(*a, **k)

    def state_dict(self, *a, **k):
        return self.model.state_dict(*a, **k)

    def load_state_dict(self, *a, **k):
        return self.model.load_state_dict(*a, **k)

    def forward(self, *args):
        return self.fn(*args)


def _retraces(compiled) -> int:
    return compiled.__dict__["_dispatch"].retraces


# Re-traces each idiom's state changes need: a float that changes is traced once more as a
# run-time input (automatic dynamic), then never again; every other change is a new variant
# for each new value (values seen before reuse their variant).
RETRACES = {"drop_path": 2, "temperature": 1, "aux_head": 1, "global_scheduler": 1, "model_arch": 3,
            "index_arg": 3, "tuple_arg": 3, "mode_arg": 2, "int_batch": 2,
            "shape_branch": 2, "pruning_mask": 3, "bool_flags": 2, "keyword_only": 1}


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("name", sorted(S.STALE))
def test_compiled_follows_every_state_change(name, exact):
    S.reset_globals()
    idiom = S.STALE[name]
    model = idiom.factory()
    compiled = _compile(model, idiom.example, exact=exact)
    _assert_same(model, compiled, idiom.example, exact)
    for change, call in idiom.steps:
        change(model)
        _assert_same(model, compiled, call, exact)
        _assert_same(model, compiled, call, exact)  # a second call reuses the variant
    assert _retraces(compiled) == RETRACES[name], compiled.report.variants
    assert len(compiled.report.variants) == RETRACES[name] + 1
    S.reset_globals()


def test_temperature_becomes_a_run_time_input():
    model = S.TemperatureNet()
    compiled = _compile(model, S._same())
    x = S._x()
    for tau in (5.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.005):  # more than the cache
        model.set_tau(tau)
        torch.testing.assert_close(compiled(x), model(x))
    assert _retraces(compiled) == 1
    assert "now read at run time: `tau`" in compiled.report.variants[-1]
    assert "_dynamic_tau" in compiled.variants[0].module.code


def test_report_lists_variants_and_why():
    model = S.IndexArgNet()
    compiled = _compile(model, S.STALE["index_arg"].example)
    x = S._x()
    compiled(x, 2)
    compiled(x, index=1)
    text = compiled.report.to_markdown()
    assert compiled.report.variants == [
        "variant 1: first trace",
        "variant 2: argument `index` changed from 0 to 2",
        "variant 3: argument `index` changed from 2 to 1"]
    assert "### Variants" in text and "argument `index` == 0" in text
    assert compiled.report.as_dict()["variants"] == compiled.report.variants


def test_cache_limit_names_the_value_and_the_way_out():
    model = S.IndexArgNet()
    compiled = _compile(model, S.STALE["index_arg"].example, cache_size_limit=2)
    x = S._x()
    compiled(x, 1)
    with pytest.raises(RecompileLimitError) as info:
        compiled(x, 2)
    message = str(info.value)
    assert "argument `index`" in message and "cache_size_limit=2" in message
    assert "1 -> 2" in message and "way out" in message
    torch.testing.assert_close(compiled(x, 1), model(x, 1))  # cached variants still run


class ThresholdNet(nn.Module):
    """A float attribute deciding Python control flow: the condition is guarded, not the
    float, which is read at run time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.p = 0.1

    def forward(self, x):
        if self.p > 0.5:
            x = F.relu(x)
        return self.conv(x) * self.p


class FloatNet(ThresholdNet):
    """``float(self.p)`` needs the number itself: it stays a guarded constant."""

    def forward(self, x):
        return self.conv(x) * float(self.p)


def test_condition_on_a_run_time_float_is_guarded_by_its_outcome():
    model = ThresholdNet()
    compiled = _compile(model, S.Call(lambda: (S._x(),)))
    x = S._x()
    for p in (0.2, 0.7, 0.9, 0.3, 0.05, 0.6):
        model.p = p
        torch.testing.assert_close(compiled(x), model(x))
    assert _retraces(compiled) == 2, compiled.report.variants
    assert "the condition `if self.p > 0.5:`" in compiled.report.variants[-1]


def test_float_needed_by_python_stays_constant_and_hits_the_limit():
    model = FloatNet()
    compiled = _compile(model, S.Call(lambda: (S._x(),)), cache_size_limit=3)
    x = S._x()
    for p in (0.2, 0.7):
        model.p = p
        torch.testing.assert_close(compiled(x), model(x))
    assert "decides Python control flow" in compiled.report.variants[1]
    model.p = 0.3
    with pytest.raises(RecompileLimitError, match=r"`p`.*keeps changing"):
        compiled(x)


def test_pruned_candidates_are_not_in_the_graph():
    model = S.PruningMaskNet()
    compiled = _compile(model, S._same(), passes=())
    assert "cells.0._ops.0.1" in _called_modules(compiled)
    model.prune(0, 0)
    model.prune(1, 0)
    x = S._x()
    torch.testing.assert_close(compiled(x), model(x))
    pruned = compiled.variants[0].module
    assert pruned is not compiled
    called = _called_modules(pruned)
    assert "cells.0._ops.0" not in called and "cells.1._ops.0" not in called
    assert "cells.0._ops.1.1" in called
    assert [g.access for g in compiled.variants[0].guards.guards
            if g.access[0] == "tensor"] == [("tensor", "", "mask", ())]


def _called_modules(gm) -> str:
    """The real paths of the modules the graph calls (lowering reaches them through aliases)."""
    paths = {id(m): name for name, m in gm.named_modules(remove_duplicate=False)}
    return " ".join(paths[id(gm.get_submodule(n.target))] for n in gm.graph.nodes
                    if n.op == "call_module")


def test_decision_on_trained_weights_alone_is_still_refused():
    class ArgmaxNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.alphas = nn.Parameter(torch.randn(2))
            self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1)])

        def forward(self, x):
            if self.alphas[0] > self.alphas[1]:
                return self.ops[0](x)
            return self.ops[1](x)

    with pytest.raises(TraceError, match="depends on tensor data"):
        _compile(ArgmaxNet(), S._same())


def test_keyword_calls_and_argument_names():
    model = S.IndexArgNet()
    compiled = _compile(model, S.STALE["index_arg"].example)
    assert "index" in inspect.signature(compiled.forward).parameters
    x = S._x()
    torch.testing.assert_close(compiled(x=x, index=3), model(x, 3))
    kw = S.KeywordOnlyNet()
    compiled = _compile(kw, S.Call(lambda: (S._x(),), {"tau": 0.5}))
    torch.testing.assert_close(compiled(x, tau=0.5), kw(x, tau=0.5))
    torch.testing.assert_close(compiled(x), kw(x))  # the default, 1.0
    with pytest.raises(TypeError, match="example_kwargs names nope"):
        _compile(kw, S.Call(lambda: (S._x(),), {"nope": 1}))


def test_model_methods_run_the_compiled_forward():
    model = S.LossMethodNet()
    compiled = _compile(model, S._same())
    calls = []
    compiled.register_forward_hook(lambda *a: calls.append(1))
    x, y = S._x(), torch.tensor([1, 2])
    torch.testing.assert_close(compiled.loss(x, y), model.loss(x, y))
    assert calls == [1], "compiled.loss must call the compiled forward through self(x)"
    compiled.set_tau(0.5)  # a method writing the model's attribute
    assert model.tau == 0.5 and compiled.get_tau() == 0.5
    torch.testing.assert_close(compiled(x), model(x))


def test_eval_on_the_compiled_module_reaches_the_model():
    model = S.AuxHeadNet()
    compiled = _compile(model, S._same())
    compiled.eval()
    assert not model.training
    x = S._x()
    torch.testing.assert_close(compiled(x), model(x))
    compiled.train()
    assert model.training


def test_baked_values_are_reported_with_their_line():
    scale = 0.25

    class ClosureNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) * scale

    class _Config:
        rate = 0.0

    class NestedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.cfg = _Config()
            self.cfg.rate = 0.3

        def forward(self, x):
            return self.conv(x) * self.cfg.rate

    for net, what in ((ClosureNet(), "closure variable `scale` = 0.25"),
                      (NestedNet(), "= 0.3")):
        with pytest.warns(BakedValueWarning, match="test_guards.py:") as record:
            warnings.simplefilter("ignore", NoMixedOpWarning)
            compiled = compile_supernet(net, S._x())
        assert len([w for w in record if w.category is BakedValueWarning]) == 1
        assert any(what in b for b in compiled.report.baked_values), \
            compiled.report.baked_values


def test_builtin_spaces_have_no_baked_values_and_guard_only_attributes():
    model = spaces.build("nb201", C=4, layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BakedValueWarning)
        compiled = compile_supernet(model, spaces.default_input("nb201", resolution=8),
                                    passes=())
    assert compiled.report.baked_values == []
    guards = compiled.variants[0].guards.guards
    # attributes, and the identity of the objects the graph reads (replacing one re-traces)
    assert all(g.access[0] in ("attr", "ident") for g in guards)
    assert any(g.access[0] == "attr" for g in guards)


# -- a random search loop -----------------------------------------------------------------

class StatefulNet(nn.Module):
    """Temperature, train/eval branch, pruning mask and a path index, all in one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, S.C, 3, padding=1, bias=False)
        self.cell = S.MaskedMixedOp(S.C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))
        self.register_buffer("mask", torch.ones(4))
        self.extra = S.ChoiceBlock(S.C)
        self.tau = 1.0

    def forward(self, x, index):
        x = self.stem(x)
        out = self.cell(x, F.softmax(self.alphas / self.tau, dim=-1) * self.mask)
        if self.training:
            out = out + self.extra(x, index)
        return out


_CHANGES = st.one_of(
    st.tuples(st.just("tau"), st.sampled_from([0.1, 0.5, 2.0, 5.0])),
    st.tuples(st.just("train"), st.booleans()),
    st.tuples(st.just("prune"), st.integers(0, 3)),
    st.tuples(st.just("restore"), st.just(0)),
    st.tuples(st.just("call"), st.tuples(st.integers(0, 2), st.sampled_from([2, 3]))),
)


@settings(max_examples=6, deadline=None)
@given(st.lists(_CHANGES, min_size=1, max_size=7))
def test_random_state_changes_interleaved_with_calls(sequence):
    torch.manual_seed(0)
    model = StatefulNet()
    compiled = _compile(model, S.Call(lambda: (S._x(), 0)), exact=True, cache_size_limit=64)
    for kind, value in sequence + [("call", (1, 2))]:
        if kind == "tau":
            model.tau = value
        elif kind == "train":
            model.train(value)
        elif kind == "prune" and int(model.mask.sum()) > 1:
            model.mask[value] = 0
        elif kind == "restore":
            model.mask.fill_(1)
        elif kind == "call":
            index, batch = value
            _assert_same(model, compiled, S.Call(lambda: (S._x(batch), index)))


# -- the compiled module stays the model: copies, pickles, state dicts ---------------------

_SMALL = {"darts": dict(C=4, layers=3)}
_EDGE = {"darts": dict(C=4, edge=True), "nb201": dict(C=4, layers=1),
         "wide": dict(C=4, edge=True)}
"""One edge of the larger spaces (their networks take seconds to compile on a shared CI
core); NB201's smallest network compiles as fast.  One DARTS network (3 cells) is
deep-copied too."""


def _space(name, sizes):
    torch.manual_seed(0)
    model = spaces.build(name, **sizes).eval()
    return model, spaces.default_input(name, resolution=8, **sizes)


@pytest.mark.parametrize("name, sizes, exact", [
    (name, _EDGE[name], exact) for name in sorted(_EDGE) for exact in (False, True)]
    + [("darts", _SMALL["darts"], False)])
def test_deepcopy_is_a_working_independent_compiled_supernet(name, sizes, exact):
    model, x = _space(name, sizes)
    compiled = _compile(model, S.Call(lambda: (x,)), exact=exact)
    twin = copy.deepcopy(compiled)
    assert isinstance(twin, CompiledSupernet) and twin is not compiled
    assert [s.name for s in twin.report.stages] == [s.name for s in compiled.report.stages]
    assert twin.source_model is not model
    ours = {id(p) for p in model.parameters()}
    assert not any(id(p) in ours for p in twin.parameters())
    assert len(twin.arch_parameters()) == len(model.arch_parameters())
    before = logits_of(compiled(x))
    torch.testing.assert_close(logits_of(twin(x)), before)
    deltas = [torch.randn_like(a) for a in model.arch_parameters()]
    with torch.no_grad():
        for a, d in zip(twin.arch_parameters(), deltas):
            a.add_(d)
    after = logits_of(twin(x))
    assert not torch.allclose(after, before), "the copy's forward reads the copy's alphas"
    torch.testing.assert_close(logits_of(compiled(x)), before)  # the original is untouched
    if exact:
        torch.testing.assert_close(after, logits_of(twin.source_model(x)), rtol=1e-4,
                                   atol=1e-5)
    with torch.no_grad():
        for a, d in zip(model.arch_parameters(), deltas):
            a.add_(d)
    torch.testing.assert_close(logits_of(compiled(x)), after)
    twin.train()  # the copy's guards read the copy's model
    assert twin.source_model.training and not model.training


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("name", sorted(_EDGE))
def test_pickle_and_torch_save_round_trip(name, exact):
    model, x = _space(name, _EDGE[name])
    compiled = _compile(model, S.Call(lambda: (x,)), exact=exact)
    buffer = io.BytesIO()
    torch.save(compiled, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(compiled)),
                   torch.load(buffer, weights_only=False)):
        assert isinstance(loaded, CompiledSupernet)
        assert loaded.report.passes == compiled.report.passes
        assert loaded.report.exact == exact
        assert [str(s.counts) for s in loaded.report.stages] == \
            [str(s.counts) for s in compiled.report.stages]
        assert loaded.source_model is not model and not loaded.source_model.training
        torch.testing.assert_close(logits_of(loaded(x)), logits_of(compiled(x)))
        assert loaded.state_dict().keys() == compiled.state_dict().keys()


@pytest.mark.parametrize("name", sorted(_EDGE))
def test_state_dict_round_trips(name):
    model, x = _space(name, _EDGE[name])
    compiled = _compile(model, S.Call(lambda: (x,)))
    assert compiled.state_dict().keys() == model.state_dict().keys()
    torch.manual_seed(1)
    other = spaces.build(name, **_EDGE[name]).eval()
    target = _compile(other, S.Call(lambda: (x,)))
    assert not torch.allclose(logits_of(target(x)), logits_of(compiled(x)))
    target.load_state_dict(compiled.state_dict())
    torch.testing.assert_close(logits_of(target(x)), logits_of(compiled(x)))
    torch.testing.assert_close(logits_of(other(x)), logits_of(model(x)))


def test_stale_idioms_pickle_with_their_state():
    model = S.TemperatureNet()
    compiled = _compile(model, S._same())
    model.set_tau(0.5)
    x = S._x()
    compiled(x)  # tau is now read at run time
    loaded = pickle.loads(pickle.dumps(compiled))
    loaded.set_tau(0.2)
    torch.testing.assert_close(loaded(x), loaded.source_model(x))
    assert _retraces(loaded) == 0


class _DictBatch(nn.Module):
    """``forward(batch)`` reading ``batch['x']`` (and optionally a scale tensor)."""

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)])
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, batch):
        x = batch["x"]
        out = sum(w * op(x) for w, op in zip(F.softmax(self.alpha, -1), self.ops))
        return out * batch["scale"] if "scale" in batch else out


@pytest.mark.parametrize("keys", [("x",), ("x", "scale")])
def test_dict_of_tensors_is_a_graph_input(keys):
    """A dict argument holding tensors was baked in as a constant and every call raised
    `Boolean value of Tensor ... ambiguous` from the guard; now its tensors are read at run
    time and a call with another dict gives the model's output."""
    torch.manual_seed(0)
    model = _DictBatch()

    def batch():
        b = {"x": torch.randn(2, 4, 8, 8), "scale": torch.rand(())}
        return {k: b[k] for k in keys}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, (batch(),), exact=True)
    assert not [n for n in compiled.graph.nodes if n.op == "get_attr" and "constant" in n.target]
    for _ in range(2):
        b = batch()
        torch.testing.assert_close(compiled(b), model(b))
    assert len(compiled.report.variants) == 1


def test_argument_mixing_tensors_and_values_is_refused_by_name():
    """A dict holding a tensor beside a number cannot be a graph input; the error names the
    argument and the way out instead of baking the tensor in."""
    class Mixed(_DictBatch):
        def forward(self, batch):
            return super().forward({"x": batch["x"]}) * batch["n"]

    with pytest.raises(TraceError, match=r"argument `batch`.*\n(.*\n)*.*way out: pass the "
                                         r"tensors of `batch` as separate forward arguments"):
        compile_supernet(Mixed(), ({"x": torch.randn(2, 4, 8, 8), "n": 3},))


def test_guard_comparison_never_asks_a_tensor_for_its_truth_value():
    from topo_compiler.guards import _same
    t = torch.ones(3)
    assert _same(t, t) and not _same(t, t.clone()) and not _same([t], [t.clone()])
