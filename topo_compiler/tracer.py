"""Lift a supernet into a module-level torch.fx graph.

Plain ``torch.fx.symbolic_trace`` fails or is silently wrong on the supernets NAS codebases
write: it cannot iterate a row of architecture weights (``zip(weights, self._ops)``), has no
``len`` or ``isinstance`` for a proxy, and freezes ``softmax(alpha)`` into a constant when alpha
is a plain tensor attribute (as in the original DARTS code).  This tracer fixes that with two
ideas:

* **Shaped proxies.**  Every traced value carries its meta value, computed by running each
  recorded op on ``meta`` tensors made from ``example_inputs`` (no data is touched, no module
  state changes).  Python code that needs a concrete answer -- ``len(weights)``, iteration,
  ``if y.shape[2] == x.shape[2]``, ``isinstance(w, torch.Tensor)`` -- gets it from the meta value,
  while tensor ops and shape arithmetic stay symbolic in the graph (so the batch size is not
  baked in).  Asking for a concrete answer that depends on tensor *values* raises ``TraceError``.
* **Shadow modules.**  Non-leaf modules run their ``forward`` on a shallow shadow of
  themselves whose plain tensor attributes (and lists of them) are replaced by ``get_attr``
  proxies, so architecture weights stay live however they are held, and attribute writes
  during ``forward`` never reach the user's model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import linecache
import operator
import os
import random
import sys
import types
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches, _orig_module_call

from . import capture
from . import guards as _guards
from . import runtime  # noqa: F401 - registers the functions compiled graphs call
from .meta import LEAF_FUNCTIONS, LEAF_MODULES, UNKNOWN, run_on_meta, to_meta

__all__ = ["TraceError", "TracedSupernet", "SupernetTracer", "trace_supernet", "UNKNOWN"]


# Ops whose result depends on tensor values; on meta tensors they fail, and that is expected.
_DATA_DEPENDENT = {
    "item", "tolist", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select",
    "bincount", "__bool__", "__int__", "__float__", "__index__", "any", "all",
}

_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_SPACES_DIR = os.path.join(_OWN_DIR, "spaces")  # the built-in supernets are model code
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class TraceError(RuntimeError):
    """A supernet construct the tracer cannot follow, with where it is and the way out."""

    def __init__(self, problem: str, *, module_path: str | None = None,
                 module_type: str | None = None, source: str | None = None,
                 way_out: str | None = None):
        self.problem = problem
        self.module_path = module_path
        self.module_type = module_type
        self.source = source
        self.way_out = way_out
        where = ""
        if module_path is not None:
            where = f" in module `{module_path or '<root>'}`"
            if module_type:
                where += f" ({module_type})"
        lines = [f"cannot trace the supernet{where}: {problem}"]
        if source:
            lines.append(f"  at {source}")
        if way_out:
            lines.append(f"  way out: {way_out}")
        super().__init__("\n".join(lines))


_USER_FILES: dict[str, bool] = {}


def _is_user_file(filename: str) -> bool:
    known = _USER_FILES.get(filename)
    if known is None:
        path = os.path.abspath(filename)
        known = not (path.startswith(_TORCH_DIR) or filename.startswith("<") or
                     (path.startswith(_OWN_DIR) and not path.startswith(_SPACES_DIR)))
        _USER_FILES[filename] = known
    return known


def _user_frame(start: types.FrameType | None = None) -> types.FrameType | None:
    """Innermost frame that runs user code (not torch, not this package)."""
    frame = start or sys._getframe(1)
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _describe_frame(frame: types.FrameType | None) -> str | None:
    if frame is None:
        return None
    fname, lineno = frame.f_code.co_filename, frame.f_lineno
    text = linecache.getline(fname, lineno).strip()
    return f"{fname}:{lineno} in {frame.f_code.co_name}: `{text}`"


# --------------------------------------------------------------------------------------
# Proxies that know their meta value
# --------------------------------------------------------------------------------------

_NO_TRACE = {"__array__", "__array_interface__", "__array_struct__"}
_TENSOR_DESCRIPTORS = frozenset(
    name for name in dir(torch.Tensor) if not name.startswith("__") and
    hasattr(type(inspect.getattr_static(torch.Tensor, name)), "__set__"))
"""What ``t.name = v`` writes into a tensor (``grad``, ``data``, ``requires_grad``...)."""


class ShapedProxy(fx.Proxy):
    """An fx proxy that answers Python's questions from its meta value.

    ``len``, iteration, ``bool``, ``int``, ``index`` and ``isinstance(p, torch.Tensor)`` resolve
    against the meta value computed from the example inputs; anything that would need tensor
    *data* raises :class:`TraceError`.
    """

    _is_param = False  # nn.Parameter's isinstance check reads this attribute
    _is_buffer = False  # and nn.Buffer's (assigning a traced value to an attribute)

    @property
    def val(self) -> Any:
        return self.node.meta.get("val", UNKNOWN)

    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D401 - makes isinstance(proxy, torch.Tensor) truthful
        if isinstance(self.val, torch.Tensor):
            return torch.Tensor
        return type(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _TENSOR_DESCRIPTORS:  # t.grad = g: the graph would silently drop it
            raise capture.attribute_write_error(self.tracer, self, name)
        object.__setattr__(self, name, value)

    def __getattr__(self, k: str) -> "ShapedAttribute":
        if k in _NO_TRACE:  # numpy.asarray(t) would read data the trace does not have
            raise capture.numpy_error(self.tracer, self)
        if k == "backward":  # no graph form (torch.autograd.grad: see capture.py)
            raise capture.autograd_error(self.tracer, "Tensor.backward")
        return ShapedAttribute(self, k)

    def _concrete(self, what: str) -> Any:
        value = self.val
        if value is UNKNOWN or isinstance(value, torch.Tensor):
            # guards: a mask or flag tensor decides; its value is guarded (see guards.py)
            decided, real = self.tracer.guards.decide(self.node)
            if not decided:
                self.tracer.fail_on_value(self, what)
            return real
        self.tracer.guards.on_shape_use(self.node, value)  # guards: input dims consumed
        return value

    def __len__(self) -> int:
        value = self.val
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise TypeError("len() of a 0-d tensor")
            self.tracer.guards.on_dims(self.node, (0,))  # guards: len() of an input
            return value.shape[0]
        return len(self._concrete("len()"))

    def __iter__(self) -> Iterator["fx.Proxy"]:
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        value = bool(self._concrete("a Python condition (bool())"))
        self.tracer.record_specialization(self, value)
        return value

    def __index__(self) -> int:
        return operator_index(self._concrete("an index (int)"))

    def __int__(self) -> int:
        return int(self._concrete("int()"))

    def __float__(self) -> float:
        return float(self._concrete("float()"))

    def __contains__(self, item: Any) -> bool:
        return item in self._concrete("`in`")

    def keys(self):  # ** on a proxy of a dict
        return self._concrete("dict keys").keys()

    def __setitem__(self, key: Any, value: Any) -> None:  # gates[1] = 1.0 (in place)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def operator_index(value: Any) -> int:
    return operator.index(value)


class ShapedAttribute(fx.proxy.Attribute, ShapedProxy):
    """``proxy.attr``: a lazily created ``getattr`` node (a method call if called)."""


# --------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class TracedSupernet:
    """What the tracer produced: the fx graph and how to rebuild the module around it."""

    graph: fx.Graph
    root: nn.Module
    leaf_paths: frozenset[str]
    tensor_attrs: dict[str, torch.Tensor]
    """get_attr targets that name plain (unregistered) tensor attributes of the user's model."""
    example_inputs: tuple[Any, ...]
    baked_inputs: dict[str, Any]
    """Forward arguments that were not tensors; their example value is baked into the graph."""
    specializations: list[str]
    """Python branches decided on shapes while tracing (the graph assumes the same shapes)."""
    device_type: str = "cpu"
    """Device of the example inputs (the merge cost model's default machine)."""
    capture_notes: list[str] = dataclasses.field(default_factory=list)
    """What was recorded as opaque calls or factories, traced through, or dropped
    (:mod:`.capture`)."""
    guards: tuple = ()
    """What the graph assumes about the model's state and the call (guards.Guard)."""
    baked_values: list = dataclasses.field(default_factory=list)
    """Python numbers held as constants that no guard watches (guards.BakedValue)."""
    argument_names: tuple[str, ...] = ()
    """The forward's parameters, in order (guards read arguments by position)."""


