"""SNAS, DrNAS, ProxylessNAS, NASLib-style and NNI 3.x-style supernets
(:mod:`supernets.search_loops`) compiled unchanged (or with the one option an error names)
and trained by their codebases' own search loops.

Exact mode is compared with eager in float64 (the default dtype while those tests build and
run).  Random forwards (SNAS's relaxed one-hot sample, DrNAS's Dirichlet sample,
ProxylessNAS's ``torch.multinomial`` paths) are compared from the same RNG state.

These styles exposed nine compiler bugs, each minimized into a test here; all are fixed
(tests/test_guards_reads.py, test_partial_state.py and test_model_modules.py test the
fixes directly). What they were:

* a numpy scalar (SNAS's ``initial_temp * np.exp(-anneal_rate * epoch)`` temperature) in the
  graph is written into the generated code as ``np.float64(0.5)`` (numpy 2's repr), and the
  first call raises ``NameError: name 'np' is not defined``;
* a plain attribute of a submodule read from its parent's forward (ProxylessNAS's
  ``self.mobile_inverted_conv.is_zero_layer()``, ``self.leaf.on``) is not guarded: the child
  is read from the parent's shadow as the real module, whose reads are not recorded;
* an attribute of a global class (``MixedEdge.MODE``, ProxylessNAS's gradient mode) is not
  guarded and not reported as baked: switching the mode keeps the old graph, silently;
* a re-trace that meets an untraceable forward raises ``TraceError`` from ``compiled(x)``
  mid-search although ``partial=True`` is the default;
* a partially compiled module is a shallow copy of the model's tree: state the loop sets on
  the model's modules (ProxylessNAS's sampled path) never reaches it, silently;
* ``torch.tensor([t], dtype=...)`` in a forward makes compiling emit torch.fx's internal
  "Does not support nested parametric types ... Please file a bug." ``UserWarning``;
* a Parameter two dict levels deep (NASLib's alphas in networkx edge data) is read as the
  real tensor: ``softmax(alpha)`` is baked as a constant with autograd history, silently;
* ``compiled.modules()`` yields plain ``nn.Module`` mirrors of the model's containers, so
  NNI 3's loop setting ``m._softmax.tau`` on them changes nothing;
* ``F.gumbel_softmax``'s default ``eps`` is reported as a baked value (a false warning).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import Reseeding, assert_same_step
from supernets.search_loops import (NUM_CLASSES, STYLES, GumbelSoftmax, MixedEdge, drnas_search,
                                    naslib_search, nni3_search, proxyless_search, snas_search)
from topo_compiler import compile_supernet
from topo_compiler.guards import RecompileLimitError

TIGHT = dict(rtol=1e-9, atol=1e-11)
LOOSE = dict(rtol=1e-8, atol=1e-10)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def proxyless_mode():
    """``MixedEdge.MODE`` is a class attribute: never leak a test's mode into another."""
    MixedEdge.MODE = None
    yield
    MixedEdge.MODE = None


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return STYLES[name].build()


