"""Never crash the process: C++ entry points that skip ``__torch_function__`` handed a traced
tensor killed the interpreter (SIGSEGV); each idiom now compiles to the eager result or
raises one TraceError naming the module, the source line and a way out.

Every idiom runs in one subprocess (never_crash_probe.py ``--all``), so a crash fails these
tests instead of killing the runner; the idiom that crashed is the one after the last line.
Meta dtypes (type promotion of int and bool tensors) are checked in this process.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from never_crash_probe import IDIOMS
from topo_compiler import TraceError, compile_supernet, trace_supernet

PROBE = os.path.join(os.path.dirname(__file__), "never_crash_probe.py")

# what each idiom gives now; "equal" means compiled output == eager (value, dtype, grad)
EXPECTED = {
    "Tensor(t)": "equal",  # SIGSEGV before
    "Tensor(t) grad": "equal",  # SIGSEGV before
    "FloatTensor(t)": "equal",
    "LongTensor(t.long())": "equal",
    "LongTensor(float t)": "TraceError",  # eager raises TypeError too
    "DoubleTensor(float t)": "TraceError",  # eager raises TypeError too
    "Tensor(int t)": "equal",  # SIGSEGV before
    "BoolTensor(t > 0)": "equal",
    "Tensor([t0, t1])": "equal",  # SIGSEGV before
    "FloatTensor([t0, t1])": "equal",
    "Tensor(t.size())": "equal",
    "Tensor(n, c) traced sizes": "equal",
    "Tensor(2, 3) constant": "equal",
    "FloatTensor(n, c, h, w)": "equal",
    "t.new(t)": "equal",
    "t.new(2, 3)": "equal",
    "FloatTensor((n, c)) data": "equal",  # silently sizes, not data, before
    "Tensor(t).requires_grad_()": "equal",  # SIGSEGV before
    "Size([t.size(0)])": "equal",
    "FloatTensor bound early (t)": "equal",  # SIGSEGV before
    "FloatTensor bound early (n, c)": "equal",  # TypeError before
    "Tensor.__new__(Tensor, t)": "equal",  # SIGSEGV before
    "tensor(t)": "equal",
    "tensor([t0, t1])": "equal",
    "as_tensor([t0])": "equal",
    "as_tensor bound early": "equal",
    "t.new_tensor(t)": "equal",
    "Parameter(t)": "equal",
    "from_numpy(t)": "TraceError",  # eager raises TypeError too (a tensor, not an array)
    "np.asarray(t)": "TraceError",  # ValueError: invalid __array_struct__, before
    "t.numpy()": "equal",
    "t.__array__()": "TraceError",
    "from_dlpack(t)": "equal",
    "memoryview(t)": "TraceError",  # Python's own TypeError before (eager raises it too)
    "t.data_ptr()": "equal",  # read at run time
    "if t.data_ptr() == ...": "TraceError",  # decided on the meta address 0 before
    "ctypes at data_ptr": "TraceError",  # ctypes' own TypeError before
    "t.storage()": "equal",
    "t.untyped_storage()": "equal",
    "empty(0).set_(t)": "equal",
    "Tensor.set_(empty, t)": "equal",
    "G.clone().set_(t)": "TraceError",  # SIGSEGV before
    "G.clone().grad = t": "TraceError",  # SIGSEGV before
    "G.clone().data = t": "TraceError",  # SIGSEGV before
    "G.clone().resize_as_(t)": "equal",
    "Size([t.sum().long()])": "TraceError",  # Python's own TypeError before
    "to_dlpack(t)": "TraceError",  # SIGSEGV before
    "jit.trace(f, t)": "TraceError",  # SIGSEGV before
    "set_rng_state(t)": "equal",
    "forward_ad.make_dual": "TraceError",  # eager's RuntimeError (no level) before
    "ops.aten.add.Tensor": "equal",
    "pad_sequence": "equal",
    "make_dual in dual_level": "TraceError",  # compiled, then raised on every call, before
    "testing.assert_close": "TraceError",  # ValueError without the line before
    "t.as_subclass(Tensor)": "TraceError",  # fx's NotImplementedError before
    "G.clone().copy_(t)": "equal",
    "G[0] = t[0]": "equal",
    "cat([G, t])": "equal",
    "_C._nn.gelu(t)": "equal",
    "_C._nn.linear(t, w)": "equal",
    "_C._VariableFunctions.relu": "equal",
    "Tensor.add(t, 1)": "TraceError",  # Python's own TypeError before
    "TensorBase.add(t, 1)": "TraceError",
    "TensorBase.data_ptr(t)": "TraceError",
    "Tensor.data_ptr(t)": "equal",  # read at run time (Python's own TypeError before)
    "TensorBase.__bool__(t)": "TraceError",
    "vmap(sin)(t)": "equal",  # SIGSEGV before
    "autograd.grad": "TraceError: cannot trace the supernet in module `<root>` (Probe): "
                     "`torch.autograd.grad` is called on traced values",  # "shapes failed" before
    "t.backward()": "TraceError: cannot trace the supernet in module `<root>` (Probe): "
                    "`Tensor.backward` is called on traced values",  # "shapes failed" before
    "func.grad": "equal",  # SIGSEGV before
    "func.vjp": "TraceError",  # SIGSEGV before
    "func.jacrev": "TraceError",  # SIGSEGV before
    "_foreach_add([t], 1)": "equal",
    "sparse_coo_tensor": "equal",  # SIGSEGV before
    "sparse_csr_tensor": "equal",
    "copy.deepcopy(t)": "equal",
    "torch.save(t)": "TraceError",  # pickle's own PicklingError before
    "json.dumps(t)": "TraceError",  # json's own TypeError before
    "nested_tensor([t, t])": "equal",  # SIGSEGV before
    "t.grad = t": "TraceError",  # silently dropped from the graph before
    "t.data = t": "TraceError",  # silently dropped before: compiled output differed
    "W.data = W.clamp(0)": "TraceError",  # silently dropped before: the weight stayed as is
    "W.requires_grad = False": "TraceError",  # silently dropped before
    "len(t)": "equal",
    "bool(t)": "TraceError",
    "int(t)": "TraceError",
    "float(t)": "TraceError",
    "t.item()": "equal",
    "t.tolist()": "equal",
    "range(t)": "TraceError",
}


@pytest.fixture(scope="module")
def outcomes():
    done = subprocess.run([sys.executable, PROBE, "--all"], capture_output=True, text=True,
                          timeout=1200)
    lines = dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    return done.returncode, lines, done.stderr[-2000:]


def test_every_idiom_has_an_expectation():
    assert sorted(EXPECTED) == sorted(IDIOMS)


@pytest.mark.parametrize("name", list(IDIOMS))
def test_idiom_compiles_to_eager_or_raises_clearly(name, outcomes):
    rc, lines, stderr = outcomes
    if name not in lines:
        crashed = next(n for n in IDIOMS if n not in lines)
        pytest.fail(f"the probe died (exit status {rc}) running {crashed!r}, so {name!r} "
                    f"did not run\n{stderr}")
    line = lines[name]
    assert line.startswith(EXPECTED[name]), line
    if line.startswith("TraceError"):  # the module, the user's line and a way out
        assert "in module `" in line and "idiom.py:" in line and "way out:" in line, line
    assert "left patched" not in line  # torch.Tensor is as before the trace


_DYNAMO_PROBE = r"""
import sys, warnings
import torch
from torch import nn
from topo_compiler import compile_supernet
assert "torch._dynamo" not in sys.modules