_DEFAULT_NON_LEAVES = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList,
                       nn.ParameterDict)


def _is_standard_leaf(m: nn.Module) -> bool:
    module = type(m).__module__
    return (module.startswith("torch.nn") or module.startswith("torch.ao.nn")) \
        and not isinstance(m, _DEFAULT_NON_LEAVES) or isinstance(m, tuple(LEAF_MODULES))


class SupernetTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` for supernets (see the module docstring)."""

    def __init__(self, leaf_modules: Iterable[type | str] = (),
                 options: "_guards.TraceOptions | None" = None):
        super().__init__(autowrap_functions=tuple(LEAF_FUNCTIONS))
        self.proxy_buffer_attributes = True
        leaf_modules = tuple(leaf_modules)
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        bad = [m for m in leaf_modules if not isinstance(m, (type, str))]
        if bad:
            raise TypeError(f"leaf_modules takes nn.Module classes or qualified module names, "
                            f"got {bad!r}")
        self._module_stack: list[tuple[str, nn.Module]] = []
        self._meta_modules: dict[int, nn.Module] = {}
        self._example: dict[str, Any] = {}
        self._concrete_leaves: dict[str, Any] = {}
        """fx's placeholder for each leaf of a baked argument (``arch_1``...) -> its value."""
        self._tensor_attr_targets: dict[int, str] = {}
        self.plain_tensor_attrs: dict[str, torch.Tensor] = {}
        self._attr_proxies: dict[str, fx.Proxy] = {}
        self.leaf_paths: set[str] = set()
        self._random_calls: list[tuple[str, str | None, str | None, str | None]] = []
        self.specializations: list[str] = []
        self._shadow_sources: dict[int, nn.Module] = {}  # id(shadow) -> the user's module
        self._child_shadows: dict[int, nn.Module] = {}  # id(module) -> its shadow (above)
        self._computing_meta = 0  # > 0 while running ops for meta values (capture.py)
        self.capture_notes: list[capture.CaptureNote] = []
        self.guards = _guards.GuardRecorder(self, options)
        """What the trace specialized on (see guards.py)."""

    # -- leaves ---------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return _is_standard_leaf(m)

    # -- where are we ---------------------------------------------------------------
    def current_module(self) -> tuple[str | None, str | None]:
        if not self._module_stack:
            return "", type(self.root).__name__
        path, mod = self._module_stack[-1]
        return path, type(mod).__name__

    def record_specialization(self, proxy: fx.Proxy, value: Any) -> None:
        """A Python branch taken on a shape: the graph holds for inputs of these shapes."""
        source = _describe_frame(_user_frame())
        self.specializations.append(f"`{proxy.node.name}` is {value} ({source})")

    def fail_on_value(self, proxy: fx.Proxy, what: str) -> None:
        path, mtype = self.current_module()
        frame = _user_frame()
        raise TraceError(
            f"{what} needs the value of `{proxy.node.name}`, which depends on tensor data "
            f"(architecture weights or inputs) and is unknown while tracing",
            module_path=path, module_type=mtype, source=_describe_frame(frame),
            way_out=self._way_out(path, mtype))

    def _way_out(self, path: str | None, mtype: str | None) -> str:
        if path:
            return (f"mark that module as a leaf so it runs as is: "
                    f"compile_supernet(..., leaf_modules=[{mtype}]) or "
                    f"leaf_modules=['{path}']; or make the decision from a concrete "
                    f"(non-tensor) argument")
        return ("make the decision from a concrete (non-tensor) forward argument, or move "
                "it into a submodule and mark that module as a leaf (leaf_modules=[...])")

    # -- module calls: shadows for non-leaves, meta values for leaves ----------------
    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        shadow = m if id(m) in self._shadow_sources else None  # a child its parent read
        m = self._shadow_sources.get(id(m), m)
        try:
            path = self.path_of_module(m)
        except NameError:  # built inside forward
            return capture.call_unregistered_module(self, m, forward, args, kwargs)
        caller = _user_frame()
        if caller is not None:  # guards: the globals it reads (`if MixedEdge.MODE == ...`)
            self.guards.on_frame(caller)
        self._module_stack.append((path, m))
        try:
            if self.is_leaf_module(m, path):
                self.leaf_paths.add(path)
                return self.create_proxy("call_module", path, args, kwargs)
            return _orig_module_call(shadow if shadow is not None else self._shadow(m, path),
                                     *args, **kwargs)
        finally:
            self._module_stack.pop()

    def child_shadow(self, m: nn.Module, path: str) -> nn.Module:
        """The shadow of submodule ``m`` a parent's forward reads (``self.gate``): one per
        module and trace, so reading and then calling it sees one object."""
        shadow = self._child_shadows.get(id(m))
        if shadow is None:
            shadow = self._child_shadows[id(m)] = self._shadow(m, path)
        return shadow

    def _shadow(self, m: nn.Module, path: str) -> nn.Module:
        """A shallow copy of ``m`` whose plain tensor attributes are ``get_attr`` proxies."""
        shadow = object.__new__(_guards.recording_type(type(m)))  # guards: attribute reads
        shadow.__dict__.update(m.__dict__)
        self._shadow_sources[id(shadow)] = m
        self.guards.register_shadow(shadow, path, m)
        shadow.__dict__.update(self.guards.dynamic_attributes(path, m))
        for field in ("_parameters", "_buffers", "_modules"):
            object.__setattr__(shadow, field, dict(getattr(m, field)))
        copies: dict[int, Any] = {}  # networkx: `_succ is _adj` stays one object
        memo: dict[int, Any] = {}
        for name, value in m.__dict__.items():
            if name.startswith("_") and name in ("_parameters", "_buffers", "_modules"):
                continue
            if type(value) in (list, dict, set):  # self.history.append(...) stays here
                if id(value) not in copies:
                    copies[id(value)] = copy.copy(value)
                value = shadow.__dict__[name] = copies[id(value)]
            replaced = self._proxy_tensors(value, f"{path}.{name}" if path else name, memo)
            if replaced is not value:
                shadow.__dict__[name] = replaced
        return shadow

    def _proxy_tensors(self, value: Any, target: str, memo: dict[int, Any],
                       depth: int = 0) -> Any:
        """``value`` with the tensors it holds, through nested dicts (any hashable keys),
        lists and tuples, replaced by ``get_attr`` proxies: a registered parameter or buffer
        reads its own path (NASLib's ``self._adj[u][v]['alpha']``, networkx edge data), a
        plain tensor ``target`` followed by its keys.  A container holding no tensor is
        returned as it is; one that holds some is copied, the copy shared through ``memo``
        wherever the original is (networkx's ``_pred`` and ``_succ`` hold the same edge-data
        dicts).

        why: a tensor left real is computed on at trace time and the result (with its
        autograd history) baked into the graph: the parameter's updates never reach it.
        """
        if isinstance(value, torch.Tensor):  # a Parameter held outside _parameters too
            return self._tensor_attr_proxy(value, target)
        is_sequence = isinstance(value, (list, tuple)) and not hasattr(value, "_fields")
        if not value or not (is_sequence or isinstance(value, dict)) or \
                depth >= _CONTAINER_DEPTH:
            return value
        if id(value) in memo:
            return memo[id(value)]
        memo[id(value)] = value  # a container holding itself: its inner reference stays
        if is_sequence:
            items = [self._proxy_tensors(v, f"{target}_{i}", memo, depth + 1)
                     for i, v in enumerate(value)]
            if all(a is b for a, b in zip(items, value)):
                return value
            result: Any = type(value)(items)
        else:
            changed = {}
            for k, v in value.items():
                new = self._proxy_tensors(v, f"{target}_{_sanitize(str(k))}", memo, depth + 1)
                if new is not v:
                    changed[k] = new
            if not changed:
                return value
            result = copy.copy(value)  # the dict's own type (OrderedDict, defaultdict...)
            result.update(changed)
        memo[id(value)] = result
        return result

    def _tensor_attr_proxy(self, tensor: torch.Tensor, target: str) -> fx.Proxy:
        registered = self._registered_names.get(id(tensor))
        if registered is not None:
            target = registered
        elif id(tensor) in self._tensor_attr_targets:
            target = self._tensor_attr_targets[id(tensor)]
        else:
            base, i = target, 0
            while (target in self.plain_tensor_attrs and
                   self.plain_tensor_attrs[target] is not tensor) or \
                    target in self._registered_tensors:  # keys 1 and '1' name one target
                i += 1
                target = f"{base}_{i}"
            self._tensor_attr_targets[id(tensor)] = target
            self.plain_tensor_attrs[target] = tensor
        if target not in self._attr_proxies:
            self._attr_proxies[target] = self.create_proxy("get_attr", target, (), {})
        return self._attr_proxies[target]

    # -- root arguments -------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module:
            self._module_stack.append(("", self.root))
            args = list(args)
            args[0] = self._shadow(self.root, "")
        self.guards.patch_dynamic_globals()  # guards: dynamic globals read 0-d tensors
        return fn, args

    # -- arguments and meta values ---------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):  # before fx's own torch.Tensor checks (see ShapedProxy)
            return a.node
        if _guards._numpy_number(a):  # fx writes np.float64(0.5), a name the code lacks
            return a.item()
        if isinstance(a, torch.Tensor) and a.grad_fn is not None:
            raise self._baked_history_error(a)
        return super().create_arg(a)

    def _baked_history_error(self, tensor: torch.Tensor) -> TraceError:
        """A tensor computed at trace time from tensors that require grad, about to become a
        graph constant: refused, never baked.

        why: the constant would keep the trace-time value and its autograd history (the
        parameters' updates never reach the forward; a second backward raises)."""
        path, module_type = self.current_module()
        return TraceError(
            f"a tensor of shape {tuple(tensor.shape)} computed while tracing "
            f"({type(tensor.grad_fn).__name__}) from tensors that require grad would be "
            f"baked into the graph as a constant, with its autograd history: the tracer "
            f"could not reach the parameter it was computed from",
            module_path=path, module_type=module_type,
            source=_describe_frame(_user_frame()),
            way_out="keep the parameter where the tracer follows it: registered on a "
                    "module (an nn.Parameter attribute, nn.ParameterList / ParameterDict), "
                    "or in a dict, list or tuple attribute of a module; or pass it to "
                    "forward as an argument")

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, torch.Tensor):
            name = self._registered_names.get(id(attr_val))
            if name is not None:
                if name not in self._attr_proxies:
                    self._attr_proxies[name] = self.create_proxy("get_attr", name, (), {})
                return self._attr_proxies[name]
        return attr_val

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        node = proxy.node
        path, _ = self.current_module()
        node.meta["module_path"] = path
        frame = _user_frame()
        if frame is not None:
            node.meta["source"] = (frame.f_code.co_filename, frame.f_lineno,
                                   frame.f_code.co_name)
            self.guards.on_frame(frame)  # guards: globals and closures this code reads
        user_leaf = kind == "call_module" and \
            not _is_standard_leaf(self.root.get_submodule(target))
        with capture.computing_meta(self, run_user_code=user_leaf):
            node.meta["val"] = self._meta_value(node)
        return proxy

    def _meta_value(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            if name in self._example:
                return self._example[name]
            if name in self._concrete_leaves:
                return self._concrete_leaves[name]
            return to_meta(node.args[0]) if node.args else UNKNOWN
        if node.op == "get_attr":
            if node.target in self.plain_tensor_attrs:
                return to_meta(self.plain_tensor_attrs[node.target])
            if node.target in self._registered_tensors:
                return to_meta(self._registered_tensors[node.target])
            with _maybe_revert_all_patches():  # fx patches Module.__getattr__ while tracing
                obj = self.root
                for atom in node.target.split("."):
                    obj = getattr(obj, atom)
            return to_meta(obj)
        if node.op == "output":
            return None
        args = fx.node.map_arg(node.args, lambda n: n.meta.get("val", UNKNOWN))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val", UNKNOWN))
        module = self.root.get_submodule(node.target) if node.op == "call_module" else None
        try:
            # a leaf with submodules calls them through Module.__call__, which fx patches
            patches = _maybe_revert_all_patches() if module is not None and module._modules \
                else contextlib.nullcontext()
            with patches:
                return run_on_meta(node.op, node.target, args, kwargs, module,
                                   self._meta_modules)
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context below
            name = getattr(node.target, "__name__", str(node.target))
            if module is not None:  # a leaf runs as is: no value check inside it
                value = _run_leaf_on_random_data(module, args, kwargs)
                if value is not UNKNOWN or _looks_data_dependent(exc):
                    return value
            if name in _DATA_DEPENDENT or _looks_data_dependent(exc):
                return UNKNOWN
            if node.op == "call_function":  # no meta kernel: small real tensors
                value = capture.value_on_real_data(node.target, args, kwargs)
            else:
                value = capture.value_on_real_data(
                    lambda obj, *a, **k: getattr(obj, node.target)(*a, **k), args, kwargs)
            if value is not UNKNOWN:
                return value
            path, mtype = self.current_module()
            raise TraceError(
                f"running `{name}` on the example inputs' shapes failed: "
                f"{type(exc).__name__}: {exc}",
                module_path=path, module_type=mtype,
                source=_describe_frame(_user_frame()),
                way_out="check that example_inputs have the shapes and dtypes the model "
                        "expects; if this op needs real data, mark its module as a leaf "
                        "(leaf_modules=[...])") from exc

    # -- the whole trace --------------------------------------------------------------
    def trace_supernet(self, root: nn.Module, example_inputs: Sequence[Any],
                       example_kwargs: Mapping[str, Any] | None = None) -> TracedSupernet:
        self._registered_names = {}
        self._registered_tensors = {}
        for n, t in itertools.chain(root.named_parameters(remove_duplicate=True),
                                    root.named_buffers(remove_duplicate=True)):
            self._registered_names.setdefault(id(t), n)
            self._registered_tensors[n] = t

        sig = inspect.signature(type(root).forward)
        params = list(sig.parameters.values())[1:]
        positional = [p for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if any(p.kind == p.VAR_POSITIONAL for p in params) or \
                any(p.kind == p.VAR_KEYWORD for p in params):
            raise TraceError(
                f"{type(root).__name__}.forward takes *args/**kwargs; the compiled module "
                f"needs a fixed signature",
                module_path="", module_type=type(root).__name__,
                way_out="wrap the model in a module whose forward names its arguments")
        if len(example_inputs) > len(positional):
            raise TypeError(f"example_inputs has {len(example_inputs)} values but "
                            f"{type(root).__name__}.forward takes {len(positional)} "
                            f"positional arguments ({', '.join(p.name for p in positional)})")
        example_kwargs = dict(example_kwargs or {})
        names = [p.name for p in params]
        unknown = [k for k in example_kwargs if k not in names]
        if unknown:
            raise TypeError(f"example_kwargs names {', '.join(unknown)}, which "
                            f"{type(root).__name__}.forward does not take ({', '.join(names)})")
        values: dict[str, Any] = dict(zip([p.name for p in positional], example_inputs))
        twice = [k for k in example_kwargs if k in values]
        if twice:
            raise TypeError(f"example_kwargs gives {', '.join(twice)} again (already in "
                            f"example_inputs)")
        values.update(example_kwargs)
        missing = [p.name for p in params
                   if p.name not in values and p.default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"example_inputs lacks a value for {type(root).__name__}.forward "
                            f"argument(s) {', '.join(missing)}")
        for p in params:
            values.setdefault(p.name, p.default)
        concrete: dict[str, Any] = {}
        for i, name in enumerate(names):
            value = values[name]
            if _is_tensor_tree(value):
                self._example[name] = to_meta(value)
            elif self.guards.dynamic_argument(i, value):
                # guards: a number that changes every call stays a graph input
                self._example[name] = torch.tensor(float(value), dtype=torch.float64,
                                                   device="meta")
            elif _holds_tensor(value):
                raise TraceError(
                    f"forward argument `{name}` ({type(value).__name__}) holds tensors beside "
                    f"other values; its tensors would be baked into the graph as constants",
                    module_path="", module_type=type(root).__name__,
                    way_out=f"pass the tensors of `{name}` as separate forward arguments (a "
                            f"wrapper module whose forward takes them and builds `{name}`), "
                            f"or give `{name}` tensors only (a dict with str keys, a list or a "
                            f"tuple of tensors is a graph input)")
            else:
                concrete[name] = value
        self.guards.on_arguments(names, values, [n for n in self._example
                                                 if _is_tensor_tree(values[n])])
        # fx makes one placeholder per pytree leaf, numbered from 1 (Tracer._proxy_placeholder)
        self._concrete_leaves = {f"{name}_{i}": leaf for name, value in concrete.items()
                                 for i, leaf in enumerate(pytree.tree_leaves(value), 1)}

        attrs_before = set(root.__dict__)
        try:
            with _guard_random(self), capture.capturing(self, root), self.guards.active(), \
                    warnings.catch_warnings():
                # why: fx warns that it cannot assert a specialized argument (a numpy scalar);
                # the guards check every non-tensor argument on each call instead
                warnings.filterwarnings("ignore", message="Was not able to add assertion")
                graph = self.trace(root, concrete_args=concrete or None)
        except Exception as exc:
            if type(exc).__module__.startswith(__package__):  # a refusal, or guards.NotDynamic
                raise
            raise capture.foreign_error(self, exc) from exc  # Python's, torch's, a library's
        finally:
            for name in set(root.__dict__) - attrs_before:  # fx's tensor constants
                self.plain_tensor_attrs[name] = root.__dict__.pop(name)
        _check_fx_can_generate(graph, root, concrete)
        self.capture_notes.extend(capture.drop_bookkeeping(graph))
        _keep_argument_names(graph, concrete)
        self.guards.finish(graph)
        _drop_dead_python_values(graph)
        return TracedSupernet(graph=graph, root=root, leaf_paths=frozenset(self.leaf_paths),
                              tensor_attrs=dict(self.plain_tensor_attrs),
                              example_inputs=tuple(example_inputs), baked_inputs=concrete,
                              specializations=list(self.specializations),
                              guards=tuple(self.guards.guards.values()),
                              baked_values=list(self.guards.baked),
                              argument_names=tuple(names),
                              device_type=_device_type(example_inputs),
                              capture_notes=[str(n) for n in self.capture_notes])


def _check_fx_can_generate(graph: fx.Graph, root: nn.Module, concrete: dict[str, Any]) -> None:
    """torch.fx writes a list, tuple or dict argument as one placeholder per item, and then
    emits code that does not parse when the forward also has arguments with defaults."""
    if not isinstance(graph._codegen, fx.graph._PyTreeCodeGen):
        return
    defaulted = [n.target for n in graph.nodes if n.op == "placeholder" and n.args]
    if defaulted:
        nested = [k for k, v in concrete.items() if not pytree.tree_flatten(v)[1].is_leaf()]
        raise TraceError(
            f"torch.fx cannot generate code for a forward that takes the container argument(s) "
            f"{', '.join(nested)} beside arguments with defaults ({', '.join(defaulted)})",
            module_path="", module_type=type(root).__name__,
            way_out="wrap the model in a module whose forward has no defaulted arguments and "
                    "passes them explicitly")


def _keep_argument_names(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """fx names the placeholder of a concrete argument ``index_1``; give it its own name
    back, so that the generated forward keeps the model's argument names."""
    if isinstance(graph._codegen, fx.graph._PyTreeCodeGen):
        return
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder" or not node.target.endswith("_1"):
            continue
        name = node.target[:-2]
        if name in concrete and name not in taken and \
                pytree.tree_flatten(concrete[name])[1].is_leaf():
            node.target = name


def _device_type(example_inputs: Sequence[Any]) -> str:
    for value in torch.utils._pytree.tree_leaves(list(example_inputs)):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _looks_data_dependent(exc: Exception) -> bool:
    text = str(exc)
    return "data-dependent" in text or "meta tensors" in text or "item()" in text


def _run_leaf_on_random_data(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Output meta value of a leaf whose forward needs tensor values (a user leaf that
    branches on its weights): run a copy of it on random data of the example's shapes.

    The copy keeps the user's module and buffers untouched; the RNG state is restored so the
    trace-time randomness check does not fire on our own draws.
    """
    gen = torch.Generator().manual_seed(0)

    def realize(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            if v.is_floating_point():
                return torch.empty(v.shape, dtype=v.dtype).uniform_(generator=gen)
            return torch.zeros(v.shape, dtype=v.dtype)
        return v

    try:
        # in the caller's grad mode, as eager code (a leaf may call torch.autograd.grad); its
        # submodules run, not record (fx patches Module.__call__ while tracing)
        with torch.random.fork_rng(devices=[]), _maybe_revert_all_patches():
            clone = copy.deepcopy(module).cpu()
            out = clone(*torch.utils._pytree.tree_map(realize, args),
                        **torch.utils._pytree.tree_map(realize, kwargs))
        return to_meta(out)
    except Exception:  # noqa: BLE001 - the shape stays unknown; asking for it raises later
        return UNKNOWN


_CONTAINER_DEPTH = 6
"""How deep ``_proxy_tensors`` looks into a module attribute's nested containers (networkx
keeps edge data three dicts down, a multigraph four)."""


def _sanitize(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key)


def _is_tensor_tree(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(_is_tensor_tree(v) for v in value)
    if type(value) is dict and value:  # batch['x']: a getitem node on the argument
        return all(isinstance(k, str) and _is_tensor_tree(v) for k, v in value.items())
    return False


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _drop_dead_python_values(graph: fx.Graph) -> None:
    """Remove unused reads and shape arithmetic that Python consumed while tracing.

    ``if y.shape[2] == x.shape[2]`` leaves an ``eq`` node nobody uses; attribute proxies are
    made eagerly.  Unused nodes producing tensors are kept: they may be in-place updates.
    """
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output", "call_module") or \
                node.target is operator.setitem:
            continue
        if node.meta.get("python_only"):  # a mask condition decided at trace time
            graph.erase_node(node)
            continue
        val = node.meta.get("val")
        if node.op == "get_attr" or not isinstance(val, torch.Tensor) and val is not UNKNOWN \
                and not (isinstance(val, (list, tuple)) and
                         any(isinstance(v, torch.Tensor) for v in val)):
            graph.erase_node(node)


# --------------------------------------------------------------------------------------
# Python-level randomness: it would be frozen into the graph, so it is refused.
# --------------------------------------------------------------------------------------

_RANDOM_FUNCS = ("random", "randint", "randrange", "choice", "choices", "sample", "shuffle",
                 "uniform", "gauss", "normalvariate", "betavariate", "expovariate")
_NUMPY_RANDOM_FUNCS = ("rand", "randn", "randint", "random", "choice", "permutation",
                       "shuffle", "uniform", "normal", "random_sample", "binomial")
_TORCH_RANDOM_FUNCS = ("rand", "randn", "randint", "randperm", "bernoulli", "multinomial",
                       "normal", "rand_like", "randn_like", "randint_like")


@contextlib.contextmanager
def _guard_random(tracer: SupernetTracer):
    """Record Python/numpy/torch random draws made while tracing and refuse them after.

    A draw made at trace time (``random.randint(0, len(ops) - 1)``, ``np.random.choice``,
    ``torch.rand(1) < p``) is evaluated once and frozen into the graph: the compiled module
    would always take the same path.  torch random ops applied to traced tensors are recorded
    as graph nodes and stay random; those are fine.
    """
    patches: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str, only_eager: bool = False) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def recording(*args, **kwargs):
            if not (only_eager and _has_proxy(args, kwargs)) and not tracer._computing_meta:
                frame = _user_frame(sys._getframe(1))
                path, mtype = tracer.current_module()
                tracer._random_calls.append(
                    (label, path, mtype, _describe_frame(frame)))
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, recording)

    states = _rng_states()
    try:  # every patch is undone, however tracing (or patching) ends
        for name in _RANDOM_FUNCS:
            wrap(random, name, f"random.{name}")
        np = sys.modules.get("numpy")
        if np is not None:
            for name in _NUMPY_RANDOM_FUNCS:
                wrap(np.random, name, f"numpy.random.{name}")
        for name in _TORCH_RANDOM_FUNCS:
            wrap(torch, name, f"torch.{name}", only_eager=True)
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
    if tracer._random_calls:
        label, path, mtype, source = tracer._random_calls[0]
        raise TraceError(
            f"`{label}` draws a random number at trace time; it would be evaluated once and "
            f"frozen into the graph, so the compiled supernet would always take one path",
            module_path=path, module_type=mtype, source=source,
            way_out="sample outside the model and pass the sampled weights or path as a "
                    "forward argument (tensor weights stay live), or draw it with a torch "
                    "op on traced tensors (torch.rand_like(x)), which stays random; " +
                    (f"or mark the sampling module as a leaf (leaf_modules=['{path}'])" if path
                     else "or move the sampling into a submodule and mark it a leaf"))
    if _rng_states() != states:
        raise TraceError(
            "the forward consumed Python, numpy or torch random numbers at trace time; they "
            "would be frozen into the graph",
            way_out="sample outside the model and pass the result as a forward argument, "
                    "or mark the sampling module as a leaf (leaf_modules=[...])")


def _has_proxy(args: Any, kwargs: Any) -> bool:
    found = False

    def look(a: Any) -> Any:
        nonlocal found
        if isinstance(a, fx.Proxy):
            found = True
        return a

    torch.utils._pytree.tree_map(look, (args, kwargs))
    return found


def _rng_states() -> tuple[Any, ...]:
    """Python's, numpy's (when imported) and torch's CPU generator states, comparable."""
    np = sys.modules.get("numpy")
    np_state = None
    if np is not None:
        s = np.random.get_state()
        np_state = (s[0], s[1].tobytes(), s[2], s[3], s[4])
    torch_state = bytes(torch.random.get_rng_state().tolist())  # numpy may be absent
    return (random.getstate(), np_state, torch_state)


# --------------------------------------------------------------------------------------

def trace_supernet(model: nn.Module, example_inputs: Any,
                   leaf_modules: Iterable[type | str] = (), *,
                   example_kwargs: Mapping[str, Any] | None = None,
                   options: "_guards.TraceOptions | None" = None) -> TracedSupernet:
    """Trace ``model`` into a module-level fx graph with meta values from ``example_inputs``.

    Standard ``torch.nn`` layers stay leaves (``call_module`` nodes); ``leaf_modules`` names
    more (classes or qualified names); ``example_kwargs`` gives keyword arguments (keyword-only
    ones too).  Raises :class:`TraceError` for constructs that a trace cannot follow
    faithfully.  ``options`` (``guards.TraceOptions``) is how a re-trace asks for values
    to be read at run time.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, (torch.Tensor, Mapping)) or \
            not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    tracer = SupernetTracer(leaf_modules, options)
    return tracer.trace_supernet(model, tuple(example_inputs), example_kwargs)
