"""A partially compiled module follows the Python state the search loop sets on the model
after compiling (``model.arch = ...``, a child's ``active_index``), on its eager root and on
its eager children, and writes through it reach the model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from topo_compiler import compile_supernet
from topo_compiler.partial import PartialReport


class Cell(nn.Module):
    """Traceable: a weighted sum of two candidates."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x, w):
        return w[0] * self.a(x) + w[1] * self.b(x)


class Picker(nn.Module):
    """Untraceable (``.item()`` decides control flow): runs the cell ``active_index`` picks."""

    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleList([Cell(), Cell()])
        self.active_index = 0

    def forward(self, x, w):
        if x.abs().sum().item() >= 0:
            return self.cells[self.active_index](x, w)
        return x


class Net(nn.Module):
    """Untraceable root reading its own ``arch`` (a sampler sets it) and a child's state."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(2))
        self.heads = nn.ModuleList([Cell(), Cell()])
        self.picker = Picker()
        self.arch = 0

    def forward(self, x):
        w = self.alpha.softmax(0)
        if x.abs().sum().item() >= 0:
            x = self.heads[self.arch](x, w)
        return self.picker(x, w)


def _partial(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, x, exact=True)
    assert isinstance(compiled.report, PartialReport)
    return compiled


def test_root_attribute_set_on_the_model_is_followed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    model.arch = 1
    torch.testing.assert_close(compiled(x), model(x))
    assert compiled.arch == 1


def test_child_attribute_set_on_the_model_is_followed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    before = compiled(x)
    model.picker.active_index = 1
    after = compiled(x)
    torch.testing.assert_close(after, model(x))
    assert not torch.allclose(before, after)


def test_state_set_through_the_returned_module_reaches_the_model():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    assert model.arch == 0 and model.picker.active_index == 0  # compiling changed nothing
    compiled.arch = 1
    compiled.picker.active_index = 1
    assert model.arch == 1 and model.picker.active_index == 1
    torch.testing.assert_close(compiled(x), model(x))
    compiled.eval()
    assert not model.training and not model.picker.training


def test_replaced_parameter_is_followed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    model.alpha = nn.Parameter(torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(compiled(x), model(x))
    assert compiled.alpha is model.alpha


def test_children_set_on_the_model_are_followed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    model.heads[1] = Cell()  # new weights, compiled on its first call
    model.arch = 1
    torch.testing.assert_close(compiled(x), model(x))
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    assert sorted(compiled.state_dict()) == sorted(model.state_dict())
    unused = model.picker.cells[1]
    model.picker.cells[1] = None  # ProxylessNAS's unused_modules_off
    assert compiled.picker.cells[1] is None
    torch.testing.assert_close(compiled(x), model(x))
    model.picker.cells[1] = unused
    model.picker.active_index = 1
    torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled.picker.cells) == 2


# -- a re-trace that meets an untraceable forward falls back to partial compile -----------
class Switch(nn.Module):
    """Traceable while ``sampling`` is False; ``.item()`` control flow once it is set."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(2))
        self.cell = Cell()
        self.sampling = False

    def forward(self, x):
        w = self.alpha.softmax(0)
        if self.sampling and x.abs().sum().item() >= 0:
            w = w.flip(0)
        return self.cell(x, w)


def test_retrace_that_cannot_trace_falls_back_to_partial_compile():
    from topo_compiler.partial import PartialCompileWarning
    torch.manual_seed(0)
    model, x = Switch(), torch.randn(2, 3, 8, 8)
    compiled = compile_supernet(model, x, exact=True)
    torch.testing.assert_close(compiled(x), model(x))
    model.sampling = True
    with pytest.warns(PartialCompileWarning, match="cannot be traced") as caught:
        got = compiled(x)
    assert [w.filename for w in caught] == [__file__]  # points at the compiled(x) line
    torch.testing.assert_close(got, model(x))
    assert any(v.startswith("fallback:") for v in compiled.report.variants)
    model.sampling = False  # the traced variant's guards hold again
    torch.testing.assert_close(compiled(x), model(x))
    model.sampling = True
    got = compiled(x)  # the fallback again, no second re-trace
    torch.testing.assert_close(got, model(x))
    assert sum(v.startswith("fallback:") for v in compiled.report.variants) == 1
    got.sum().backward()  # gradients flow through the fallback's compiled cell
    assert model.alpha.grad is not None and model.cell.a.weight.grad is not None


def test_retrace_with_partial_false_raises_naming_the_change():
    from topo_compiler.tracer import TraceError
    torch.manual_seed(0)
    model, x = Switch(), torch.randn(2, 3, 8, 8)
    compiled = compile_supernet(model, x, exact=True, partial=False)
    model.sampling = True
    with pytest.raises(TraceError) as info:
        compiled(x)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "while re-tracing (`sampling` changed from False to True)" in notes, notes
    assert "partial=True" in notes


def test_proxyless_search_through_a_fallback_equals_eager():
    """ProxylessNAS compiled unchanged: the arch step's re-trace falls back to partial
    compile; losses, paths and alphas equal eager's."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_search_loops import _assert_same_records, _batches, _build
    from supernets.search_loops import MixedEdge, proxyless_search

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = _batches(8)  # 4 weight and 4 arch steps, several paths
        eager = _build("proxyless")
        torch.manual_seed(7)
        want = proxyless_search(eager, eager, data)
        MixedEdge.MODE = None
        model = _build("proxyless")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = compile_supernet(model, data[0][0][:2], exact=True)
            torch.manual_seed(7)
            got = proxyless_search(compiled, model, data)
        _assert_same_records(want, got)
        assert any(v.startswith("fallback:") for v in compiled.report.variants)
    finally:
        MixedEdge.MODE = None
        torch.set_default_dtype(old)


def test_deep_copy_is_a_view_of_a_copy_of_the_model():
    import copy
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    compiled(x)
    before = str(compiled.report)
    twin = copy.deepcopy(compiled)
    twin.arch = 1
    twin.picker.active_index = 1
    assert model.arch == 0 and model.picker.active_index == 0  # the original is untouched
    assert twin.alpha is not model.alpha
    torch.testing.assert_close(compiled(x), model(x))
    model.arch, model.picker.active_index = 1, 1
    torch.testing.assert_close(twin(x), model(x))  # same weights, same state: same output
    with torch.no_grad():
        twin.alpha.add_(1.0)
    assert not torch.allclose(twin.alpha, model.alpha)
    assert str(compiled.report) == before  # the copy's calls leave the original's report




class Outer(nn.Module):
    """Untraceable root around a ``Switch`` that turns untraceable after compiling."""

    def __init__(self):
        super().__init__()
        self.inner = Switch()

    def forward(self, x):
        if x.abs().sum().item() >= 0:
            return self.inner(x)
        return x


def test_compiled_submodule_whose_retrace_cannot_trace_runs_eagerly():
    torch.manual_seed(0)
    model, x = Outer(), torch.randn(2, 3, 8, 8)
    compiled = _partial(model, x)
    assert "inner" in compiled.report.compiled
    model.inner.sampling = True
    torch.testing.assert_close(compiled(x), model(x))
    assert "inner" in compiled.report.eager
    assert "a re-trace cannot trace it" in str(compiled.report)