class M(nn.Module):
    def forward(self, x):
        import torch._dynamo  # first imported while Tensor.__new__ is wrapped
        return torch.Tensor(x) * 2


warnings.simplefilter("ignore")
x = torch.randn(3)
compiled = compile_supernet(M(), (x,))
torch.testing.assert_close(compiled(x), x * 2)
assert not {"__new__", "set_", "grad", "data", "data_ptr"} & set(torch.Tensor.__dict__)
assert torch.Tensor.__new__ is torch._C.TensorBase.__new__
assert torch.Tensor(2, 3).shape == (2, 3) and nn.Parameter(torch.zeros(2)).shape == (2,)
print("clean")
"""


def test_tensor_new_is_inherited_again_after_tracing():
    """torch.Tensor.__new__ is wrapped only while tracing, with a signature torch._dynamo
    accepts when it is first imported inside the trace (it refused the first attempt)."""
    done = subprocess.run([sys.executable, "-c", _DYNAMO_PROBE], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("clean")


# --------------------------------------------------------------------------------------
# Meta dtypes follow torch's type promotion
# --------------------------------------------------------------------------------------

PROMOTION = {
    "int / 2": lambda x: x / 2,
    "int / int": lambda x: x / x,
    "int.div(2)": lambda x: x.div(2),
    "torch.div(int, 2)": lambda x: torch.div(x, 2),
    "true_divide": lambda x: torch.true_divide(x, 2),
    "floor_divide": lambda x: torch.floor_divide(x, 2),
    "int // 2": lambda x: x // 2,
    "exp(int)": torch.exp,
    "int.exp()": lambda x: x.exp(),
    "sigmoid(int)": torch.sigmoid,
    "int.sigmoid()": lambda x: x.sigmoid(),
    "F.sigmoid(int)": torch.nn.functional.sigmoid,
    "tanh(int)": torch.tanh,
    "relu(int)": torch.relu,
    "nn.Sigmoid()(int)": nn.Sigmoid(),
    "int + 1.5": lambda x: x + 1.5,
    "int * True": lambda x: x * True,
    "bool + bool": lambda x: (x > 0) + (x > 1),
    "bool * 2.0": lambda x: (x > 0) * 2.0,
    "int ** 0.5": lambda x: x ** 0.5,
    "half + int": lambda x: x.half() + x,
    "half / 2": lambda x: x.half() / 2,
    "float64 * float32": lambda x: x.double() * x.float(),
}


class _Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("name", list(PROMOTION))
def test_meta_dtype_follows_type_promotion(name):
    """The traced meta value and the compiled output have eager's dtype (int / 2 and
    sigmoid of an int tensor are float; the fast shape rules were int before)."""
    fn = PROMOTION[name]
    x = torch.arange(-3, 5).view(2, 4)
    want = fn(x)
    graph = trace_supernet(_Apply(fn), (x,)).graph
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    assert output.meta["val"].dtype == want.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compile_supernet(_Apply(fn), (x,), exact=True)(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True)  # 0 / 0


@pytest.mark.parametrize("fn", [lambda x: x.mean(), lambda x: -(x > 0)],
                         ids=["mean(int)", "neg(bool)"])
def test_what_eager_refuses_the_trace_refuses(fn):
    x = torch.arange(-3, 5).view(2, 4)
    with pytest.raises(RuntimeError):
        fn(x)
    with pytest.raises(TraceError, match="way out"):
        trace_supernet(_Apply(fn), (x,))
