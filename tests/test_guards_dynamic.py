"""Run-time floats (automatic dynamic, :mod:`topo_compiler.guards`): a float that changes after
compiling is read from a 0-d tensor at run time.  These pin what a search loop does with them:
the same float set on every mixed op at once, two variants reading one float, and several
forwards with different values before one backward."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topo_compiler import CompiledSupernet, compile_supernet, guards

TIGHT = dict(rtol=1e-6, atol=1e-7)


def _compile(model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, args, **kw)


class ScaledSkip(nn.Module):
    """DARTS-'s mixed op: candidates weighted by ``weights``, plus an auxiliary skip scaled by
    its own float ``beta`` (``aux(x) * beta`` saves ``beta`` for ``aux``'s gradient)."""

    def __init__(self, C: int = 2):
        super().__init__()
        self._ops = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1, bias=False),
                                   nn.Conv2d(C, C, 1, bias=False)])
        self.aux = nn.Conv2d(C, C, 1, bias=False)
        self.beta = 1.0

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops)) + self.aux(x) * self.beta


class NeedsTheNumber(ScaledSkip):
    """Python needs ``beta`` itself (``float(...)``): it stays a guarded constant."""

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops)) + \
            self.aux(x) * float(self.beta)


class Chain(nn.Module):
    """``n`` mixed ops in a row; ``set_beta`` sets every op's float, once per epoch."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(ops), 2))

    def set_beta(self, beta: float) -> None:
        for op in self.ops:
            op.beta = beta

    def forward(self, x):
        for op, w in zip(self.ops, F.softmax(self.alphas, dim=-1)):
            x = op(x, w)
        return x


def _x() -> torch.Tensor:
    return torch.randn(2, 2, 4, 4)


# -- a float changed on many modules at once ------------------------------------------------

def test_float_set_on_every_mixed_op_becomes_run_time_in_one_re_trace():
    """More mixed ops than ``cache_size_limit``, all decayed every epoch: one re-trace makes
    every ``beta`` a run-time input (not one module per re-trace, which hit the limit)."""
    torch.manual_seed(0)
    model = Chain([ScaledSkip() for _ in range(12)])
    x = _x()
    compiled = _compile(model, x, exact=True)
    for epoch in range(1, 10):
        compiled.set_beta(1.0 - epoch / 10)
        torch.testing.assert_close(compiled(x), model(x), **TIGHT)
    assert compiled.report.variants == [
        "variant 1: first trace",
        "variant 2: `ops.0.beta` (and 11 more) changed from 1.0 to 0.9 (now read at run "
        "time: `ops.0.beta` (and 11 more))"]
    assert sorted(compiled.__dict__["_dispatch"].dynamic) == \
        sorted(("attr", f"ops.{i}", "beta") for i in range(12))


def test_float_python_needs_stays_constant_for_every_module_reading_it_on_that_line(
        monkeypatch):
    """Half the ops scale by ``beta`` (run time from the first change), half need the number
    (``float(self.beta)``, one line for all): the second trace keeps those constants at once,
    not one module per attempt, and the others still become run-time inputs."""
    attempts = []
    compile_once = guards.Dispatch._compile

    def counting(self, a, options):
        attempts.append(sorted(options.dynamic))
        return compile_once(self, a, options)

    monkeypatch.setattr(guards.Dispatch, "_compile", counting)
    torch.manual_seed(0)
    model = Chain([ScaledSkip() for _ in range(3)] + [NeedsTheNumber() for _ in range(3)])
    x = _x()
    compiled = _compile(model, x, exact=True)
    compiled.set_beta(0.5)
    torch.testing.assert_close(compiled(x), model(x), **TIGHT)
    assert len(attempts) == 2, attempts  # all six dynamic; then the three on float(...) not
    scaled = [("attr", f"ops.{i}", "beta") for i in range(3)]
    assert attempts[1] == scaled
    assert sorted(compiled.__dict__["_dispatch"].dynamic) == scaled
    assert "`ops.3.beta` (and 2 more) decides Python control flow or is needed as a " \
           "number, so it stays a constant" in compiled.report.variants[-1]
    compiled.set_beta(0.25)  # the constants changed: one more trace, the others follow
    torch.testing.assert_close(compiled(x), model(x), **TIGHT)
    assert len(compiled.variants) == 3


# -- one holder read by several variants ------------------------------------------------------

class TemperatureSwitch(nn.Module):
    """A softmax temperature ``tau`` read at run time by every variant, and an argument that
    picks a path (two variants)."""

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)])
        self.alpha = nn.Parameter(torch.randn(2))
        self.tau = 1.0

    def forward(self, x, double: bool = False):
        w = F.softmax(self.alpha / self.tau, -1)
        y = sum(wi * op(x) for wi, op in zip(w, self.ops))
        return y * 2 if double else y


def test_variants_sharing_a_run_time_float_each_see_its_current_value():
    """Variant 2 last ran with tau 0.5; tracing variant 3 (tau 0.3) and running it wrote 0.3
    into the tensor both read: variant 2 with tau 0.5 again must not read 0.3."""
    torch.manual_seed(0)
    model = TemperatureSwitch()
    x = _x()
    compiled = _compile(model, x, exact=True)
    for double, tau in [(False, 0.9), (False, 0.5), (True, 0.3), (False, 0.5), (True, 0.3),
                        (False, 0.5)]:
        model.tau = tau
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, double), model(x, double), **TIGHT)
    assert len(compiled.variants) == 3


# -- several forwards before one backward ---------------------------------------------------

RATE = 1.0


class GlobalRate(nn.Module):
    """A module-level global float (a scheduler's rate) scaling a conv: a global holder."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)

    def set_beta(self, beta: float) -> None:
        global RATE
        RATE = beta

    def forward(self, x):
        return self.conv(x) * RATE


@pytest.mark.parametrize("build, reload", [
    (lambda: Chain([ScaledSkip() for _ in range(2)]), False), (GlobalRate, False),
    (lambda: Chain([ScaledSkip() for _ in range(2)]), True),
], ids=["attribute", "global", "attribute-reloaded"])
def test_forwards_with_different_run_time_floats_before_one_backward(build, reload):
    """Gradient accumulation while a scheduler moves beta every iteration: each call's graph
    keeps its own value for backward, as eager's baked float does (refreshing the run-time
    tensor in place made autograd refuse: 'modified by an inplace operation').  A reloaded
    compiled supernet reads beta at run time from its first trace: the same holds there."""
    def run(module, model):
        model.zero_grad()
        outs = []
        for beta in (0.5, 0.25, 0.125):
            module.set_beta(beta)
            outs.append(module(x))
        (outs[0].square().sum() + outs[1].sum() + outs[2].abs().sum()).backward()
        return [o.detach() for o in outs] + [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = build()
    x = _x()
    eager = copy.deepcopy(model)
    compiled = _compile(model, x, exact=True)
    compiled.set_beta(0.75)
    compiled(x)  # beta is read at run time from here on
    assert compiled.__dict__["_dispatch"].dynamic
    if reload:
        compiled = pickle.loads(pickle.dumps(compiled))
        model = compiled.source_model
        assert len(compiled.variants) == 1 and compiled.__dict__["_dispatch"].dynamic
    for want, got in zip(run(eager, eager), run(compiled, model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 sums
    compiled.set_beta(1.0)
    compiled(x)
    assert len(compiled.variants) == (1 if reload else 2)


# -- copy.copy ---------------------------------------------------------------------------

def test_shallow_copy_stays_guarded_and_shares_the_model():
    """``copy.copy(compiled)`` is a compiled supernet sharing what a shallow copy of a module
    shares (parameters, graph, guards, variants), not fx's plain ``GraphModule`` running the
    first trace unguarded: a guarded change (an argument, a run-time float) is followed."""
    torch.manual_seed(0)
    model = TemperatureSwitch()
    x = _x()
    compiled = _compile(model, x, exact=True)
    copied = copy.copy(compiled)
    assert isinstance(copied, CompiledSupernet) and copied is not compiled
    assert dict(copied.named_parameters()) == dict(compiled.named_parameters())
    for double, tau in [(True, 1.0), (False, 0.5), (True, 0.25)]:
        model.tau = tau
        with torch.no_grad():
            torch.testing.assert_close(copied(x, double), model(x, double), **TIGHT)
            torch.testing.assert_close(copied.forward(x, double), model(x, double), **TIGHT)
    assert copied.variants == compiled.variants and len(copied.variants) == 4  # double x tau
    seen = []
    copied.register_forward_hook(lambda module, args, out: seen.append(module))
    copied(x)
    assert seen == [copied]
    copied.tau = 2.0  # the model's attribute, as on the original
    assert model.tau == 2.0
    torch.testing.assert_close(copied(x), model(x), **TIGHT)