def _compile(model, args, expect=(), **kw):
    """Compile, asserting the compiler warns nothing but the messages in ``expect``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_supernet(model, args, **kw)
    left = [str(w.message) for w in caught if not any(e in str(w.message) for e in expect)]
    assert not left, left
    return compiled


def _batches(n: int, batch: int = 4) -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 8, 8, generator=gen),
             torch.randint(0, NUM_CLASSES, (batch,), generator=gen)) for _ in range(n)]


def _assert_same_records(want: list, got: list) -> None:
    assert len(want) == len(got)
    for step, (a, b) in enumerate(zip(want, got)):
        torch.testing.assert_close(b[0], a[0], **TIGHT, msg=f"losses, step {step}")
        if len(a) == 4:  # ProxylessNAS: the sampled paths
            assert b[1] == a[1], f"paths, step {step}"
        for x, y in zip(a[-1], b[-1]):
            torch.testing.assert_close(y, x, **LOOSE, msg=f"step {step}")


# -- SNAS and DrNAS: one step -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["snas", "drnas"])
def test_exact_mode_step_equals_eager(name, float64):
    """Each compiles as written, every mixed op is found, and outputs and gradients (weights,
    input, alphas) of a sampling forward equal eager's from the same RNG state; another batch
    size needs no re-trace where Python does not read it (SNAS)."""
    model = _build(name)
    args = STYLES[name].example_inputs()
    compiled = _compile(model, args, exact=True)
    assert len(compiled.report.mixed_ops) == STYLES[name].num_mixed_ops
    assert compiled.report.final.counts.total < compiled.report.input.counts.total
    eager, twin = Reseeding(model), Reseeding(compiled)
    assert_same_step(eager, twin, args, extra=model.arch_parameters(), **TIGHT)
    first, second = model(*args), model(*args)
    assert not torch.allclose(first[0] if name == 'snas' else first,
                              second[0] if name == 'snas' else second)  # it samples
    if name == 'snas':
        x3 = torch.randn(3, 3, 8, 8)
        assert_same_step(eager, twin, (x3, 0.5), extra=model.arch_parameters(), **TIGHT)
        assert len(compiled.report.variants) == 2, compiled.report.variants  # 0.5: run time


def test_snas_search_with_annealed_temperature_gives_eager_alphas(float64):
    """SNAS's joint step (cross entropy + resource penalty from the sampled Z) over 6 epochs,
    the temperature annealed every epoch (as a Python float: see the numpy xfail), through
    the compiled module: eager's losses, alphas and BatchNorm statistics after every step.
    The temperature becomes a run-time input after its first change: 2 variants in all."""
    data = _batches(6)
    eager = _build('snas')
    temps = dict(initial_temp=1.0, anneal_rate=0.3, as_float=True)
    torch.manual_seed(7)
    want = snas_search(eager, eager, data, **temps)
    model = _build('snas')
    compiled = _compile(model, (data[0][0][:2], 1.0), exact=True)
    torch.manual_seed(7)
    got = snas_search(compiled, model, data, **temps)
    _assert_same_records(want, got)
    assert not torch.allclose(want[-1][1][0], _build('snas').alphas_normal)
    assert len(compiled.report.variants) == 2, compiled.report.variants
    assert "now read at run time: argument `temperature`" in compiled.report.variants[1]


def test_snas_numpy_temperature_as_upstream_writes_it(float64):
    """The temperature exactly as SNAS's loop computes it, a ``numpy.float64``."""
    model = _build('snas')
    (x, _) = STYLES['snas'].example_inputs()
    compiled = _compile(model, (x, np.float64(1.0)), exact=True)
    for epoch in range(3):
        t = 1.0 * np.exp(-0.3 * epoch)
        torch.testing.assert_close(Reseeding(compiled)(x, t)[0], Reseeding(model)(x, t)[0],
                                   **TIGHT)


class _NumpyScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = np.float64(0.5)

    def forward(self, x, t):
        return x * t * self.scale


def test_numpy_scalar_argument_minimal():
    model = _NumpyScale()
    x = torch.randn(3)
    compiled = _compile(model, (x, np.float64(2.0)),
                        expect=("has no mixed op",), exact=True)
    torch.testing.assert_close(compiled(x, np.float64(2.0)), model(x, np.float64(2.0)))


class _TensorOfList(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))

    def forward(self, x, t):
        return x * F.softmax(self.alpha / torch.tensor([t], dtype=x.dtype), dim=-1).sum()


def test_torch_tensor_of_a_list_compiles_without_warnings():
    from topo_compiler import descriptors
    descriptors._schema_template.cache_clear()  # it warns once per process (lru_cache)
    model = _TensorOfList()
    x = torch.randn(3)
    compiled = _compile(model, (x, 1.0), expect=("has no mixed op",), exact=True)
    torch.testing.assert_close(compiled(x, 1.0), model(x, 1.0))


