"""Run one forward idiom through compile_supernet in this process and print one line.

``python never_crash_probe.py NAME`` prints ``equal``, ``mismatch: ...``,
``TraceError: ...`` (with `` | `` for newlines) or ``error: Type: ...``; a crash shows as
the process's exit status.  ``--all`` runs every idiom in this one process (what
test_never_crash.py does, in a subprocess); no argument runs each idiom in a subprocess of
its own and prints the table (idiom, exit status, outcome).  ``--leaf-way-out`` runs each
idiom of ``LEAF_WAY_OUT`` in a submodule: its refusal, then whether the way out it names
(leaf_modules=['cell']) compiles to eager's result (what test_clear_errors.py checks).
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings

import torch

IDIOMS = {
    # legacy constructors handed a traced tensor (alias / copy it)
    "Tensor(t)": "torch.Tensor(y)",
    "Tensor(t) grad": "torch.Tensor(y) * self.conv.weight.sum()",
    "FloatTensor(t)": "torch.FloatTensor(y)",
    "LongTensor(t.long())": "torch.LongTensor(y.long())",
    "LongTensor(float t)": "torch.LongTensor(y)",
    "DoubleTensor(float t)": "torch.DoubleTensor(y)",
    "Tensor(int t)": "torch.Tensor(y.long())",
    "BoolTensor(t > 0)": "torch.BoolTensor(y > 0)",
    "Tensor([t0, t1])": "torch.Tensor([y[0, 0, 0, 0], y[1, 0, 0, 0]])",
    "FloatTensor([t0, t1])": "torch.FloatTensor([y[0, 0, 0, 0], y[1, 0, 0, 0]])",
    "Tensor(t.size())": "torch.Tensor(y.size()).fill_(1)",
    "Tensor(n, c) traced sizes": "torch.Tensor(y.size(0), y.size(1)).fill_(1)",
    "Tensor(2, 3) constant": "torch.Tensor(2, 3).fill_(1) + y.sum()",
    "FloatTensor(n, c, h, w)": "torch.FloatTensor(*y.shape).fill_(1)",
    "t.new(t)": "y.new(y)",
    "t.new(2, 3)": "y.new(2, 3).fill_(1)",
    "FloatTensor((n, c)) data": "torch.FloatTensor((y.size(0), y.size(1))) + y.sum()",
    "Tensor(t).requires_grad_()": "torch.Tensor(y.detach()).requires_grad_() * 2",
    "Size([t.size(0)])": "y.new_zeros(torch.Size([y.size(0), 3]))",
    "FloatTensor bound early (t)": "FT(y)",
    "FloatTensor bound early (n, c)": "FT(y.size(0), y.size(1)).fill_(1)",
    "Tensor.__new__(Tensor, t)": "torch.Tensor.__new__(torch.Tensor, y)",
    # other constructors and conversions
    "tensor(t)": "torch.tensor(y)",
    "tensor([t0, t1])": "torch.tensor([y[0, 0, 0, 0], y[1, 0, 0, 0]])",
    "as_tensor([t0])": "torch.as_tensor([y[0, 0, 0, 0]])",
    "as_tensor bound early": "AT([y[0, 0, 0, 0]])",
    "t.new_tensor(t)": "y.new_tensor(y)",
    "Parameter(t)": "nn.Parameter(y) * 2",
    "from_numpy(t)": "torch.from_numpy(y)",
    "np.asarray(t)": "torch.from_numpy(np.asarray(y.detach()))",
    "t.numpy()": "torch.from_numpy(y.detach().numpy())",
    "t.__array__()": "torch.from_numpy(y.detach().__array__())",
    "from_dlpack(t)": "torch.from_dlpack(y.detach())",
    "memoryview(t)": "torch.frombuffer(memoryview(y), dtype=torch.float32)",
    # reading storage and addresses
    "t.data_ptr()": "y * (y.data_ptr() != 0)",
    "if t.data_ptr() == ...": "y if y.data_ptr() == x.data_ptr() else -y",
    "ctypes at data_ptr": "y * ctypes.c_float.from_address(y.data_ptr()).value",
    "t.storage()": "y * len(y.storage())",
    "t.untyped_storage()": "y * y.untyped_storage().nbytes()",
    "empty(0).set_(t)": "torch.empty(0).set_(y)",
    "Tensor.set_(empty, t)": "torch.Tensor.set_(torch.empty(0), y)",
    "G.clone().set_(t)": "G.clone().set_(y)",
    "G.clone().copy_(t)": "G.clone().copy_(y)",
    "G[0] = t[0]": "(lambda r: (r.__setitem__(0, y[0]), r)[1])(G.clone())",
    "cat([G, t])": "torch.cat([G, y])",
    "G.clone().grad = t": "(lambda r: (setattr(r, 'grad', y.detach()), r.grad)[1])(G.clone())",
    "G.clone().data = t": "(lambda r: (setattr(r, 'data', y.detach()), r)[1])(G.clone())",
    "G.clone().resize_as_(t)": "G.clone().resize_as_(y).fill_(1)",
    "Size([t.sum().long()])": "y.new_zeros(torch.Size([y.sum().long()]))",
    "to_dlpack(t)": "torch.from_dlpack(torch.utils.dlpack.to_dlpack(y.detach()))",
    "jit.trace(f, t)": "torch.jit.trace(torch.sin, (y,))(y)",
    "set_rng_state(t)": "(torch.set_rng_state(torch.get_rng_state()), y)[1]",
    "forward_ad.make_dual": "torch.autograd.forward_ad.make_dual(y, y)",
    "ops.aten.add.Tensor": "torch.ops.aten.add.Tensor(y, y)",
    "pad_sequence": "torch.nn.utils.rnn.pad_sequence([y[0], y[1]])",
    "make_dual in dual_level": "tangent(y)",
    "testing.assert_close": "(torch.testing.assert_close(y, y), y)[1]",
    "t.as_subclass(Tensor)": "y.as_subclass(torch.Tensor)",
    # C functions, unbound methods
    "_C._nn.gelu(t)": "torch._C._nn.gelu(y)",
    "_C._nn.linear(t, w)": "torch._C._nn.linear(y.flatten(1), torch.ones(3, 144))",
    "_C._VariableFunctions.relu": "torch._C._VariableFunctions.relu(y)",
    "Tensor.add(t, 1)": "torch.Tensor.add(y, 1)",
    "TensorBase.add(t, 1)": "torch._C.TensorBase.add(y, 1)",
    "TensorBase.data_ptr(t)": "y * torch._C.TensorBase.data_ptr(y)",
    "Tensor.data_ptr(t)": "y * (torch.Tensor.data_ptr(y) != 0)",
    "TensorBase.__bool__(t)": "y * torch._C.TensorBase.__bool__(y.sum() > 0)",
    "vmap(sin)(t)": "torch.vmap(torch.sin)(y)",
    "autograd.grad": "torch.autograd.grad(y.sum(), self.conv.weight, create_graph=True)[0]",
    "t.backward()": "(y.sum().backward(retain_graph=True), y)[1]",
    "func.grad": "torch.func.grad(lambda t: (t * t).sum())(y)",
    "func.vjp": "torch.func.vjp(torch.sin, y)[0]",
    "func.jacrev": "torch.func.jacrev(torch.sin)(y[0, 0, 0])",
    "_foreach_add([t], 1)": "torch._foreach_add([y], 1)[0]",
    "sparse_coo_tensor": "torch.sparse_coo_tensor(torch.zeros(1, 2).long(), y[0, 0, 0, :2])"
                         ".to_dense()",
    "sparse_csr_tensor": "torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "
                         "y[0, 0, 0, :2]).to_dense()",
    "copy.deepcopy(t)": "__import__('copy').deepcopy(y.detach())",
    "torch.save(t)": "(torch.save(y, __import__('io').BytesIO()), y)[1]",
    "json.dumps(t)": "(__import__('json').dumps(y.tolist()), y)[1]",
    "nested_tensor([t, t])": "torch.nested.nested_tensor([y[0], y[1]]).to_padded_tensor(0)",
    # tensor attributes written on a traced value (silently dropped from the graph before)
    "t.grad = t": "(setattr(y, 'grad', y.detach() * 2), y.grad + y)[1]",
    "t.data = t": "(setattr(y, 'data', y.detach() * 2), y)[1]",
    "W.data = W.clamp(0)": "(setattr(self.conv.weight, 'data', self.conv.weight.detach()"
                           ".clamp(0)), self.conv(x))[1]",
    "W.requires_grad = False": "(setattr(self.conv.bias, 'requires_grad', False), "
                               "self.conv(x))[1]",
    # Python conversions of traced tensors
    "len(t)": "y * len(y)",
    "bool(t)": "y if bool(y.sum() > 0) else -y",
    "int(t)": "y * int(y.sum())",
    "float(t)": "y * float(y.sum())",
    "t.item()": "y * y.sum().item()",
    "t.tolist()": "torch.tensor(y.tolist())",
    "range(t)": "y * sum(range(y.sum().long()))",
}


_HEADER = """import ctypes
import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

