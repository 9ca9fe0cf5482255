"""Capture coverage (issue 11): constructs a trace records instead of following -- opaque
calls, factories, sampling, modules and attributes made in forward, bookkeeping -- never
crash the interpreter, compile, and train like the eager model."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from helpers import flat_outputs
from test_api import _assert_unchanged, _snapshot
from supernets import UNTRACEABLE, gdas_autodl
from supernets.capture_idioms import C as C_IN
from supernets.capture_idioms import CAPTURE, PARTIAL_CULPRIT, GumbelLoopRoot, MixedOp
from topo_compiler import TraceError, compile_supernet, trace_supernet
from topo_compiler.runtime import OpaqueCall
from topo_compiler.partial import PartialCompileWarning

TESTS = os.path.dirname(__file__)


def _compile(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_supernet(model, args, **kw)


def _train_steps(model, params, x, seed, steps=2):
    """Outputs, gradients and buffers of ``steps`` SGD steps, from RNG state ``seed``."""
    opt = torch.optim.SGD(params, lr=0.1)
    torch.manual_seed(seed)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        outs = flat_outputs(model(x))
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        loss.backward()
        record.append(([o.detach().clone() for o in outs],
                       [None if p.grad is None else p.grad.clone() for p in params]))
        opt.step()
    return record


def assert_trains_like_eager(factory, example_inputs, seed=3, **compile_kw):
    """Two SGD steps (weights and alphas) of a compiled copy equal eager, from one RNG state:
    outputs, gradients (alphas included) and BatchNorm buffers."""
    torch.manual_seed(0)
    eager = factory()
    twin = copy.deepcopy(eager)
    args = example_inputs()
    compiled = _compile(twin, args, exact=True, **compile_kw)
    want = _train_steps(eager, list(eager.parameters()), *args, seed=seed)
    got = _train_steps(compiled, list(twin.parameters()), *args, seed=seed)
    for (out_a, grad_a), (out_b, grad_b) in zip(want, got):
        for a, b in zip(out_a, out_b):
            torch.testing.assert_close(b, a)
        for a, b in zip(grad_a, grad_b):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a)
    for (name, a), b in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, msg=name)
    return compiled


_SEGFAULT_PROBE = r"""
import sys, warnings
sys.path.insert(0, sys.argv[2])
import torch
from supernets.capture_idioms import CAPTURE
from topo_compiler import compile_supernet
case = CAPTURE[sys.argv[1]]
warnings.simplefilter("ignore")
model = case.factory()
compiled = compile_supernet(model, case.example_inputs())
compiled(*case.example_inputs())
print("clean")
"""


@pytest.mark.parametrize("name", sorted(n for n, c in CAPTURE.items() if c.segfaulted))
def test_former_segfaults_exit_cleanly(name):
    """Autograd Functions, reentrant checkpoint and scripted functions handed the tracer's
    proxy killed the interpreter (SIGSEGV); now they compile and run, in a subprocess."""
    done = subprocess.run([sys.executable, "-c", _SEGFAULT_PROBE, name, TESTS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("clean")


@pytest.mark.parametrize("name", sorted(CAPTURE))
def test_idiom_trains_like_eager(name):
    case = CAPTURE[name]
    compiled = assert_trains_like_eager(case.factory, case.example_inputs)
    assert len(compiled.report.mixed_ops) == case.num_mixed_ops


@pytest.mark.parametrize("name", sorted(n for n, c in CAPTURE.items() if c.random))
def test_random_idioms_stay_random(name):
    """Draws recorded in the graph happen on every call: two calls differ, and the same RNG
    state gives the eager output."""
    case = CAPTURE[name]
    model = case.factory()
    (x,) = case.example_inputs()
    compiled = _compile(model, (x,), exact=True)
    with torch.no_grad():
        outs = [compiled(x) for _ in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
        torch.manual_seed(11)
        want = model(x)
        torch.manual_seed(11)
        torch.testing.assert_close(compiled(x), want)


def _notes(model, args):
    return trace_supernet(model, args).capture_notes


def test_opaque_calls_are_one_node_with_the_custom_backward():
    case = CAPTURE["ste_gate"]
    traced = trace_supernet(case.factory(), case.example_inputs())
    opaque = [n for n in traced.graph.nodes if isinstance(n.target, OpaqueCall)]
    assert len(opaque) == 1
    assert opaque[0].meta["val"].shape == (4,)
    assert any("opaque" in n for n in traced.capture_notes)


def test_factories_are_nodes_with_symbolic_sizes():
    """torch.zeros(n, c, h, w) with sizes from x.size() and torch.FloatTensor(n, c, h, w)
    are graph nodes: the compiled module runs another batch size."""
    for name in ("zero_factory", "zero_legacy", "new_factories"):
        case = CAPTURE[name]
        model = case.factory().eval()
        compiled = _compile(model, case.example_inputs(batch_size=2), exact=True)
        (x,) = case.example_inputs(batch_size=5)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))


def test_bookkeeping_is_dropped_and_reported():
    case = CAPTURE["bookkeeping"]
    model = case.factory()
    traced = trace_supernet(model, case.example_inputs())
    targets = {n.target for n in traced.graph.nodes if n.op == "call_method"}
    assert not targets & {"cpu", "tolist", "numpy"}
    dropped = [n for n in traced.capture_notes if n.startswith("dropped")]
    # .cpu() is dropped within .numpy()'s chain
    assert len(dropped) == 2 and all("capture_idioms.py:" in n for n in dropped)
    assert model.history == [] and not hasattr(model, "last")
    report = _compile(model, case.example_inputs()).report
    assert report.captured == traced.capture_notes
    assert "### Captured and dropped" in report.to_markdown()


@pytest.mark.parametrize("name", ["attr_in_forward", "module_in_forward", "bookkeeping",
                                  "arch_grad_function", "checkpoint_reentrant", "drop_path"])
def test_compiling_leaves_the_model_alone(name):
    """Attributes assigned and modules built in forward stay local to the trace; opaque
    calls computing their meta values leave BatchNorm statistics and RNG as they were (the
    snapshot of test_api)."""
    model = CAPTURE[name].factory().train()
    args = CAPTURE[name].example_inputs()
    snap = _snapshot(model)
    rng = torch.random.get_rng_state()
    _compile(model, args)
    _assert_unchanged(model, snap)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_partial_compile_leaves_the_model_alone():
    model = GumbelLoopRoot().train()
    snap = _snapshot(model)
    _partial(model, CAPTURE["ste_gate"].example_inputs())
    _assert_unchanged(model, snap)


def test_module_with_state_built_in_forward_is_refused():
    class Fresh(nn.Module):
        def forward(self, x):
            return nn.Linear(3, 3)(x)

    with pytest.raises(TraceError, match="build the Linear in __init__") as info:
        trace_supernet(Fresh(), torch.randn(2, 3))
    assert "test_capture.py" in str(info.value)


def test_leaf_means_leaf():
    """A leaf's forward is never traced into: sampling or value branches inside it are
    not refused, and it is one call_module node."""
    class GumbelSampler(nn.Module):
        def forward(self, alpha):
            while True:
                g = -torch.empty_like(alpha).exponential_().log()
                if not torch.isinf(g).any():
                    break
            return torch.softmax(alpha + g, -1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.sampler = GumbelSampler()
            self.alpha = nn.Parameter(torch.zeros(2))
            self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Identity()])

        def forward(self, x):
            w = self.sampler(self.alpha)
            return sum(wi * op(x) for wi, op in zip(w, self.ops))

    x = torch.randn(2, 3, 4, 4)
    model = Net()
    with pytest.raises(TraceError) as info:
        trace_supernet(model, x)
    assert "leaf_modules=['sampler']" in str(info.value)
    state = torch.random.get_rng_state()
    for leaf in (["sampler"], [GumbelSampler]):
        traced = trace_supernet(model, x, leaf_modules=leaf)
        assert [n.target for n in traced.graph.nodes if n.op == "call_module"][0] == "sampler"
    assert torch.equal(torch.random.get_rng_state(), state)
    compiled = _compile(model, x, leaf_modules=["sampler"], exact=True)
    torch.manual_seed(5)
    want = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x), want)


def test_trace_time_randomness_way_out_never_names_the_root():
    import random

    class Spos(nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Identity()])

        def forward(self, x):
            return self.ops[random.randint(0, 1)](x)

    with pytest.raises(TraceError) as info:
        trace_supernet(Spos(), torch.randn(2, 3, 4, 4))
    assert "leaf_modules=['']" not in str(info.value)
    assert "random.randint" in str(info.value)


# -- partial compile --------------------------------------------------------------------------
def _partial(model, args, **kw):
    with pytest.warns(PartialCompileWarning):
        return compile_supernet(model, args, **kw)


def test_partial_compile_untraceable_root_with_traceable_cells():
    """The root's Gumbel redraw loop runs eagerly; the cells (and their mixed ops) are
    compiled; two training steps equal eager from the same RNG state."""
    model = GumbelLoopRoot()
    (x,) = CAPTURE["ste_gate"].example_inputs()
    compiled = _partial(model, (x,), exact=True)
    report = compiled.report
    assert PARTIAL_CULPRIT in report.root_error and "capture_idioms.py" in report.root_error
    assert {"cells.0", "cells.1"} <= set(report.compiled) and "stem" in report.traced
    assert report.outcomes["cells.0"].mixed_ops == 2
    listed = report.compiled + report.traced + report.eager + report.unreached
    assert not any(p.startswith("cells.0.") for p in listed)
    assert_partial_trains_like_eager(GumbelLoopRoot, lambda: (x,))


def assert_partial_trains_like_eager(factory, example_inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assert_trains_like_eager(factory, example_inputs)


def test_partial_compile_gdas():
    """AutoDL's GDAS: the redraw loop in the root forward, cells reading each edge's argmax
    with .item() through forward_gdas; compiles without error, trains like eager."""
    model = gdas_autodl.build()
    args = gdas_autodl.example_inputs()
    compiled = _partial(model, args, exact=True)
    report = compiled.report
    assert gdas_autodl.CULPRIT_SUBSTRING in report.root_error
    # one candidate per edge runs: nothing to merge, so the traced parts run their own forward
    assert {"stem", "cells.1", "lastact"} <= set(report.traced)  # cells.1: ResNet block
    cell_ops = [p for p in report.traced if p.startswith("cells.0.edges.")]
    assert cell_ops, "the candidate ops of a search cell are reached and traced"
    before, after = report.counts()
    assert before == after and before.total > 0
    assert "not called through __call__" in report.outcomes["cells.0"].reason
    assert "Partial compile of TinyNetworkGDAS" in report.to_markdown()
    assert_partial_trains_like_eager(gdas_autodl.build, gdas_autodl.example_inputs)
    compiled.eval()
    assert all(not m.training for m in compiled.modules())


def test_partial_compile_keeps_the_model_and_its_state():
    model = GumbelLoopRoot()
    (x,) = CAPTURE["ste_gate"].example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    compiled = _partial(model, (x,))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model.cells[0].forward).__name__ == "method"  # the user's tree is untouched
    assert compiled.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(compiled.parameters(), model.parameters()))


def test_partial_compile_many_signatures_stay_eager():
    """A submodule that gets a new non-tensor argument on every call would need a graph per
    value: past max_variants it stays eager (no cache thrash), the report says so, and its
    children are compiled instead."""
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.edge = MixedOp()
            self.extra = nn.ModuleList([nn.Conv2d(C_IN, C_IN, 1) for _ in range(10)])

        def forward(self, x, weights, index):
            return self.edge(x, weights) + self.extra[index](x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pick = Pick()
            self.alpha = nn.Parameter(torch.zeros(4))
            self.beta = nn.Parameter(torch.zeros(10))

        def forward(self, x):  # int() of a tensor: the root runs eagerly
            return self.pick(x, self.alpha.softmax(0), int(self.beta.argmax()))

    model = Net().eval()
    (x,) = CAPTURE["ste_gate"].example_inputs()
    compiled = _partial(model, (x,), exact=True)
    for i in range(10):
        with torch.no_grad():
            model.beta.zero_()
            model.beta[i] = 1.0
            torch.testing.assert_close(compiled(x), model(x))
    report = compiled.report
    outcome = report.outcomes["pick"]
    assert outcome.state == "eager" and "more than 8 input signatures" in outcome.reason
    assert "pick.edge" in report.compiled


def test_nothing_traceable_raises_the_trace_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C_IN, C_IN, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(TraceError, match="x.sum"):
        compile_supernet(Branchy(), CAPTURE["ste_gate"].example_inputs())


@pytest.mark.parametrize("name", sorted(UNTRACEABLE))
def test_untraceable_models_compile_partially_with_the_reason(name):
    """Each refused forward either compiles partially, the report naming the culprit line,
    or -- when the example run reaches no traceable submodule (one candidate picked by
    .item(), which is a torch.nn layer) -- raises the TraceError naming it."""
    case = UNTRACEABLE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled = compile_supernet(case.factory(), case.example_inputs(), passes=())
        except TraceError as error:
            assert name not in ("tensor_value_branch", "item_branch", "gdas_autodl")
            assert case.culprit_substring in str(error)
            return
    assert case.culprit_substring in compiled.report.root_error
    assert compiled.report.traced


def test_checkpoint_through_an_imported_name():
    """`from torch.utils.checkpoint import checkpoint` escapes the module patch: the reentrant
    kind is still one opaque call (an autograd Function); the other kind is refused with a
    way out that works."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        reentrant = True

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C_IN, C_IN, 1)

        def forward(self, x):
            return checkpoint(self.conv, x, use_reentrant=self.reentrant)

    (x,) = CAPTURE["ste_gate"].example_inputs()
    x.requires_grad_()  # reentrant checkpoint warns when no input requires grad
    model = Net()
    compiled = _compile(model, (x,), exact=True)
    torch.testing.assert_close(compiled(x), model(x))
    model.reentrant = False
    with pytest.raises(TraceError, match="torch.utils.checkpoint.checkpoint") as info:
        trace_supernet(model, (x,))
    assert "test_capture.py" in str(info.value)