# -- DrNAS ------------------------------------------------------------------------------------
def test_drnas_progressive_search_gives_eager_alphas(float64):
    """DrNAS's two stages (k = 4, then ``wider(2)``: new, wider parameters, a new optimizer),
    two epochs each of architecture step (``_loss`` with its KL term) and weight step:
    eager's losses, alphas and statistics after every epoch.  The stage switch is followed
    (one re-trace on ``k`` and the replaced modules); compiled with the search batch size
    (``channel_shuffle`` reads ``x.size()``, so the batch is guarded)."""
    data = _batches(8)
    eager = _build('drnas')
    torch.manual_seed(7)
    want = drnas_search(eager, eager, data)
    model = _build('drnas')
    compiled = _compile(model, data[0][0], exact=True)
    torch.manual_seed(7)
    got = drnas_search(compiled, model, data)
    _assert_same_records(want, got)
    assert all(op.k == 2 for cell in model.cells for op in cell._ops)
    assert model.stem[0].weight.shape == eager.stem[0].weight.shape
    assert len(compiled.report.variants) == 2, compiled.report.variants
    assert "._ops.0.k`" in compiled.report.variants[1]
    assert "changed from 4 to 2" in compiled.report.variants[1]
    x = data[0][0]
    torch.testing.assert_close(Reseeding(compiled)(x), Reseeding(model)(x), **TIGHT)


# -- ProxylessNAS -----------------------------------------------------------------------------
def test_proxyless_sampled_path_every_step_hits_the_recompile_limit():
    """A path sampled every step is a guarded Python list (``active_index``): each new
    combination re-traces, and past ``cache_size_limit`` the call raises
    ``RecompileLimitError`` naming the attribute and ``leaf_modules`` as the way out; every
    call before that gives eager's output."""
    model = _build('proxyless')
    x = torch.randn(2, 3, 8, 8)
    compiled = _compile(model, x, expect=("has no mixed op",), exact=True)
    torch.manual_seed(3)
    seen = set()
    with pytest.raises(RecompileLimitError) as info:
        for _ in range(40):
            model.reset_binary_gates()
            seen.add(tuple(m.active_index[0] for m in model.redundant_modules))
            torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled.report.variants) == 8 <= len(seen)
    message = str(info.value)
    assert "mobile_inverted_conv.active_index`" in message and "keeps changing" in message
    assert "leaf_modules=[...]" in message


def test_proxyless_search_with_mixed_edges_as_leaves_gives_eager_alphas(float64):
    """The way out the error names: ``leaf_modules=[MixedEdge]``.  ProxylessNAS's own loop
    (weight step on the active path with the unused candidates set to None, then the
    ``full_v2`` architecture step through ``ArchGradientFunction`` and
    ``set_arch_param_grad``) gives eager's sampled paths, losses, alphas and statistics.  It
    re-traces only when a block's ``self.mobile_inverted_conv.is_zero_layer()`` answer
    changes (the block then returns ``x`` without calling its MixedEdge), never for a
    sampled ``active_index`` the answer does not depend on."""
    data = _batches(8)
    eager = _build('proxyless')
    torch.manual_seed(7)
    want = proxyless_search(eager, eager, data)
    model = _build('proxyless')
    compiled = _compile(model, data[0][0][:2], expect=("has no mixed op",), exact=True,
                        leaf_modules=[MixedEdge])
    torch.manual_seed(7)
    got = proxyless_search(compiled, model, data)
    _assert_same_records(want, got)
    assert not torch.allclose(want[-1][-1][0], _build('proxyless').blocks[0]
                              .mobile_inverted_conv.AP_path_alpha)
    assert len({p for r in want for p in r[1]}) > 2  # several paths were sampled
    assert all(".mobile_inverted_conv.is_zero_layer()` " in v
               for v in compiled.report.variants[1:]), compiled.report.variants
    assert len(compiled.report.variants) < 8, compiled.report.variants


