"""Guards on the Python values a traced forward reads sideways: a child's attributes and
answers read by its parent, attributes of a global class, numpy scalars, and the default
arguments of library functions (which are no baked values).

Each test fails on a compiler that bakes the value silently (or fails on it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topo_compiler import compile_supernet
from topo_compiler.guards import BakedValueWarning


def _compile(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, args, **kw)


# -- a child's attributes read by its parent ----------------------------------------------
class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.on = True
        self.picks = [0]
        self.conv = nn.Conv2d(2, 2, 1)

    def is_on(self):
        return self.picks[0] != 3

    def forward(self, x):
        return self.conv(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()


class _ReadsGrandchild(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        return self.block.gate(x) if self.block.gate.on else 2 * x


def test_grandchild_attribute_read_by_the_root_is_followed():
    torch.manual_seed(0)
    model = _ReadsGrandchild()
    x = torch.randn(1, 2, 3, 3)
    compiled = _compile(model, x)
    model.block.gate.on = False
    torch.testing.assert_close(compiled(x), model(x))
    model.block.gate.on = True
    torch.testing.assert_close(compiled(x), model(x))


class _AsksLeaf(nn.Module):
    """ProxylessNAS's block asking its MixedEdge (a leaf) ``is_zero_layer()``."""

    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(x) if self.gate.is_on() else 2 * x


def test_a_childs_answer_is_guarded_not_what_it_read():
    torch.manual_seed(0)
    model = _AsksLeaf()
    x = torch.randn(1, 2, 3, 3)
    compiled = _compile(model, x, leaf_modules=[_Gate])
    for pick in (1, 2, 0):  # the answer stays True: no re-trace
        model.gate.picks[0] = pick
        torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled.report.variants) == 1, compiled.report.variants
    model.gate.picks[0] = 3  # the answer changes: the parent's branch does
    torch.testing.assert_close(compiled(x), model(x))
    assert "`gate.is_on()` changed from True to False" in compiled.report.variants[1]


# -- attributes of a global class -----------------------------------------------------------
class _Switched(nn.Module):
    MODE = "double"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        if _Switched.MODE == "double":
            return 2 * self.conv(x)
        return self.conv(x) - 1


class _SwitchedBySelf(_Switched):
    def forward(self, x):
        return 2 * self.conv(x) if self.MODE == "double" else self.conv(x) - 1


class _CallsOnly(nn.Module):
    """The class switch is read in a forward that only calls submodules."""

    MODE = "double"

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        if _CallsOnly.MODE == "double":
            return self.a(x)
        return self.b(x)


@pytest.mark.parametrize("cls", [_Switched, _SwitchedBySelf, _CallsOnly],
                         ids=["global_name", "self", "frame_without_ops"])
def test_class_attribute_switch_is_followed(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(1, 2, 3, 3)
    compiled = _compile(model, x)
    try:
        cls.MODE = "shift"
        torch.testing.assert_close(compiled(x), model(x))
    finally:
        cls.MODE = "double"
    torch.testing.assert_close(compiled(x), model(x))


def test_an_instance_attribute_hiding_the_class_attribute_is_followed():
    torch.manual_seed(0)
    model = _SwitchedBySelf()
    x = torch.randn(1, 2, 3, 3)
    compiled = _compile(model, x)
    model.MODE = "shift"
    torch.testing.assert_close(compiled(x), model(x))


# -- numpy scalars --------------------------------------------------------------------------
RATE = np.float64(3.0)


class _NumpyState(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = np.float64(0.5)
        self.k = np.int64(2)

    def forward(self, x, t):
        return x * t * self.scale * RATE + self.k


def test_numpy_scalars_are_guarded_and_become_run_time_inputs():
    global RATE
    model = _NumpyState()
    x = torch.randn(3)
    compiled = _compile(model, (x, np.float64(2.0)))
    try:
        for epoch in range(6):  # SNAS: initial_temp * np.exp(-anneal_rate * epoch)
            t = 1.0 * np.exp(-0.3 * epoch)
            model.scale = np.float64(0.5 + epoch)
            RATE = np.float64(epoch + 1.0)
            torch.testing.assert_close(compiled(x, t), model(x, t))
        n = len(compiled.report.variants)
        assert n <= 3, compiled.report.variants  # each float read at run time after a change
        for epoch in range(6):
            t = np.float64(0.1 * epoch)
            model.scale = np.float64(epoch)
            RATE = np.float64(-epoch)
            torch.testing.assert_close(compiled(x, t), model(x, t))
        assert len(compiled.report.variants) == n, compiled.report.variants
        model.k = np.int64(5)  # an integer is a constant of the graph: it re-traces
        torch.testing.assert_close(compiled(x, t), model(x, t))
    finally:
        RATE = np.float64(3.0)


# -- default arguments of library functions -------------------------------------------------
class _Gumbel(nn.Module):
    def __init__(self, eps=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.ops = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)])

    def forward(self, x):
        w = F.gumbel_softmax(self.alpha, tau=0.5)
        return w[0] * self.ops[0](x) + w[1] * self.ops[1](x)


def test_a_library_default_is_no_baked_value():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_supernet(_Gumbel(), torch.randn(1, 2, 4, 4))
    assert not [w for w in caught if issubclass(w.category, BakedValueWarning)], \
        [str(w.message) for w in caught]
    assert not any("1e-10" in str(b) for b in compiled.report.baked_values), \
        compiled.report.baked_values
