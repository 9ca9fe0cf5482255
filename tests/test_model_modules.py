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

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topo_compiler import compile_supernet
from topo_compiler.tracer import TraceError


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


# -- parameters in nested containers (NASLib keeps alphas in networkx edge data) --------------
class NestedEdges(nn.Module):
    """Alphas two and three containers down, under int and tuple keys (``_adj[u][v]``), a
    tensor list inside; plain tensors under the keys ``1`` and ``'1'`` (one sanitized name)."""

    def __init__(self):
        super().__init__()
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(2)) for _ in range(2))
        self.ops = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.adj = {1: {2: {"alpha": self.alphas[0]}}, (2, 3): [({"alpha": self.alphas[1]},)]}
        self.scales = {"s": {1: torch.tensor(2.0), "1": torch.tensor(3.0)}}
        self.succ = self.adj  # networkx: `_succ is _adj`

    def forward(self, x):
        a = F.softmax(self.adj[1][2]["alpha"], dim=-1)
        x = sum(w * op(x) for w, op in zip(a, self.ops)) * self.scales["s"][1]
        b = F.softmax(self.succ[(2, 3)][0][0]["alpha"], dim=-1)
        return sum(w * op(x) for w, op in zip(b, self.ops)) * self.scales["s"]["1"]


def test_parameters_in_nested_containers_are_read_as_themselves():
    torch.manual_seed(0)
    model = NestedEdges()
    adj_before = model.adj[1][2]
    x = torch.randn(2, 3)
    compiled = _compile(model, x)
    assert len(compiled.report.mixed_ops) == 2
    torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        model.alphas[0][0] = 3.0
        model.alphas[1][1] = -2.0
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    compiled(x).sum().backward()  # a baked softmax(alpha) would raise here (its history)
    assert model.alphas[0].grad is not None and model.alphas[1].grad is not None
    assert model.adj[1][2] is adj_before and model.adj[1][2]["alpha"] is model.alphas[0]
    assert model.succ is model.adj  # the model's containers are left as they were


class Holder:
    pass


class HiddenAlpha(nn.Module):
    """The alpha behind a plain object the tracer does not look into."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.ops = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.holder = Holder()
        self.holder.alpha = self.alpha

    def forward(self, x):
        weights = F.softmax(self.holder.alpha, dim=-1)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


def test_a_tensor_computed_from_an_unreachable_parameter_is_refused_not_baked():
    model = HiddenAlpha()
    with pytest.raises(TraceError, match="baked into the graph as a constant, with its "
                                         "autograd history"):
        compile_supernet(model, torch.randn(2, 3), exact=True, partial=False)