def test_legacy_constructor_keeps_isinstance_and_distributions_are_opaque():
    class Net(nn.Module):
        def forward(self, x):
            assert not isinstance(x, torch.LongTensor)
            n = torch.distributions.Normal(x, 1.0)
            return n.rsample() + n.mean + torch.FloatTensor(x.size(0), 1, 1, 1).fill_(0)

    (x,) = CAPTURE["ste_gate"].example_inputs()
    traced = trace_supernet(Net(), (x,))
    notes = traced.capture_notes
    assert sum(n.startswith("distribution") for n in notes) == 2
    assert any("torch.FloatTensor(sizes)" in n for n in notes)
    assert torch.FloatTensor is not None and isinstance(torch.zeros(1), torch.FloatTensor)


_TABLE = torch.linspace(0, 1, 4)


def test_tensor_constants_stay_off_the_model():
    """A global tensor read in forward becomes a constant of the compiled module; torch.fx
    would keep it as ``_tensor_constant0`` on the user's model."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C_IN, C_IN, 1)

        def forward(self, x):
            return self.conv(x) * _TABLE.view(1, -1, 1, 1)

    model = Net()
    (x,) = CAPTURE["ste_gate"].example_inputs()
    before = sorted(model.__dict__)
    compiled = _compile(model, (x,), exact=True)
    assert sorted(model.__dict__) == before
    torch.testing.assert_close(compiled(x), model(x))


_RETRACE_PROBE = r"""
import sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
from supernets.capture_idioms import DropPathVariable
from topo_compiler import compile_supernet
warnings.simplefilter("ignore")
model = DropPathVariable()
model.drop_prob = 0.0
x = torch.randn(64, 4, 6, 6)
compiled = compile_supernet(model, (x,), exact=True)
model.drop_prob = 0.3  # the re-trace reaches Variable(torch.FloatTensor(...)) now
with torch.no_grad():
    dropped = [(compiled(x).flatten(1).abs().sum(1) == 0).float().mean().item()
               for _ in range(3)]
