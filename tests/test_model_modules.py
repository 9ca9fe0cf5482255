"""The compiled module's modules are the model's own modules.

Search loops walk the module they train (NNI 3: ``for m in self.model.modules(): ...
m._softmax.tau = tau``; ``isinstance(m, GumbelSoftmax)``); on a compiled supernet that walk
must reach the model's modules, whose attributes the guards read, so a change made through
it re-traces instead of landing on a private copy (silently stale).  Compiling still writes
nothing into the model (its plain tensors in lists are reached from the compiled root), and
copies of the compiled module walk their own copied model.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from topo_compiler import compile_supernet


class Edge(nn.Module):
    """A container (not a leaf): a Python float, plain tensors in a list, candidate ops."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0
        self.weights = [torch.tensor(0.25), torch.tensor(0.75)]  # plain, unregistered
        self.alpha = nn.Parameter(torch.zeros(2))
        self.ops = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

    def forward(self, x):
        mix = F.softmax(self.alpha, dim=-1)
        return self.scale * sum(m * w * op(x) for m, w, op in zip(mix, self.weights, self.ops))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleList([Edge(), Edge()])
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x):
        for edge in self.edges:
            x = edge(x)
        return x + self.seen


def _compile(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, x, exact=True)


def _layout(model: nn.Module) -> dict[str, tuple]:
    """Every module's attribute, parameter, buffer and child names (what compiling could add)."""
    return {name: (sorted(m.__dict__), sorted(m._parameters), sorted(m._buffers),
                   sorted(m._modules), sorted(m._non_persistent_buffers_set))
            for name, m in model.named_modules()}


def test_walking_the_compiled_module_yields_the_models_modules_and_writes_nothing():
    torch.manual_seed(0)
    model = Net()
    before = _layout(model)
    x = torch.randn(2, 3)
    compiled = _compile(model, x)
    torch.testing.assert_close(compiled(x), model(x))
    named = dict(compiled.named_modules())
    for name, module in model.named_modules():
        if name:
            assert named[name] is module, name
    assert compiled.edges is model.edges
    assert _layout(model) == before  # no attribute, buffer or module was added to the model
    assert list(compiled.state_dict()) == list(model.state_dict())


def test_an_attribute_set_by_walking_the_compiled_module_is_followed():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3)
    compiled = _compile(model, x)
    found = [m for m in compiled.modules() if isinstance(m, Edge)]
    assert len(found) == 2
    for m in found:
        m.scale = 0.5
    assert model.edges[0].scale == 0.5
    torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled.variants) == 2  # the guard on `scale` re-traced


def test_apply_through_the_compiled_module_reaches_the_model():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3)
    compiled = _compile(model, x)
    compiled.apply(lambda m: setattr(m, "scale", 2.0) if isinstance(m, Edge) else None)
    assert all(e.scale == 2.0 for e in model.edges)
    torch.testing.assert_close(compiled(x), model(x))


def test_copies_walk_their_own_model():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3)
    compiled = _compile(model, x)
    shallow = copy.copy(compiled)
    assert shallow.edges[1] is model.edges[1]
    for other in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        source = other.source_model
        assert source is not model
        assert dict(other.named_modules())["edges.1.ops"] is source.edges[1].ops
        for m in other.modules():
            if isinstance(m, Edge):
                m.scale = 3.0
        assert all(e.scale == 3.0 for e in source.edges)
        assert all(e.scale == 1.0 for e in model.edges)
        torch.testing.assert_close(other(x), source(x))
    torch.testing.assert_close(compiled(x), model(x))
