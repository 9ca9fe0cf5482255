"""One clear error for what a trace cannot follow, and a way out that works.

Each idiom of ``never_crash_probe.LEAF_WAY_OUT`` runs in the forward of the submodule
``cell``: Python's or a library's own error (memoryview, ctypes, torch.save, unbound
``torch.Tensor.add(t, 1)``...), differentiation inside forward (``torch.autograd.grad``,
``.backward()``, forward AD) and tensor attributes written on a traced value (``t.grad = g``,
``w.data = ...``, which the graph silently dropped) must each give one TraceError naming the
module, the idiom's line of the user's file and ``leaf_modules=['cell']``, leave the model as
it was, and that way out must compile to eager's outputs, gradients and parameters.

All idioms run in one subprocess (never_crash_probe.py ``--leaf-way-out``), so a crash (a
meta tensor's address 0 handed to ctypes killed the interpreter) fails these tests instead of
the runner.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from never_crash_probe import LEAF_WAY_OUT, idiom_line
from test_api import _assert_unchanged, _snapshot
from topo_compiler import TraceError, compile_supernet

PROBE = os.path.join(os.path.dirname(__file__), "never_crash_probe.py")


@pytest.fixture(scope="module")
def outcomes():
    done = subprocess.run([sys.executable, PROBE, "--leaf-way-out"], capture_output=True,
                          text=True, timeout=1200)
    rows = [line.split("\t") for line in done.stdout.splitlines() if line.count("\t") == 2]
    return done.returncode, {name: (refusal, way_out) for name, refusal, way_out in rows}, \
        done.stderr[-2000:]


@pytest.mark.parametrize("name", list(LEAF_WAY_OUT))
def test_one_clear_error_and_the_leaf_way_out_compiles_to_eager(name, outcomes):
    rc, rows, stderr = outcomes
    if name not in rows:
        died = next(n for n in LEAF_WAY_OUT if n not in rows)
        pytest.fail(f"the probe died (exit status {rc}) running {died!r}\n{stderr}")
    refusal, way_out = rows[name]
    assert refusal.startswith("cannot trace the supernet in module `cell` (Cell): "), refusal
    assert f"idiom.py:{idiom_line(name)} in " in refusal, refusal  # the idiom's own line
    assert refusal.count("  at ") == 1 and refusal.count("way out:") == 1, refusal
    assert "way out:" in refusal and "leaf_modules=['cell']" in refusal.split("way out:")[1]
    assert "example inputs' shapes" not in refusal  # the misleading fallback message
    assert way_out == "equal", way_out


def test_unbound_tensor_methods_are_told_to_call_the_method(outcomes):
    refusal, _ = outcomes[1]["Tensor.add(t, 1)"]
    assert "`t.add(...)` instead of `torch.Tensor.add(t, ...)`" in refusal
    refusal, _ = outcomes[1]["TensorBase.__bool__(t)"]  # t.__bool__() needs data: no such hint
    assert "call it as a method" not in refusal and "leaf_modules=['cell']" in refusal


_G = torch.zeros(2, 4, 6, 6)


class _ConstantThenMemoryview(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.cat([_G, self.conv(x)])  # fx keeps _G on the model as a tensor constant
        return torch.frombuffer(memoryview(y), dtype=torch.float32)


def test_a_failed_trace_leaves_no_tensor_constant_on_the_model():
    model = _ConstantThenMemoryview()
    snap = _snapshot(model)
    with pytest.raises(TraceError, match="memoryview") as info:
        compile_supernet(model, torch.randn(2, 4, 6, 6), partial=False)
    assert f"test_clear_errors.py:{_ConstantThenMemoryview.forward.__code__.co_firstlineno + 2}" \
        in str(info.value)
    _assert_unchanged(model, snap)  # no _tensor_constant0 left behind
