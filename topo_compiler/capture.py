"""Capture: record what a trace cannot follow, instead of following it (or crashing).

The tracer's proxy passes itself off as a ``torch.Tensor`` so that user code asking
``isinstance(w, torch.Tensor)`` gets the truthful answer.  Native code believes it too: an
autograd ``Function.apply``, a ``torch.jit.script`` function or a checkpoint handed a proxy
reads it as a tensor and kills the interpreter.  While tracing, this module intercepts those
entry points and records each call as **one opaque node** that runs the original at run
time (a custom backward is kept, since the original ``apply`` runs)::

    gates = BinarizeSTE.apply(probs)    ->    gates = BinarizeSTE_apply(probs)   # opaque

It also records:

* **factories** called from user code (``torch.zeros(n, c, h, w, device=x.device)``, the
  tuple form, ``torch.rand``, legacy ``torch.FloatTensor(n, c, h, w)``) as graph nodes, never
  evaluated for real while tracing, so sizes stay symbolic and random draws stay random;
* **distributions** built from traced values (``Dirichlet(c).rsample()``): each method or
  property read becomes an opaque node that builds the distribution at run time (argument
  validation included);
* **checkpoints** (``torch.utils.checkpoint``, both kinds) as one opaque call of the
  checkpoint itself, so recomputation, and BatchNorm statistics updated by it, stay as in
  eager code; the passes do not see inside the checkpointed function.

Meta values of opaque nodes come from running the original on meta tensors or, when it has
no meta kernel, on small real tensors made from the example shapes, with every RNG and every
buffer of the model restored afterwards.

After tracing, :func:`drop_bookkeeping` removes what no output depends on and only copies
data out (``.cpu()``, ``.tolist()``, ``.numpy()``): logging of architecture weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import random
import re
import sys
import sysconfig
import types
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from .meta import UNKNOWN, register_shape_rule, to_meta
from .runtime import OpaqueCall

__all__ = ["CaptureNote", "record_opaque", "capturing", "computing_meta", "value_on_real_data",
           "drop_bookkeeping", "call_unregistered_module", "FACTORIES"]


@dataclasses.dataclass(frozen=True)
class CaptureNote:
    """One thing the tracer recorded differently from plain tracing, for the report."""

    what: str
    """``opaque``, ``factory``, ``checkpoint``, ``distribution``, ``dropped`` or
    ``made-in-forward``."""
    detail: str
    source: str | None

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.what}: {self.detail}{where}"


# --------------------------------------------------------------------------------------
# Opaque calls
# --------------------------------------------------------------------------------------

def _opaque_meta_value(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Meta value of an opaque call: ``fn`` on the meta arguments, else on small real ones."""
    with _buffers_kept(), rng_kept():  # a BatchNorm counts a batch before failing on meta
        try:
            with _maybe_revert_all_patches():  # modules it calls run, not record
                return to_meta(fn(*args, **kwargs))
        except Exception:  # noqa: BLE001 - no meta kernel, or code reading data
            return value_on_real_data(fn, args, kwargs)


def _real(tracer: Any, value: Any) -> Any:
    """The user's object behind a shadow module (or a method or closure reading one)."""
    sources = getattr(tracer, "_shadow_sources", {})
    if isinstance(value, nn.Module):
        return sources.get(id(value), value)
    if isinstance(value, types.MethodType) and isinstance(value.__self__, nn.Module) and \
            id(value.__self__) in sources:
        return types.MethodType(value.__func__, sources[id(value.__self__)])
    if isinstance(value, types.FunctionType) and value.__closure__:
        cells = []
        changed = False
        for name, cell in zip(value.__code__.co_freevars, value.__closure__):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                cells.append(cell)
                continue
            if isinstance(content, fx.Proxy):
                raise _closure_error(tracer, value, name)
            real = _real(tracer, content)
            changed |= real is not content
            cells.append(types.CellType(real) if real is not content else cell)
        if changed:
            return types.FunctionType(value.__code__, value.__globals__, value.__name__,
                                      value.__defaults__, tuple(cells))
    return value


def _user_error(tracer: Any, message: str, way_out: str) -> Exception:
    """A TraceError naming the module being traced and the user's source line."""
    from .tracer import TraceError, _describe_frame, _user_frame
    path, mtype = tracer.current_module()
    return TraceError(message, module_path=path, module_type=mtype,
                      source=_describe_frame(_user_frame()), way_out=way_out)


def _closure_error(tracer: Any, fn: Any, name: str) -> Exception:
    return _user_error(
        tracer,
        f"`{getattr(fn, '__qualname__', fn)}` reads the traced value `{name}` from its "
        f"closure and is handed to a call the tracer records as a whole",
        f"pass `{name}` to that function as an argument instead of closing over it")


