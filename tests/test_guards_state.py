"""Silent staleness: state a forward updates, objects replaced after compiling, attributes set
on the compiled handle (review findings 1-3)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable

from topo_compiler import compile_supernet
from topo_compiler.tracer import TraceError


class MixedOp(nn.Module):
    def __init__(self, C=4):
        super().__init__()
        self._ops = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1),
                                   nn.Identity()])

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Network(nn.Module):
    """DARTS-style: alphas as a parameter, softmax passed to the edge, a temperature."""

    def __init__(self):
        super().__init__()
        self.edge = MixedOp()
        self.alphas = nn.Parameter(torch.tensor([1.0, 0.0, -1.0]))
        self.tau = 1.0

    def forward(self, x):
        return self.edge(x, F.softmax(self.alphas / self.tau, dim=-1))


class CountingNetwork(Network):
    """A drop-path-like schedule counting forwards in a Python int."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def forward(self, x):
        self.n += 1
        return super().forward(x) * self.n


class BufferCounting(Network):
    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        if self.in_place:
            self.steps.add_(1)
        else:
            self.steps += 1
        return super().forward(x) * self.steps


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.edge = MixedOp()

    def forward(self, x, weights):
        return self.edge(x, weights)


class RootCounter(nn.Module):
    """The counter sits in the root; the cell below it compiles on its own (partial mode)."""

    def __init__(self):
        super().__init__()
        self.cell = Cell()
        self.alphas = nn.Parameter(torch.tensor([1.0, 0.0, -1.0]))
        self.n = 0

    def forward(self, x):
        self.n += 1
        return self.cell(x, F.softmax(self.alphas, dim=-1)) * self.n


x = torch.randn(2, 4, 8, 8)


# -- 1. state updated inside forward -------------------------------------------------------

def test_python_counter_in_forward_is_refused_with_the_way_out():
    m = CountingNetwork()
    with pytest.raises(TraceError) as info:
        compile_supernet(m, (x,), exact=True, partial=False)
    text = str(info.value)
    assert "self.n" in text and "test_guards_state.py" in text and "add_(1)" in text
    assert m.n == 0


@pytest.mark.filterwarnings("ignore")
def test_root_counter_runs_eagerly_in_partial_mode_and_advances():
    torch.manual_seed(0)
    m = RootCounter()
    ref = copy.deepcopy(m)
    c = compile_supernet(m, (x,), exact=True)
    assert "self.n" in str(c.report)
    for _ in range(3):
        torch.testing.assert_close(c(x), ref(x))
    # partial mode runs the root on a shallow copy of the model: the counter advances there
    assert c.n == ref.n == 3


def test_buffer_rebound_in_forward_is_refused():
    m = BufferCounting(in_place=False)
    with pytest.raises(TraceError, match=r"self\.steps\.add_\(1\)"):
        compile_supernet(m, (x,), exact=True, partial=False)


def test_buffer_updated_in_place_advances():
    m = BufferCounting(in_place=True)
    ref = copy.deepcopy(m)
    c = compile_supernet(m, (x,), exact=True)
    for _ in range(3):
        torch.testing.assert_close(c(x), ref(x))
    assert m.steps.item() == ref.steps.item() == 3


# -- 2. objects replaced on the model after compiling ---------------------------------------

def test_reassigned_arch_parameter_retraces():
    m = Network()
    c = compile_supernet(m, (x,), exact=True)
    m.alphas = nn.Parameter(torch.tensor([-1.0, 0.0, 1.0]))  # P-DARTS rebuilds its alphas
    torch.testing.assert_close(c(x), m(x))
    assert len(c.variants) == 2


def test_reassigned_variable_alphas_retrace():
    class Plain(Network):
        def __init__(self):
            super().__init__()
            del self.alphas
            self.alphas = Variable(torch.tensor([1.0, 0.0, -1.0]), requires_grad=True)

    m = Plain()
    c = compile_supernet(m, (x,), exact=True)
    m.alphas = Variable(torch.tensor([-1.0, 0.0, 1.0]), requires_grad=True)
    torch.testing.assert_close(c(x), m(x))


@pytest.mark.parametrize("where", ["candidate", "edge"])
def test_replaced_candidate_retraces(where):
    m = Network()
    c = compile_supernet(m, (x,), exact=True)
    if where == "candidate":
        m.edge._ops[1] = nn.Conv2d(4, 4, 1)  # DARTS-PT / pruning replaces an op
    else:
        m.edge = MixedOp()  # a whole edge rebuilt
    torch.testing.assert_close(c(x), m(x))
    assert len(c.variants) == 2


def test_in_place_updates_do_not_retrace():
    m = Network()
    c = compile_supernet(m, (x,), exact=True)
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    F.mse_loss(c(x), torch.zeros_like(x)).backward()
    opt.step()
    m.load_state_dict(Network().state_dict())
    torch.testing.assert_close(c(x), m(x))
    assert len(c.variants) == 1


def test_deepcopy_of_compiled_does_not_retrace():
    c = compile_supernet(Network(), (x,), exact=True)
    d = copy.deepcopy(c)
    torch.testing.assert_close(d(x), d.source_model(x))
    assert len(d.variants) == 1


# -- 3. attributes set on the compiled handle ------------------------------------------------

@pytest.mark.parametrize("copied", [False, True])
def test_setting_tau_on_compiled_sets_the_model(copied):
    m = Network()
    c = compile_supernet(m, (x,), exact=True)
    if copied:
        c = copy.deepcopy(c)
        m = c.source_model
    c.tau = 0.1  # SNAS-style annealing through the handle the search loop holds
    assert m.tau == 0.1 and c.tau == 0.1
    torch.testing.assert_close(c(x), m(x))