print(dropped)
assert all(0.05 < d < 0.6 for d in dropped) and len(set(dropped)) > 1, dropped
print("clean")
"""


def test_darts_drop_path_retrace_exits_cleanly():
    """DARTS's Variable(...) drop_path reached by a re-trace (drop_prob 0 -> 0.3) killed the
    interpreter; now the re-traced graph drops paths at random on every call."""
    done = subprocess.run([sys.executable, "-c", _RETRACE_PROBE, TESTS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("clean")


_NATIVE_PROBE = r"""
import sys, warnings
import torch
from torch import nn
from topo_compiler import TraceError, compile_supernet
warnings.simplefilter("ignore")
expr = sys.argv[1]


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return eval(expr)


x = torch.randn(2, 4, 6, 6)
model = M()
try:
    compiled = compile_supernet(model, (x,))
except TraceError as e:
    print("TraceError", str(e).replace("\n", " | "))
else:
    torch.testing.assert_close(compiled(x), eval(expr, globals(), {"y": model.conv(x)}))
    print("compiled")
"""


@pytest.mark.parametrize("expr, outcome", [
    ("torch.Tensor._make_subclass(torch.Tensor, y)", "TraceError"),
    ("torch.as_tensor(y, dtype=torch.float64)", "compiled"),
    ("torch.autograd.Variable(y) * 2", "compiled"),
])
def test_native_constructors_handed_the_proxy_exit_cleanly(expr, outcome, tmp_path):
    """C++ constructors taking their data as a plain object read the proxy as a tensor
    (SIGSEGV before); now they are recorded, or refused with the line and a way out."""
    probe = tmp_path / "probe.py"
    probe.write_text(_NATIVE_PROBE)
    done = subprocess.run([sys.executable, str(probe), expr],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(outcome), done.stdout
    if outcome == "TraceError":
        assert "return eval(expr)" in done.stdout and "way out:" in done.stdout
    assert "_make_subclass" not in torch.Tensor.__dict__