G = torch.zeros(2, 4, 6, 6)
FT = torch.FloatTensor  # `from torch import FloatTensor`: bound before compiling
AT = torch.as_tensor


def tangent(y):
    with fwAD.dual_level():
        return fwAD.unpack_dual(fwAD.make_dual(y, torch.ones_like(y))).tangent * y
"""

_MODULE = _HEADER + """


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return {expr}
"""


# Refused idioms whose way out is a leaf: each runs in the forward of the submodule `cell`;
# compile_supernet(partial=False) must refuse it naming `cell`, the idiom's line and
# leaf_modules=['cell'], and compile_supernet(..., leaf_modules=['cell']) must match eager.
# (Variants that eager code runs where the root-level idiom above fails eagerly too.)
LEAF_WAY_OUT = {
    "memoryview(t.numpy())": "y + torch.frombuffer(memoryview(y.detach().numpy()), "
                             "dtype=torch.float32).view_as(y)",
    "ctypes at data_ptr": IDIOMS["ctypes at data_ptr"],
    "ctypes at storage data_ptr": "y * ctypes.c_float.from_address("
                                  "y.untyped_storage().data_ptr()).value",
    "Size([t.abs().sum().long()])": "y + y.new_zeros(torch.Size([y.abs().sum().long() % 3 + 1]))"
                                    ".sum()",
    "make_dual in dual_level": IDIOMS["make_dual in dual_level"],
    "testing.assert_close": IDIOMS["testing.assert_close"],
    "t.as_subclass(Tensor)": IDIOMS["t.as_subclass(Tensor)"],
    "Tensor.add(t, 1)": IDIOMS["Tensor.add(t, 1)"],
    "TensorBase.add(t, 1)": IDIOMS["TensorBase.add(t, 1)"],
    "TensorBase.data_ptr(t)": IDIOMS["TensorBase.data_ptr(t)"],
    "TensorBase.__bool__(t)": IDIOMS["TensorBase.__bool__(t)"],
    "torch.save(t)": IDIOMS["torch.save(t)"],
    "json.dumps(t)": IDIOMS["json.dumps(t)"],  # raised in json's Python code, not the user's
    "autograd.grad": "y * torch.autograd.grad(y.sum(), self.conv.weight, create_graph=True)[0]"
                     ".sum()",
    "t.backward()": IDIOMS["t.backward()"],
    "t.grad = t": IDIOMS["t.grad = t"],
    "t.data = t": IDIOMS["t.data = t"],
    "W.data = W.clamp(0)": IDIOMS["W.data = W.clamp(0)"],
    "W.requires_grad = False": IDIOMS["W.requires_grad = False"],
}

_CELL_MODULE = _HEADER + """