def record_opaque(tracer: Any, fn: Callable[..., Any], label: str, args: tuple,
                  kwargs: dict, what: str = "opaque") -> fx.Proxy:
    """One ``call_function`` node running ``fn(*args, **kwargs)`` at run time."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Proxy)]
    constants = [None if i in slots else _real(tracer, leaf) for i, leaf in enumerate(leaves)]
    counter = tracer.__dict__.setdefault("_opaque_count", {})
    n = counter[label] = counter.get(label, 0) + 1
    target = OpaqueCall(fn, label if n == 1 else f"{label}_{n}", spec, constants, slots,
                        meta_rule=_opaque_meta_value)
    proxy = tracer.create_proxy("call_function", target, tuple(leaves[i] for i in slots), {})
    _note(tracer, what, f"`{label}` recorded as one opaque call `{proxy.node.name}`")
    return proxy


def _note(tracer: Any, what: str, detail: str) -> None:
    from .tracer import _describe_frame, _user_frame
    tracer.__dict__.setdefault("capture_notes", []).append(
        CaptureNote(what, detail, _describe_frame(_user_frame())))


def _has_proxy(tree: Any) -> bool:
    return any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves(tree))


# --------------------------------------------------------------------------------------
# Meta values when meta tensors are not enough
# --------------------------------------------------------------------------------------

_ACTIVE: list[Any] = []
"""The tracer(s) tracing now (innermost last)."""


@contextlib.contextmanager
def computing_meta(tracer: Any, run_user_code: bool = False) -> Iterator[None]:
    """While the tracer computes a meta value nothing it runs is the user's trace-time
    randomness or a factory to record.  When that runs user code (a leaf module's forward),
    every random generator is left as it was, too."""
    tracer._computing_meta = getattr(tracer, "_computing_meta", 0) + 1
    try:
        with rng_kept() if run_user_code else contextlib.nullcontext():
            yield
    finally:
        tracer._computing_meta -= 1


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators are left as they were."""
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


def _computing(tracer: Any) -> bool:
    return getattr(tracer, "_computing_meta", 0) > 0


def value_on_real_data(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Meta value of ``fn`` run on small real tensors shaped like the meta arguments.

    Buffers of the traced model (BatchNorm statistics) are restored afterwards and random
    generators are forked, so nothing the user can see changes.  ``UNKNOWN`` if it fails.
    """
    gen = torch.Generator().manual_seed(0)

    def realize(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            if v.is_floating_point():
                return torch.empty(v.shape, dtype=v.dtype).uniform_(0.1, 1.0, generator=gen)
            return torch.zeros(v.shape, dtype=v.dtype)
        return v

    try:
        with _buffers_kept(), rng_kept(), torch.no_grad(), _maybe_revert_all_patches():
            return to_meta(fn(*pytree.tree_map(realize, args), **pytree.tree_map(realize, kwargs)))
    except Exception:  # noqa: BLE001 - the shape stays unknown; asking for it raises later
        return UNKNOWN


@contextlib.contextmanager
def _buffers_kept() -> Iterator[None]:
    """Restore every buffer of the model being traced (BatchNorm statistics) afterwards."""
    buffers = []
    for tracer in _ACTIVE[-1:]:
        buffers = [(b, b.detach().clone()) for b in tracer.root.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


# --------------------------------------------------------------------------------------
# The entry points intercepted while tracing
# --------------------------------------------------------------------------------------

FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
             "linspace", "eye", "tensor", "normal")
"""torch factories recorded as graph nodes when user code calls them while tracing."""

_LEGACY = {"FloatTensor": torch.float32, "DoubleTensor": torch.float64,
           "HalfTensor": torch.float16, "LongTensor": torch.int64, "IntTensor": torch.int32,
           "ByteTensor": torch.uint8, "BoolTensor": torch.bool}


def _from_user_code(depth: int = 2) -> bool:
    from .tracer import _is_user_file
    return _is_user_file(sys._getframe(depth).f_code.co_filename)


@contextlib.contextmanager
def capturing(tracer: Any, root: nn.Module | None = None) -> Iterator[None]:
    """Install the interceptions for one trace; every one is undone however it ends.

    ``root``: the model, whose classes' modules get their ``from torch import FloatTensor``
    names wrapped too."""
    undo: list[Callable[[], None]] = []
    replaced: dict[int, Any] = {}  # id(a module's function) -> its wrapper

    def patch(owner: Any, name: str, value: Any) -> None:
        had = name in owner.__dict__
        old = owner.__dict__.get(name)
        if had and isinstance(owner, types.ModuleType):
            replaced[id(old)] = value
        setattr(owner, name, value)
        undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

    def patch_item(table: dict, key: str, value: Any) -> None:
        old = table[key]
        table[key] = value
        undo.append(lambda: table.__setitem__(key, old))

    # forward AD scripts its decompositions on first use, which fails on the wrappers below
    # (a leaf's forward using it would raise); load them first (once per process, ~0.1 s)
    import torch.autograd.forward_ad as forward_ad
    with warnings.catch_warnings():  # torch.jit.script is deprecated
        warnings.simplefilter("ignore")
        forward_ad._maybe_load_decompositions()
    _ACTIVE.append(tracer)
    try:
        _patch_function_apply(tracer, patch)
        _patch_script_functions(tracer, patch)
        _patch_checkpoint(tracer, patch)
        _patch_distributions(tracer, patch)
        _patch_factories(tracer, patch)
        _patch_native_constructors(tracer, patch)
        _patch_meta_addresses(tracer, patch)
        _patch_bound_names(root, replaced, patch_item)
        yield
    finally:
        for fn in reversed(undo):
            fn()
        _ACTIVE.remove(tracer)


def _patch_meta_addresses(tracer: Any, patch: Callable) -> None:
    """A meta tensor's ``data_ptr()`` is 0: user code run on meta tensors for a meta value (a
    leaf's forward, an opaque call) that reads memory there (``ctypes.c_float.from_address``)
    killed the interpreter.  It raises instead, and the meta value comes from small real
    tensors (:func:`value_on_real_data`); ``torch.Tensor.data_ptr(t)`` of a traced value is
    ``t.data_ptr()``, read at run time."""
    original = torch._C.TensorBase.data_ptr
    storage_data_ptr = torch._C.StorageBase.data_ptr

    def data_ptr(self):
        if isinstance(self, fx.Proxy):
            return tracer.create_proxy("call_method", "data_ptr", (self,), {})
        if self.is_meta:
            raise RuntimeError("data_ptr() of a meta tensor: no memory behind it")
        return original(self)

    def storage_address(self):  # t.untyped_storage().data_ptr(), t.storage().data_ptr()
        if self.device.type == "meta":
            raise RuntimeError("data_ptr() of a meta storage: no memory behind it")
        return storage_data_ptr(self)

    patch(torch.Tensor, "data_ptr", data_ptr)
    patch(torch.UntypedStorage, "data_ptr", storage_address)


def _patch_function_apply(tracer: Any, patch: Callable) -> None:
    from torch.autograd.function import Function
    original = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if _computing(tracer) or not _has_proxy((args, kwargs)):
            return original.__get__(None, cls)(*args, **kwargs)
        return record_opaque(tracer, original.__get__(None, cls), f"{cls.__name__}_apply",
                             args, kwargs)

    patch(Function, "apply", classmethod(apply))


def _patch_script_functions(tracer: Any, patch: Callable) -> None:
    script_function = torch.jit.ScriptFunction
    original = script_function.__call__

    def call(self, *args, **kwargs):
        if _computing(tracer) or not _has_proxy((args, kwargs)):
            return original(self, *args, **kwargs)
        return record_opaque(tracer, self, f"{self.name}_scripted", args, kwargs)

    patch(script_function, "__call__", call)


def _patch_checkpoint(tracer: Any, patch: Callable) -> None:
    import torch.utils.checkpoint as cp
    original = cp.checkpoint

    @functools.wraps(original)
    def checkpoint(function, *args, **kwargs):
        if _computing(tracer) or not _has_proxy((args, kwargs)):
            return original(function, *args, **kwargs)
        name = getattr(function, "__name__", type(function).__name__)
        return record_opaque(tracer, original, f"checkpoint_{name}", (function, *args),
                             kwargs, "checkpoint")

    patch(cp, "checkpoint", checkpoint)
    generator = cp._checkpoint_without_reentrant_generator

    def refuse(function, preserve, context_fn, determinism_check, debug, *args, **kwargs):
        if _computing(tracer) or not _has_proxy((args, kwargs)):
            yield from generator(function, preserve, context_fn, determinism_check, debug,
                                 *args, **kwargs)
            return
        raise _checkpoint_reference_error(tracer)

    # reached through a `from torch.utils.checkpoint import checkpoint` reference, which the
    # module patch above cannot see (the reentrant kind is caught as an autograd Function)
    patch(cp, "_checkpoint_without_reentrant_generator", refuse)


def _checkpoint_reference_error(tracer: Any) -> Exception:
    return _user_error(
        tracer,
        "torch.utils.checkpoint(..., use_reentrant=False) reached through a name imported "
        "before compiling cannot be recorded as one call",
        "call it as torch.utils.checkpoint.checkpoint(...) (module attribute), or use "
        "use_reentrant=True")


class _DistributionCall:
    """What ``SomeDistribution(traced, ...)`` gives while tracing: every method or property
    read becomes an opaque node that builds the distribution at run time."""

    def __init__(self, tracer: Any, cls: type, args: tuple, kwargs: dict):
        self._tracer, self._cls, self._args, self._kwargs = tracer, cls, args, kwargs

    def __getattr__(self, name: str) -> Any:
        cls = self._cls
        label = f"{cls.__name__}_{name}"
        attr = getattr(cls, name)
        if callable(attr) and not isinstance(attr, property):
            def method(*margs, **mkwargs):
                return record_opaque(self._tracer, functools.partial(_distribution_method,
                                                                     cls, name),
                                     label, (self._args, self._kwargs, margs, mkwargs), {},
                                     "distribution")
            return method
        return record_opaque(self._tracer, functools.partial(_distribution_property, cls, name),
                             label, (self._args, self._kwargs), {}, "distribution")


def _distribution_method(cls: type, name: str, args: tuple, kwargs: dict, margs: tuple,
                         mkwargs: dict) -> Any:
    return getattr(cls(*args, **kwargs), name)(*margs, **mkwargs)


def _distribution_property(cls: type, name: str, args: tuple, kwargs: dict) -> Any:
    return getattr(cls(*args, **kwargs), name)


def _patch_distributions(tracer: Any, patch: Callable) -> None:  # noqa: ARG001
    from torch.distributions import Distribution

    def new(cls, *args, **kwargs):
        tracer = _ACTIVE[-1] if _ACTIVE else None
        if tracer is not None and not _computing(tracer) and _has_proxy((args, kwargs)):
            return _DistributionCall(tracer, cls, args, kwargs)
        return object.__new__(cls)

    # installed once and left in place (inert outside a trace): CPython cannot take a
    # class's __new__ back once set, object.__new__ would then refuse the arguments
    if "__new__" not in Distribution.__dict__:
        Distribution.__new__ = new


def _patch_factories(tracer: Any, patch: Callable) -> None:
    from . import meta

    def recorded(original: Callable, label: str) -> Callable:
        @functools.wraps(original)
        def factory(*args, **kwargs):
            if _computing(tracer) or not (_has_proxy((args, kwargs)) or _from_user_code()):
                return original(*args, **kwargs)
            try:
                proxy = tracer.create_proxy("call_function", original, args, kwargs)
            except NotImplementedError:  # an argument fx cannot write (a numpy array)
                if _has_proxy((args, kwargs)):
                    raise
                return original(*args, **kwargs)
            _note(tracer, "factory", f"`torch.{label}` recorded as a graph node")
            return proxy
        return factory

    for name in FACTORIES:
        original = getattr(torch, name)
        meta.register_shape_rule(original, _on_meta(original))
        patch(torch, name, recorded(getattr(torch, name), name))

    for name, dtype in _LEGACY.items():
        legacy = getattr(torch, name)
        meta.register_shape_rule(legacy, _legacy_meta(legacy))

        class _Legacy(type):
            # isinstance(t, torch.FloatTensor) keeps its meaning while tracing
            def __instancecheck__(cls, obj, legacy=legacy, dtype=dtype):
                if isinstance(obj, fx.Proxy):  # the C check would read it as a tensor
                    val = obj.node.meta.get("val")
                    return isinstance(val, torch.Tensor) and val.dtype == dtype
                return isinstance(obj, legacy)

            def __call__(cls, *args, legacy=legacy, dtype=dtype, name=name, **kwargs):
                if _computing(tracer) or not _has_proxy((args, kwargs)):
                    return legacy(*args, **kwargs)
                return _legacy_call(tracer, name, legacy, dtype, args, kwargs)

        patch(torch, name, _Legacy(name, (), {}))


def _patch_bound_names(root: nn.Module | None, replacements: dict[int, Any],
                       patch_item: Callable) -> None:
    """``from torch import FloatTensor`` (or ``as_tensor``, ``zeros``...) in the model's own
    code binds the original, which no wrapper on ``torch`` reaches (and a C type cannot be
    patched): that name in the globals of the model's classes is wrapped for the trace,
    too."""
    if root is None:
        return
    classes = {cls for m in root.modules() for cls in type(m).__mro__
               if not cls.__module__.startswith("torch")}
    tables: dict[int, dict] = {}
    for cls in classes:
        for fn in vars(cls).values():
            table = getattr(fn, "__globals__", None)
            if isinstance(table, dict):
                tables.setdefault(id(table), table)
    for table in tables.values():
        for key, value in list(table.items()):
            if id(value) in replacements:
                patch_item(table, key, replacements[id(value)])


def _legacy_call(tracer: Any, name: str, ctor: Any, dtype: torch.dtype | None, args: tuple,
                 kwargs: dict) -> fx.Proxy:
    """``torch.Tensor(...)`` or ``torch.FloatTensor(...)`` handed traced values: sizes
    become ``torch.empty(sizes, dtype=...)``; data (a tensor, a list of 0-d tensors) a call
    of the constructor itself, which aliases or copies it at run time as in eager code::

        torch.FloatTensor(x.size(0), 1, 1, 1)   ->  torch.empty(size, 1, 1, 1, dtype=float32)
        torch.Tensor(y)                          ->  torch.Tensor(y)   # a graph node
    """
    sizes = _legacy_sizes(args)
    if sizes is not None:
        _note(tracer, "factory", f"`torch.{name}(sizes)` recorded as `torch.empty(sizes"
              f"{'' if dtype is None else f', dtype={dtype}'})`")
        return tracer.create_proxy("call_function", _EMPTY, sizes,
                                   {**kwargs, **({} if dtype is None else {"dtype": dtype})})
    data = args[0] if len(args) == 1 else None
    val = data.node.meta.get("val") if isinstance(data, fx.Proxy) else None
    if dtype is not None and isinstance(val, torch.Tensor) and val.dtype != dtype:
        raise _user_error(
            tracer,
            f"`torch.{name}(t)` of a {val.dtype} tensor fails in eager code too: a legacy "
            f"constructor only aliases a tensor of its own dtype ({dtype})",
            f"convert instead: t.to({dtype}), or torch.as_tensor(t, dtype={dtype})")
    _note(tracer, "opaque", f"`torch.{name}(data)` of a traced value recorded as a call of "
          f"the constructor")
    return tracer.create_proxy("call_function", ctor, args, kwargs)


_EMPTY = torch.empty
"""The original factory: a recorded node must not run the wrapper installed while tracing."""


def _legacy_sizes(args: tuple) -> tuple | None:
    """The sizes of ``torch.Tensor(n, c)`` or ``torch.Tensor(x.size())``; None for data
    (a tensor, a list or tuple: ``torch.Tensor([n, c])`` holds the values n and c)."""
    def val(a: Any) -> Any:
        return a.node.meta.get("val") if isinstance(a, fx.Proxy) else a

    if len(args) == 1 and isinstance(val(args[0]), torch.Size):
        return args
    if args and all(type(val(a)) is int for a in args):
        return args
    return None


def _legacy_meta(ctor: Any) -> Callable:
    def rule(*args: Any, **kwargs: Any) -> Any:
        try:  # aliasing a meta tensor works on meta
            return to_meta(ctor(*args, **kwargs))
        except Exception:  # noqa: BLE001 - reading data (a list of 0-d tensors)
            return value_on_real_data(ctor, args, kwargs)
    return rule


def _patch_native_constructors(tracer: Any, patch: Callable) -> None:
    """C++ entry points that take their data as a plain object and skip
    ``__torch_function__``: handed the proxy (which passes their tensor check) they would
    read it as a tensor and kill the interpreter.

    ``torch.Tensor(t)`` is a call of the constructor in the graph (sizes: ``torch.empty``);
    ``Variable(t)`` (``from torch.autograd import Variable``, old DARTS code) is
    ``t.detach()``, a leaf that requires grad when asked; ``torch.as_tensor(t)``,
    ``torch.from_numpy``, the sparse constructors and the like become graph nodes;
    ``torch.vmap`` / ``torch.func.grad`` and ``torch.nested.nested_tensor`` of traced values
    become opaque calls.  Refused with a TraceError: ``Tensor._make_subclass``, the other
    functorch transforms, ``torch.jit.trace``, ``to_dlpack``, and ``set_`` or ``.grad =``
    / ``.data =`` of a traced value into a tensor the trace does not see.
    """
    from torch.autograd.variable import Variable, VariableMeta
    make_subclass = torch.Tensor.__dict__.get("_make_subclass") or \
        torch._C.TensorBase.__dict__["_make_subclass"]

    def variable(cls, *args, **kwargs):
        if cls is not Variable or _computing(tracer) or not _has_proxy((args, kwargs)):
            return type.__call__(cls, *args, **kwargs)
        data = args[0] if args else kwargs.get("data")
        requires_grad = args[1] if len(args) > 1 else kwargs.get("requires_grad", False)
        if not isinstance(data, fx.Proxy) or isinstance(requires_grad, fx.Proxy):
            raise _native_error(tracer, "torch.autograd.Variable")
        _note(tracer, "opaque", "`Variable(t)` recorded as `t.detach()`")
        out = tracer.create_proxy("call_method", "detach", (data,), {})
        if requires_grad:
            out = tracer.create_proxy("call_method", "requires_grad_", (out,), {})
        return out

    def make_subclass_(*args, **kwargs):
        if not _computing(tracer) and _has_proxy((args, kwargs)):
            raise _native_error(tracer, "torch.Tensor._make_subclass")
        return make_subclass(*args, **kwargs)

    patch(VariableMeta, "__call__", variable)
    patch(torch.Tensor, "_make_subclass", staticmethod(make_subclass_))
    for name in _AS_NODES:
        if hasattr(torch, name):
            patch(torch, name, _as_node(tracer, getattr(torch, name)))
    _patch_tensor_new(tracer, patch)
    _patch_set(tracer, patch)
    _patch_setters(tracer, patch)
    _patch_transforms(tracer, patch)
    _patch_refused(tracer, patch)


_AS_NODES = ("as_tensor", "from_numpy", "from_dlpack", "frombuffer", "sparse_coo_tensor",
             "sparse_csr_tensor", "sparse_csc_tensor", "sparse_bsr_tensor", "sparse_bsc_tensor",
             "sparse_compressed_tensor")
"""torch functions that skip ``__torch_function__`` for their data argument: recorded as a
graph node when handed a traced value (all but ``as_tensor`` crashed or failed before)."""


def _as_node(tracer: Any, original: Callable) -> Callable:
    @functools.wraps(original)
    def call(*args, **kwargs):
        if _computing(tracer) or not _has_proxy((args, kwargs)):
            return original(*args, **kwargs)
        return tracer.create_proxy("call_function", original, args, kwargs)
    return call


def _patch_tensor_new(tracer: Any, patch: Callable) -> None:
    """``torch.Tensor(t)``: what ``torch.Tensor`` inherits from its C base is wrapped for the
    trace and deleted after, so ``torch.Tensor`` inherits it again."""
    original = torch._C.TensorBase.__new__

    # (*args, **kwargs): torch._dynamo, if first imported while tracing, checks the
    # signature of Tensor.__new__ against its own and accepts only this wildcard
    def new(*args, **kwargs):
        cls, data = args[0], args[1:]
        if _computing(tracer) or not _has_proxy((data, kwargs)):
            return original(*args, **kwargs)
        if cls is not torch.Tensor:  # a user subclass built from a traced value
            raise _native_error(tracer, f"{cls.__name__}(...)")
        return _legacy_call(tracer, "Tensor", torch.Tensor, None, data, kwargs)

    patch(torch.Tensor, "__new__", staticmethod(new))


register_shape_rule(torch.Tensor, _legacy_meta(torch.Tensor))


def _patch_set(tracer: Any, patch: Callable) -> None:
    original = torch._C.TensorBase.set_

    def set_(self, *args, **kwargs):
        if isinstance(self, fx.Proxy):  # torch.Tensor.set_(t, ...): a graph node, as t.set_
            return tracer.create_proxy("call_method", "set_", (self, *args), kwargs)
        if not _computing(tracer) and _has_proxy((args, kwargs)):
            raise _native_error(tracer, "Tensor.set_", way_out=(
                "the tensor `set_` is called on is not traced (a global or a tensor made "
                "outside the model); make it a buffer of the module (register_buffer), or "
                "use the traced value itself"))
        return original(self, *args, **kwargs)

    patch(torch.Tensor, "set_", set_)


_TENSOR_SETTERS = ("data", "grad", "_grad", "real", "imag")
"""Tensor attributes whose C setter reads the value assigned as a tensor."""


def _patch_setters(tracer: Any, patch: Callable) -> None:
    """``w.grad = t`` or ``w.data = t`` on a tensor the trace does not see, t traced:
    refused (the C setter would read the proxy as a tensor)."""
    for name in _TENSOR_SETTERS:
        descriptor = torch._C.TensorBase.__dict__[name]

        def set_(self, value, descriptor=descriptor, name=name):
            if not _computing(tracer) and isinstance(value, fx.Proxy):
                raise _native_error(tracer, f"Tensor.{name} = ...", way_out=(
                    f"the tensor whose `.{name}` is set is not traced (a global or a tensor "
                    f"made outside the model); make it a buffer of the module "
                    f"(register_buffer), or use the traced value itself"))
            descriptor.__set__(self, value)

        patch(torch.Tensor, name, property(
            lambda self, d=descriptor: d.__get__(self, type(self)), set_,
            lambda self, d=descriptor: d.__delete__(self), descriptor.__doc__))


def _patch_refused(tracer: Any, patch: Callable) -> None:
    """Native entry points with no graph form: refused when handed a traced value."""
    import torch.utils.dlpack as dlpack
    jit_way_out = ("call torch.jit.trace outside forward (in __init__, on example tensors) "
                   "and call the traced function in forward: that call is recorded as one")
    refusals = [(torch.jit, "trace", jit_way_out), (torch.jit, "trace_module", jit_way_out),
                (dlpack, "to_dlpack", None), (torch, "to_dlpack", None),
                (torch._C, "_to_dlpack", None)]
    import torch.autograd.forward_ad as forward_ad
    # no graph form: differentiation while tracing (Tensor.backward: ShapedProxy)
    for owner, name in ((torch.autograd, "grad"), (torch.autograd, "backward"),
                        (forward_ad, "make_dual")):
        original = getattr(owner, name)

        def differentiate(*args, original=original, label=f"{owner.__name__}.{name}",
                          **kwargs):
            if not _computing(tracer) and _has_proxy((args, kwargs)):
                raise autograd_error(tracer, label)
            return original(*args, **kwargs)

        patch(owner, name, functools.wraps(original)(differentiate))
    for owner, name, way_out in refusals:
        original = getattr(owner, name, None)
        if original is None:
            continue

        def call(*args, original=original, label=f"{owner.__name__}.{name}", way_out=way_out,
                 **kwargs):
            if not _computing(tracer) and _has_proxy((args, kwargs)):
                raise _native_error(tracer, label, way_out=way_out)
            return original(*args, **kwargs)

        patch(owner, name, functools.wraps(original)(call))


def _patch_transforms(tracer: Any, patch: Callable) -> None:
    """functorch transforms wrap their inputs in C (``_add_batch_dim``, ``_wrap_for_grad``):
    ``vmap``, ``grad`` and ``grad_and_value`` of traced values become one opaque call
    each; the others (vjp, jvp, jacrev, ...) are refused where they wrap their inputs."""
    try:
        from torch._functorch import apis, eager_transforms, vmap
    except ImportError:  # another torch: nothing known to patch
        return

    def recorded(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def call(*args, **kwargs):
            if _computing(tracer) or not _has_proxy((args, kwargs)):
                return original(*args, **kwargs)
            return record_opaque(tracer, original, label, args, kwargs)
        patch(owner, name, call)

    def refused(owner: Any, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def call(*args, **kwargs):
            if not _computing(tracer) and _has_proxy((args, kwargs)):
                raise _native_error(
                    tracer, "torch.func.vjp / jvp / jacrev / jacfwd / hessian", way_out=(
                        "call the transform outside the supernet's forward, or use "
                        "torch.vmap / torch.func.grad, which are recorded as one call"))
            return original(*args, **kwargs)
        patch(owner, name, call)

    recorded(apis, "vmap_impl", "vmap")
    recorded(eager_transforms, "grad_impl", "grad")
    recorded(eager_transforms, "grad_and_value_impl", "grad_and_value")
    refused(eager_transforms, "_wrap_all_tensors")
    refused(vmap, "_add_batch_dim")
    recorded(torch._C._nested, "nested_tensor", "nested_tensor")


def _native_error(tracer: Any, name: str, way_out: str | None = None) -> Exception:
    path, _ = tracer.current_module()
    leaf = f", or mark this module as a leaf (leaf_modules=['{path}'])" if path else ""
    return _user_error(
        tracer, f"`{name}` is native code that would read the traced value as a tensor",
        (way_out or f"use a tensor op instead of `{name}` (t.detach(), t.clone(), t.to(...))")
        + leaf)


def numpy_error(tracer: Any, proxy: fx.Proxy) -> Exception:
    """``numpy.asarray(t)`` of a traced tensor: numpy reads data a trace does not have."""
    path, _ = tracer.current_module()
    return _user_error(
        tracer,
        f"numpy reads the data of the traced value `{proxy.node.name}` (numpy.asarray, "
        f"np.array or a numpy function handed a tensor)",
        "keep it a tensor op; to log it use t.detach().cpu().numpy() (dropped from the graph "
        "when no output depends on it)" +
        (f"; or mark this module as a leaf (leaf_modules=['{path}'])" if path else ""))


def _leaf_way_out(path: str) -> str:
    if path:
        return (f"mark this module as a leaf so that its forward runs as is: "
                f"compile_supernet(..., leaf_modules=['{path}'])")
    return ("move that code into a submodule and mark it as a leaf so that its forward runs "
            "as is: compile_supernet(..., leaf_modules=['<its path>'])")


def attribute_write_error(tracer: Any, proxy: fx.Proxy, name: str) -> Exception:
    """``t.grad = g``, ``t.data = d``, ``t.requires_grad = b`` on a traced value: a graph
    records no attribute writes, so the compiled module would silently skip it."""
    return _user_error(
        tracer,
        f"`.{name}` of the traced value `{proxy.node.name}` is assigned; a graph records no "
        f"attribute writes, so the compiled module would silently skip it",
        f"set `.{name}` outside forward (in the training step), where the tensor is real; "
        f"or {_leaf_way_out(tracer.current_module()[0])}")


def autograd_error(tracer: Any, name: str) -> Exception:
    return _user_error(
        tracer,
        f"`{name}` is called on traced values inside forward; while tracing they have no "
        f"autograd history, and the tracer does not record differentiation",
        f"compute gradients outside forward (in the training step); or "
        f"{_leaf_way_out(tracer.current_module()[0])}")


_STDLIB = sysconfig.get_paths()["stdlib"]


def _is_stdlib(filename: str) -> bool:
    return filename.startswith(_STDLIB) and "site-packages" not in filename and \
        "dist-packages" not in filename


def foreign_error(tracer: Any, exc: Exception) -> Exception:
    """Python's, a library's or native code's own error escaping the traced forward
    (``memoryview(t)``, ``ctypes`` at ``t.data_ptr()``, ``torch.save(t, f)``,
    ``torch.Tensor.add(t, 1)``...): one TraceError naming the module whose forward raised
    it, the user's line (the innermost one in the traceback) and a way out."""
    from .tracer import TraceError, _describe_frame, _is_user_file
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    sources = getattr(tracer, "_shadow_sources", {})
    module = next((sources[id(f.f_locals["self"])] for f in reversed(frames)
                   if id(f.f_locals.get("self")) in sources), tracer.root)
    path = next((p for p, m in tracer.root.named_modules() if m is module), "")
    user = [f for f in frames if _is_user_file(f.f_code.co_filename) and
            not _is_stdlib(f.f_code.co_filename)]  # the user's code, not copy.py
    text = str(exc).strip().splitlines()
    problem = (f"{type(exc).__name__}: {text[0] if text else ''} (raised while tracing: a "
               f"traced value has no data or storage, so code that needs a real tensor "
               f"fails on it -- memoryview, ctypes, pickling, torch.testing, as_subclass, an "
               f"unbound torch.Tensor method; if the model raises this eagerly too, the "
               f"model itself is at fault)")
    unbound = re.search(r"descriptor '(\w+)' for '[\w.]*TensorBase' objects", str(exc))
    method = (f"call it as a method, `t.{unbound[1]}(...)` instead of "
              f"`torch.Tensor.{unbound[1]}(t, ...)`; or "
              if unbound and not unbound[1].startswith("__") else "")  # not t.__bool__()
    return TraceError(problem, module_path=path, module_type=type(module).__name__,
                      source=_describe_frame(user[-1]) if user else None,
                      way_out=method + _leaf_way_out(path))


def _on_meta(factory: Callable) -> Callable:
    def rule(*args, **kwargs):
        kwargs = dict(kwargs)
        kwargs["device"] = "meta"
        kwargs.pop("generator", None)
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)
    return rule


# --------------------------------------------------------------------------------------
# Modules made in forward
# --------------------------------------------------------------------------------------

def call_unregistered_module(tracer: Any, m: nn.Module, forward: Callable[..., Any],
                             args: tuple, kwargs: dict) -> Any:
    """A module built inside forward (``nn.Softmax(-1)(alpha)``): trace its forward as part
    of the caller when it holds no parameters or buffers (building it again each call gives
    the same function); refuse otherwise, since eager code would re-initialise it."""
    state = [n for n, _ in itertools.chain(m.named_parameters(), m.named_buffers())]
    if state:
        raise _user_error(
            tracer,
            f"a {type(m).__name__} with parameters or buffers ({', '.join(state[:3])}) is "
            f"built inside forward; every eager call would initialise it afresh",
            f"build the {type(m).__name__} in __init__ and call it from forward")
    _note(tracer, "made-in-forward", f"{type(m).__name__} built in forward traced as its "
          f"function")
    return forward(*args, **kwargs)


# --------------------------------------------------------------------------------------
# Bookkeeping off the graph
# --------------------------------------------------------------------------------------

_COPY_OUT = {"cpu", "tolist", "numpy", "item"}
"""Methods that copy data out of the graph: a chain ending in one with no user is logging."""
_RANDOM_WORDS = ("rand", "bernoulli", "normal", "exponential", "dropout", "gumbel",
                 "multinomial", "uniform", "poisson", "sample")


def _pure(node: fx.Node) -> bool:
    """A node whose only effect is its value (dropping it unused changes nothing)."""
    if node.op not in ("call_function", "call_method", "get_attr"):
        return False
    if isinstance(node.target, OpaqueCall):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "get_attr":
        return True
    if name.endswith("_") and not name.startswith("_") or "set" in name:
        return False
    return not any(w in name.lower() for w in _RANDOM_WORDS)


def drop_bookkeeping(graph: fx.Graph) -> list[CaptureNote]:
    """Remove chains no output depends on that end in a copy out of the graph.

    ``alphas_cpu = softmax(alpha).detach().cpu()`` kept for logging costs a softmax and a
    device copy each step and its value is not an output of the compiled module, so it is
    dropped (the eager model's side effect of holding that copy is not reproduced).
    """
    notes: list[CaptureNote] = []
    erased: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node in erased or node.users or node.op != "call_method" or \
                node.target not in _COPY_OUT:
            continue
        source = node.meta.get("source")
        where = f"{source[0]}:{source[1]}" if source else None
        chain = [node]
        frontier = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        while frontier:
            parent = frontier.pop()
            if parent in chain or parent.users or not _pure(parent):
                continue
            chain.append(parent)
            frontier.extend(parent.all_input_nodes)
            graph.erase_node(parent)
        erased.update(chain)
        notes.append(CaptureNote("dropped", f"`.{node.target}()` no output depends on "
                                 f"({len(chain)} node(s) removed)", where))
    return notes