def test_proxyless_search_compiled_unchanged(float64):
    """ProxylessNAS's loop through the module compiled with no option at all: the re-trace
    in the architecture mode meets the untraceable ArchGradientFunction closure and falls back
    to partial compile (one warning at the loop's call), matching eager."""
    from topo_compiler.partial import PartialCompileWarning

    data = _batches(4)
    model = _build('proxyless')
    compiled = _compile(model, data[0][0][:2], expect=("has no mixed op",), exact=True)
    torch.manual_seed(7)
    with pytest.warns(PartialCompileWarning, match="re-tracing .* met a forward that cannot"):
        proxyless_search(compiled, model, data)


def _proxyless_partial(data):
    """Compiled while in the architecture mode (``MixedEdge.MODE = 'full_v2'``): the
    forward cannot be traced, so partial compile (the default) runs the MixedEdges eagerly."""
    model = _build('proxyless')
    MixedEdge.MODE = 'full_v2'
    try:
        compiled = _compile(model, data[0][0][:2], expect=("cannot be traced",), exact=True)
    finally:
        MixedEdge.MODE = None
    return model, compiled


def test_proxyless_partial_compile_driven_through_the_returned_module(float64):
    """The other way out, partial compile: when the loop drives the returned module alone
    (``net.reset_binary_gates()``, ``net.unused_modules_off()`` on it, as upstream's
    ``self.net``), ProxylessNAS's loop gives eager's paths, losses, alphas and statistics."""
    data = _batches(8)
    eager = _build('proxyless')
    torch.manual_seed(7)
    want = proxyless_search(eager, eager, data)
    model, compiled = _proxyless_partial(data)
    assert type(compiled.report).__name__ == "PartialReport"
    torch.manual_seed(7)
    got = proxyless_search(compiled, compiled, data)
    _assert_same_records(want, got)


def test_proxyless_partial_compile_follows_the_models_state(float64):
    """The loop samples paths on the model (``model.reset_binary_gates()``) and calls the
    partially compiled module."""
    data = _batches(8)
    eager = _build('proxyless')
    torch.manual_seed(7)
    want = proxyless_search(eager, eager, data)
    model, compiled = _proxyless_partial(data)
    torch.manual_seed(7)
    got = proxyless_search(compiled, model, data)
    _assert_same_records(want, got)


def test_proxyless_class_attribute_mode_is_followed(float64):
    """``MixedEdge.MODE = 'full_v2'`` (a class attribute) is guarded: the switch re-traces,
    the re-trace meets ArchGradientFunction's closure and falls back to partial compile, and
    the binary gates get their gradients as in eager."""
    from topo_compiler.partial import PartialCompileWarning

    model = _build('proxyless')
    x = torch.randn(2, 3, 8, 8)
    compiled = _compile(model, x, expect=("has no mixed op",), exact=True)
    MixedEdge.MODE = 'full_v2'
    try:
        with pytest.warns(PartialCompileWarning, match="`MixedEdge.MODE`"):
            compiled(x).sum().backward()
    finally:
        MixedEdge.MODE = None
    assert all(g.grad is not None for g in model.binary_gates())


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.on = True
        self.conv = nn.Conv2d(2, 2, 1)

    def is_on(self):
        return self.on

    def forward(self, x):
        return self.conv(x)


class _ReadsChild(nn.Module):
    """ProxylessNAS's ``MobileInvertedResidualBlock``: the parent asks the child
    (``self.mobile_inverted_conv.is_zero_layer()``) which branch to take."""

    def __init__(self, through_method: bool):
        super().__init__()
        self.gate = _Gate()
        self.through_method = through_method

    def forward(self, x):
        on = self.gate.is_on() if self.through_method else self.gate.on
        return self.gate(x) if on else 2 * x


@pytest.mark.parametrize("through_method", [False, True], ids=["attribute", "method"])
def test_child_attribute_read_by_the_parent_is_followed(through_method):
    torch.manual_seed(0)
    model = _ReadsChild(through_method)
    x = torch.randn(1, 2, 3, 3)
    compiled = _compile(model, x, expect=("has no mixed op",))
    model.gate.on = False
    torch.testing.assert_close(compiled(x), model(x))