class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return {expr}


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1)
        self.cell = Cell()

    def forward(self, x):
        return self.cell(self.stem(x)) * 2
"""


def idiom_line(name: str) -> int:
    """The line of idiom.py the refusal of ``LEAF_WAY_OUT[name]`` must name."""
    text = _CELL_MODULE.format(expr=LEAF_WAY_OUT[name]).splitlines()
    wanted = "fwAD.make_dual(" if "tangent(" in LEAF_WAY_OUT[name] else "return " + \
        LEAF_WAY_OUT[name]
    return next(i for i, line in enumerate(text, 1) if wanted in line)


def _probe_class(name: str, directory: str, template: str = _MODULE,
                 idioms: dict = IDIOMS) -> type:
    """The idiom as a user file, so that source lines and user-code checks are real."""
    path = os.path.join(directory, "idiom.py")
    with open(path, "w") as f:
        f.write(template.format(expr=idioms[name]))
    spec = importlib.util.spec_from_file_location("idiom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Probe


def _same(a, b) -> str | None:
    if isinstance(a, (tuple, list)):
        return next((w for w in map(_same, a, b) if w), None)
    if a.dtype != b.dtype or a.shape != b.shape or a.requires_grad != b.requires_grad:
        return f"{a.dtype}{tuple(a.shape)} grad={a.requires_grad} != eager " \
               f"{b.dtype}{tuple(b.shape)} grad={b.requires_grad}"
    if not torch.allclose(a.detach().double(), b.detach().double(), equal_nan=True):
        return "values differ"
    return None


def run(name: str) -> str:
    from topo_compiler import TraceError, compile_supernet
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        model = _probe_class(name, directory)()
        return _compare(model, torch.randn(2, 4, 6, 6))


def _compare(model, x) -> str:
    from topo_compiler import TraceError, compile_supernet
    try:
        want = model(x)
    except Exception as exc:  # noqa: BLE001
        want = exc
    try:
        compiled = compile_supernet(model, (x,), exact=True)
        got = compiled(x)
    except TraceError as exc:
        return "TraceError: " + str(exc).replace("\n", " | ")
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}".replace("\n", " | ")[:300]
    if isinstance(want, Exception):
        return f"mismatch: compiled, eager raises {type(want).__name__}"
    why = _same(got, want)
    return f"mismatch: {why}" if why else "equal"


def run_leaf_way_out(name: str) -> str:
    """``refusal<TAB>way out`` for ``LEAF_WAY_OUT[name]`` in the submodule ``cell``: the
    TraceError of compile_supernet(partial=False) (`` | `` for newlines; the model must be
    unchanged after it), then ``equal`` when leaf_modules=['cell'] compiles to eager's
    outputs, gradients and parameters, else what differs."""
    import copy
    from test_api import _assert_unchanged, _snapshot
    from topo_compiler import TraceError, compile_supernet
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        model = _probe_class(name, directory, _CELL_MODULE, LEAF_WAY_OUT)()
        x = torch.randn(2, 4, 6, 6)
        snap = _snapshot(model)
        try:
            compile_supernet(model, (x,), exact=True, partial=False)
            refusal = "compiled without a leaf"
        except TraceError as exc:
            refusal = str(exc).replace("\n", " | ")
        except Exception as exc:  # noqa: BLE001
            refusal = f"error: {type(exc).__name__}: {exc}".replace("\n", " | ")[:300]
        try:
            _assert_unchanged(model, snap)
        except AssertionError:
            return f"{refusal}\tthe failed compile changed the model"
        eager = copy.deepcopy(model)
        try:
            compiled = compile_supernet(model, (x,), exact=True, partial=False,
                                        leaf_modules=["cell"])
            got = compiled(x)
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}".replace("\n", " | ")[:600]
            return f"{refusal}\tway out fails: {why}"
        want = eager(x)
        why = _same(got, want)
        if why is None:
            got.sum().backward()
            want.sum().backward()
            for (n, p), q in zip(model.named_parameters(), eager.parameters()):
                if not torch.equal(p, q):
                    why = f"parameter {n} differs"
                elif (p.grad is None) != (q.grad is None) or p.grad is not None and \
                        not torch.allclose(p.grad, q.grad):
                    why = f"gradient of {n} differs"
    return f"{refusal}\t{why or 'equal'}"


def run_in_subprocess(name: str, timeout: float = 300) -> tuple[int, str]:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), name],
                          capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-300:]


def run_all_in_one_process() -> None:
    """Every idiom in turn, one ``name<TAB>outcome`` line each (a crash ends the list)."""
    for name in IDIOMS:
        outcome = run(name)
        leftover = {"__new__", "set_", "_make_subclass", "data", "grad", "data_ptr"} & \
            set(torch.Tensor.__dict__)
        if "data_ptr" in torch.UntypedStorage.__dict__:
            leftover.add("UntypedStorage.data_ptr")
        if leftover:
            outcome += f" | left patched: {sorted(leftover)}"
        print(f"{name}\t{outcome}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--all"]:
        run_all_in_one_process()
    elif sys.argv[1:] == ["--leaf-way-out"]:
        for name in LEAF_WAY_OUT:
            print(f"{name}\t{run_leaf_way_out(name)}", flush=True)
    elif len(sys.argv) > 1:
        print(run(sys.argv[1]))
    else:
        for name in IDIOMS:
            rc, line = run_in_subprocess(name)
            print(f"{name:28} rc={rc:<4} {line[:160]}", flush=True)