# -- NASLib -----------------------------------------------------------------------------------
def test_naslib_search_gives_eager_alphas(float64):
    """NASLib's ``DARTSOptimizer`` step (arch step on the validation batch, weight step on
    the training batch) through the compiled networkx cells: eager's losses and alphas."""
    data = _batches(6)
    eager = _build('naslib')
    want = naslib_search(eager, eager, data)
    model = _build('naslib')
    compiled = _compile(model, data[0][0][:2], expect=("has no mixed op",), exact=True)
    got = naslib_search(compiled, model, data)
    _assert_same_records(want, got)


def test_naslib_cells_mixed_ops_are_found():
    model = _build('naslib')
    compiled = _compile(model, STYLES['naslib'].example_inputs(), exact=True)
    assert len(compiled.report.mixed_ops) == STYLES['naslib'].num_mixed_ops


class _EdgeDataAlpha(nn.Module):
    """The NASLib case in a few lines: the alpha two dict levels down, as networkx keeps it."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.ops = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)])
        self.edges = {1: {'alpha': self.alpha}}

    def forward(self, x):
        weights = F.softmax(self.edges[1]['alpha'], dim=-1)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


def test_parameter_two_dicts_deep_is_followed():
    torch.manual_seed(0)
    model = _EdgeDataAlpha()
    x = torch.randn(1, 2, 4, 4)
    compiled = _compile(model, x, expect=("has no mixed op",), exact=True)
    with torch.no_grad():
        model.alpha[0] = 3.0
    torch.testing.assert_close(compiled(x), model(x))


# -- NNI 3.x ----------------------------------------------------------------------------------
def test_nni3_gumbel_darts_walking_the_model_gives_eager_alphas(float64):
    """NNI 3's GumbelDARTS: alphas shared by label between layers, one GumbelSoftmax module
    shared by every layer, its ``tau`` annealed each epoch.  Walking the *model's* modules to
    set ``tau`` (the workaround for the xfail below), five epochs through the compiled
    module give eager's losses, alphas and statistics; ``tau`` is re-traced twice (int 1 ->
    float 1.0, then made a run-time input), never again."""
    data = _batches(10)
    eager = _build('nni3')
    torch.manual_seed(7)
    want = nni3_search(eager, eager, data)
    model = _build('nni3')
    compiled = _compile(model, data[0][0][:2], exact=True)
    assert len(compiled.report.mixed_ops) == STYLES['nni3'].num_mixed_ops
    torch.manual_seed(7)
    got = nni3_search(compiled, model, data, walk=model)
    _assert_same_records(want, got)
    assert model.layers[0]._softmax.tau == pytest.approx(0.33 + 0.67 / 5)
    assert len(compiled.report.variants) == 3, compiled.report.variants
    assert "now read at run time" in compiled.report.variants[2]


def test_nni3_gumbel_darts_as_upstream_walks_the_compiled_module(float64):
    data = _batches(6)
    eager = _build('nni3')
    torch.manual_seed(7)
    want = nni3_search(eager, eager, data)
    model = _build('nni3')
    compiled = _compile(model, data[0][0][:2], exact=True)
    torch.manual_seed(7)
    got = nni3_search(compiled, model, data)
    _assert_same_records(want, got)


def test_compiled_modules_are_the_models_modules(float64):
    model = _build('nni3')
    x = torch.randn(2, 3, 8, 8)
    compiled = _compile(model, x, exact=True)
    found = [m for m in compiled.modules() if isinstance(m, GumbelSoftmax)]
    assert found and all(m is model.layers[0]._softmax for m in found)


class _GumbelEdge(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.tau = 1.0
        self.ops = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)])

    def forward(self, x):
        weights = F.gumbel_softmax(self.alpha, tau=self.tau)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


def test_gumbel_softmax_default_eps_is_not_a_baked_value():
    model = _GumbelEdge()
    _compile(model, torch.randn(1, 2, 4, 4))
