"""Guards: what a trace assumed, checked on every call, and re-tracing when it no longer holds.

A trace runs the model's Python once, so every Python value the forward looked at is frozen
into the graph.  The tracer records each of them as a :class:`Guard` (the value it saw, where
it reads it from, the user's source line):

* non-tensor forward arguments (``forward(x, index)``, ``forward(x, 'weight')``);
* Python attributes of the model's modules read by a traced forward (``self.tau``,
  ``self.arch``, ``self.training``);
* module-level globals and attributes of global objects read by traced code
  (``scheduler.rate``);
* input dimensions that Python consumed (``if x.shape[-1] > 16``, ``int(x.size(0))``);
* the values of non-parameter tensors that decided a Python branch (pruning masks,
  flag tensors: ``if w != 0`` with ``w = softmax(alpha) * self.mask``).

:class:`Dispatch` checks the guards of each cached variant on every call and runs the first
that holds; when none does it re-traces the model as it is now (a new variant, bounded by
``cache_size_limit``).  A float that changes after compiling (a temperature, a decay rate) is
not re-traced for every value: the next trace reads it at run time from a 0-d tensor that is
refreshed before each call (*automatic dynamic*, as torch.dynamo does).

What cannot be guarded (a closure variable, a number held deeper in an object) is reported as
a *baked value* with its source line, and one :class:`BakedValueWarning` says so at compile
time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import dis
import inspect
import itertools
import linecache
import sys
import types
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["Guard", "BakedValue", "GuardRecorder", "Dispatch", "RecompileLimitError",
           "BakedValueWarning", "DEFAULT_CACHE_SIZE_LIMIT"]

DEFAULT_CACHE_SIZE_LIMIT = 8
"""Variants kept per compiled supernet (torch.dynamo's ``cache_size_limit`` is 8 as well)."""

_MISSING = object()
_PRIMITIVES = (bool, int, float, str, type(None))
_MAX_GUARDED_ITEMS = 64
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_HOLDER_PREFIX = "_dynamic_"


class RecompileLimitError(RuntimeError):
    """The compiled supernet re-traced ``cache_size_limit`` times: a value keeps changing."""


class BakedValueWarning(UserWarning):
    """Python values the graph holds as constants and no guard can check."""


# --------------------------------------------------------------------------------------
# What a guard reads
# --------------------------------------------------------------------------------------
# An access is a hashable tuple naming where a value lives:
#   ("arg", i)                       the i-th argument of forward (after binding keywords)
#   ("shape", i, leaf, dim)          dim `dim` of argument i (leaf: index among its tensors)
#   ("attr", path, name)             attribute `name` of the model's module at `path`
#   ("global", module_name, chain)   a module-level global, then attributes along `chain`
#   ("tensor", path, name, keys)     a non-parameter tensor attribute (keys index lists/dicts)
#   ("call", path, name)             the answer of method `name()` of the module at `path`

def describe_access(access: tuple, arg_names: Sequence[str] = ()) -> str:
    kind = access[0]
    if kind == "arg":
        i = access[1]
        return f"argument `{arg_names[i] if i < len(arg_names) else i}`"
    if kind == "shape":
        _, i, leaf, dim = access
        name = arg_names[i] if i < len(arg_names) else str(i)
        return f"`{name}{'' if leaf is None else f'[{leaf}]'}.shape[{dim}]`"
    if kind == "attr":
        _, path, name = access
        return f"`{path + '.' if path else ''}{name}`" + (" (train/eval mode)"
                                                          if name == "training" else "")
    if kind == "global":
        _, module, chain = access
        return f"global `{'.'.join(chain)}` of `{module}`"
    if kind == "ident":
        _, path, name, _where = access
        return f"the object at `{path + '.' if path else ''}{name}` (replaced on the model)"
    if kind == "call":
        _, path, name = access
        return f"`{path + '.' if path else ''}{name}()`"
    if kind == "cond":
        return f"the condition `{access[1]}` on " + ", ".join(
            describe_access(a, arg_names) for a in access[3])
    _, path, name, keys = access
    return f"tensor `{path + '.' if path else ''}{name}{''.join(f'[{k!r}]' for k in keys)}`"


@dataclasses.dataclass(frozen=True)
class Guard:
    """One value a variant was traced with: it holds while ``read(access) == expected``.

    ``dynamic`` guards only check that the value is still a number: the graph reads it at
    run time.
    """

    access: tuple
    expected: Any
    source: str | None = None
    dynamic: bool = False

    def label(self, arg_names: Sequence[str] = ()) -> str:
        return describe_access(self.access, arg_names)


@dataclasses.dataclass(frozen=True)
class BakedValue:
    """A Python number the graph holds as a constant, with no guard watching it."""

    what: str
    value: str
    source: str

    def __str__(self) -> str:
        return f"{self.what} = {self.value} ({self.source})"


def _numpy_number(value: Any) -> bool:
    """A numpy integer or floating scalar (SNAS's ``initial_temp * np.exp(-rate * epoch)``):
    guarded and made a run-time input like the Python number it stands for."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.integer, np.floating))


def _is_float(value: Any) -> bool:
    """A float that may become a run-time input (a Python float or a numpy floating)."""
    if type(value) is float:
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.floating)


def _guardable(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind in _PRIMITIVES or _numpy_number(value):
        return True
    if depth > 2:
        return False
    if kind in (tuple, list):
        return len(value) <= _MAX_GUARDED_ITEMS and all(_guardable(v, depth + 1) for v in value)
    if kind is dict:
        return len(value) <= _MAX_GUARDED_ITEMS and \
            all(type(k) in _PRIMITIVES and _guardable(v, depth + 1) for k, v in value.items())
    return False


def _snapshot(value: Any) -> Any:
    """A copy that later in-place edits of ``value`` (``model.arch[0] = 3``) do not reach."""
    return copy.deepcopy(value) if type(value) in (list, dict, tuple) else value


def _same(value: Any, expected: Any) -> bool:
    """Equal and of the same type (``1``, ``1.0`` and ``True`` trace differently)."""
    if type(value) is not type(expected):
        return False
    if isinstance(value, torch.Tensor):  # never its truth value (ambiguous for a tensor)
        return value is expected
    if type(value) in (tuple, list):
        return len(value) == len(expected) and all(map(_same, value, expected))
    if type(value) is dict:
        return value.keys() == expected.keys() and all(_same(value[k], expected[k])
                                                       for k in value)
    return value == expected


def _is_number(value: Any) -> bool:
    return type(value) in (float, int) or _numpy_number(value)


def _frame_source(frame: types.FrameType | None) -> str | None:
    if frame is None:
        return None
    fname, line = frame.f_code.co_filename, frame.f_lineno
    return f"{fname}:{line}: `{linecache.getline(fname, line).strip()}`"


# --------------------------------------------------------------------------------------
# Recording while tracing
# --------------------------------------------------------------------------------------

_ACTIVE: list["GuardRecorder"] = []
"""The recorder of the trace in progress (shadow modules report attribute reads to it)."""

_RECORDING_TYPES: dict[type, type] = {}


def recording_type(cls: type) -> type:
    """A subclass of ``cls`` whose instances report reads of plain Python attributes.

    Shadow modules (see the tracer) are instances of it, so ``self.tau`` in a traced forward
    becomes a guard on the user's module.
    """
    made = _RECORDING_TYPES.get(cls)
    if made is not None:
        return made
    base_get = cls.__getattribute__

    def __getattribute__(self, name: str):
        value = base_get(self, name)
        if name in _MODULE_INTERNALS or name[:2] == "__" or not _ACTIVE:
            return value
        if type(value) in _PRIMITIVES or type(value) in (tuple, list, dict) or \
                _numpy_number(value):
            if name in base_get(self, "__dict__"):
                _ACTIVE[-1].on_attribute(self, name, value)
            else:
                _ACTIVE[-1].on_class_attribute(self, name, value)
        elif type(value) is types.MethodType and value.__self__ is self:
            return _ACTIVE[-1].on_method(self, name, value)
        return value

    def __getattr__(self, name: str):
        # nn.Module.__getattr__ (fx patches it while tracing), looked up at each call
        value = cls.__getattr__(self, name)
        if _ACTIVE and isinstance(value, nn.Module) and \
                base_get(self, "__dict__").get("_modules", {}).get(name) is value:
            # a child read from this forward (``self.gate.on``): its reads are guarded too
            return _ACTIVE[-1].on_child(self, name, value)
        return value

    base_set = cls.__setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        if _ACTIVE and name[:2] != "__":
            _ACTIVE[-1].on_assign(self, name, value)
        base_set(self, name, value)

    try:
        made = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                           "__getattr__": __getattr__,
                                           "__setattr__": __setattr__,
                                           "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    except TypeError:  # a class that refuses subclasses (__init_subclass__ with arguments)
        made = cls
    _RECORDING_TYPES[cls] = made
    return made


@dataclasses.dataclass
class TraceOptions:
    """What the dispatcher asks of the next trace."""

    dynamic: frozenset = frozenset()
    """Accesses (attributes, arguments, globals) to read at run time instead of baking."""
    holders: dict = dataclasses.field(default_factory=dict)
    """access -> the 0-d tensor a dynamic attribute or global is read from at run time."""
    retrace: bool = True
    """A dispatcher's re-trace (it keeps the guards), not a compile made for the user."""


class NotDynamic(Exception):
    """Python needed the concrete value of a dynamic number: trace it as a constant."""

    def __init__(self, access: tuple):
        super().__init__(access)
        self.access = access


class GuardRecorder:
    """Collects the guards of one trace (owned by the tracer, see ``SupernetTracer``)."""

    def __init__(self, tracer: Any, options: TraceOptions | None = None):
        self.tracer = tracer
        self.options = options or TraceOptions()
        self.guards: dict[tuple, Guard] = {}
        self.baked: list[BakedValue] = []
        self._shadows: dict[int, tuple[str, nn.Module, nn.Module]] = {}
        self._codes: dict[types.CodeType, tuple[dict, dict]] = {}
        self._holder_targets: dict[str, tuple] = {}
        self._real: dict[fx.Node, Any] = {}
        self.arg_names: list[str] = []
        self.arg_index: dict[str, tuple[int, int | None]] = {}
        """placeholder target -> (argument index, tensor leaf index or None)."""
        self._global_patches: list[tuple[dict, str, Any]] = []
        self._dynamic_placeholders: dict[str, int] = {}
        self._dynamic_values: dict[int, Any] = {}
        entry = _user_frame()
        self._entry_code = entry.f_code if entry is not None else None
        """The code that called the compiler: ops issued by library code (torch.nn, the
        built-in spaces) are attributed to it and say nothing about the model's code."""

    # -- lifetime --------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self):
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()
            for namespace, name, original in reversed(self._global_patches):
                namespace[name] = original
            self._global_patches.clear()

    def _add(self, access: tuple, expected: Any, source: str | None = None,
             dynamic: bool = False) -> None:
        if access not in self.guards:
            self.guards[access] = Guard(access, _snapshot(expected), source, dynamic)

    # -- arguments ---------------------------------------------------------------------
    def on_arguments(self, names: Sequence[str], values: dict[str, Any],
                     tensor_args: Iterable[str]) -> None:
        """Guard the non-tensor arguments; remember which placeholder is which argument."""
        self.arg_names = list(names)
        tensor_args = set(tensor_args)
        self._dynamic_placeholders = {name: i for i, name in enumerate(names)
                                      if self.dynamic_argument(i, values[name])
                                      and name not in tensor_args}
        self._dynamic_values = {i: values[name] for name, i in
                                self._dynamic_placeholders.items()}
        for i, name in enumerate(names):
            if name in tensor_args:
                value = values[name]
                self.arg_index[name] = (i, None) if isinstance(value, torch.Tensor) else (i, -1)
                continue
            self._add(("arg", i), values[name], dynamic=self.dynamic_argument(i, values[name]))

    def dynamic_argument(self, index: int, value: Any) -> bool:
        """Argument ``index`` is read at run time (a number the dispatcher saw change)."""
        return ("arg", index) in self.options.dynamic and _is_number(value)

    # -- attributes of the model's modules ---------------------------------------------
    def register_shadow(self, shadow: nn.Module, path: str, module: nn.Module) -> None:
        self._shadows[id(shadow)] = (path, module, shadow)

    def on_attribute(self, shadow: nn.Module, name: str, value: Any) -> None:
        entry = self._shadows.get(id(shadow))
        if entry is None:
            return
        path, module, _ = entry
        access = ("attr", path, name)
        if access in self.guards:
            return
        real = module.__dict__.get(name, _MISSING)
        if real is _MISSING or not _guardable(real):
            return
        self._add(access, real, _frame_source(_user_frame()))

    def on_child(self, shadow: nn.Module, name: str, child: nn.Module) -> nn.Module:
        """``self.<name>`` of a shadow is a submodule: the tracer's shadow of it, so the
        parent's reads of its attributes (``self.gate.on``, ``self.op.is_zero()``) are
        guarded like the child's own."""
        entry = self._shadows.get(id(shadow))
        if entry is None:
            return child
        path = entry[0]
        return self.tracer.child_shadow(child, f"{path}.{name}" if path else name)

    def on_class_attribute(self, shadow: nn.Module, name: str, value: Any) -> None:
        """``self.MODE`` read off the module's class: guard the class attribute, and that
        the module still has no attribute of its own by that name."""
        entry = self._shadows.get(id(shadow))
        if entry is None or not _guardable(value):
            return
        path, module, _ = entry
        access = _class_attribute_access(type(module), name)
        if access is None or access in self.guards:
            return
        self._add(access, value, _frame_source(_user_frame()))
        self._add(("attr", path, name), _MISSING)

    def on_method(self, shadow: nn.Module, name: str, method: types.MethodType) -> Any:
        """``self.op.is_zero_layer()`` in a parent's forward: a question asked of a child.

        When it takes no argument, adds no op to the graph and answers a plain value, the
        trace depends on that answer only: guard the answer (the method is asked again on
        the model's module at each call) instead of every attribute it read, so a leaf's
        sampled ``active_index`` re-traces only when the answer changes.
        """
        entry = self._shadows.get(id(shadow))
        stack = self.tracer._module_stack
        if entry is None or not stack or stack[-1][1] is entry[1] or \
                method.__func__.__module__.startswith("torch."):
            return method
        path = entry[0]
        graph = self.tracer.graph

        def asked(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs or ("call", path, name) in self.guards:
                return method(*args, **kwargs)
            before, nodes = set(self.guards), len(graph.nodes)
            answer = method()
            if type(answer) in _PRIMITIVES and len(graph.nodes) == nodes:
                for access in set(self.guards) - before:
                    del self.guards[access]
                self._add(("call", path, name), answer, _frame_source(_user_frame()))
            return answer

        return asked

    def on_assign(self, shadow: nn.Module, name: str, value: Any) -> None:
        """``self.<name> = value`` in a traced forward: state the graph cannot carry over.

        The assignment stays on the shadow (the trace never writes the user's model), so a
        Python number the forward updates (``self.n += 1``) or a buffer it rebinds
        (``self.steps += 1``) would keep its traced value in every compiled call.  Refuse it
        with the way out; the same value written again (``self.flag = True``) is harmless.
        """
        entry = self._shadows.get(id(shadow))
        if entry is None:
            return
        path, module, _ = entry
        label = f"self.{name}" + (f" (`{path}.{name}`)" if path else "")
        if name in module._buffers and value is not module._buffers[name]:
            self._refuse_assignment(
                path, module, f"forward rebinds the buffer {label} to a value computed in "
                f"the graph (`self.{name} += ...` or `self.{name} = ...`); the compiled "
                f"graph would compute it but never store it, so the buffer would keep its "
                f"traced value",
                f"update the buffer in place (`self.{name}.add_(1)`, `self.{name}.copy_(...)`),"
                f" which the graph replays")
        real = module.__dict__.get(name, _MISSING)
        if type(real) in (int, float, bool) and \
                (type(value) is not type(real) or value != real):
            self._refuse_assignment(
                path, module, f"forward updates the Python {type(real).__name__} attribute "
                f"{label} (traced with {real!r}); a graph cannot replay a Python attribute "
                f"update, so it would stay {real!r} and the output would use the traced "
                f"value in every call",
                f"keep it in a buffer updated in place (`self.register_buffer('{name}', "
                f"torch.zeros((), dtype=torch.long))` and `self.{name}.add_(1)` in forward)")

    def _refuse_assignment(self, path: str, module: nn.Module, problem: str,
                           fix: str) -> None:
        from .tracer import TraceError

        mtype = type(module).__name__
        leaf = f"mark the module as a leaf (leaf_modules=['{path}'] or [{mtype}]) so it " \
               f"runs eagerly" if path else "compile_supernet's partial mode (the " \
               "default) runs this forward eagerly and compiles its submodules"
        raise TraceError(problem, module_path=path, module_type=mtype,
                         source=_frame_source(_user_frame()),
                         way_out=f"{fix}; or {leaf}; or make the update outside forward "
                                 f"(in the training loop)")

    def dynamic_attributes(self, path: str, module: nn.Module) -> dict[str, Any]:
        """Replacement values (proxies of 0-d tensors) for the dynamic attributes of a
        module about to be shadowed."""
        out = {}
        for access in self.options.dynamic:
            if access[0] != "attr" or access[1] != path:
                continue
            name = access[2]
            value = module.__dict__.get(name, _MISSING)
            if not _is_number(value):
                continue  # the guard fails later and the dispatcher re-traces statically
            out[name] = self._holder_proxy(access, value,
                                           f"{path}.{_HOLDER_PREFIX}{name}" if path
                                           else f"{_HOLDER_PREFIX}{name}")
        return out

    def _holder_proxy(self, access: tuple, value: float, target: str) -> fx.Proxy:
        holder = self.options.holders.get(access)
        if holder is None:
            holder = torch.tensor(float(value), dtype=torch.float64)
            self.options.holders[access] = holder
        else:
            holder.fill_(float(value))
        self._holder_targets[target] = access
        self._add(access, value, dynamic=True)
        return self.tracer._tensor_attr_proxy(holder, target)

    # -- globals ---------------------------------------------------------------------------
    def patch_dynamic_globals(self) -> None:
        """Make dynamic globals (``RATE``, ``scheduler.rate``) read 0-d tensors while tracing."""
        for access in sorted(a for a in self.options.dynamic if a[0] == "global"):
            _, module_name, chain = access
            module = sys.modules.get(module_name)
            if module is None:
                continue
            namespace = module.__dict__
            if isinstance(namespace.get(chain[0]), type):
                continue  # `MixedEdge.MODE`: the class stays (isinstance, constructors)
            current = _read_chain(namespace, chain)
            if not _is_number(current):
                continue
            target = f"{_HOLDER_PREFIX}{'_'.join(chain)}"
            proxy = self._holder_proxy(access, current, target)
            if len(chain) == 1:
                replacement = proxy
            else:
                replacement = _AttributeView(namespace[chain[0]], chain[1:], proxy)
            self._global_patches.append((namespace, chain[0], namespace[chain[0]]))
            namespace[chain[0]] = replacement

    def on_frame(self, frame: types.FrameType) -> None:
        """A user frame issued a graph op: its globals and closure variables get looked at."""
        code = frame.f_code
        if code not in self._codes and code is not self._entry_code:
            free = {name: frame.f_locals.get(name, _MISSING) for name in code.co_freevars}
            self._codes[code] = (frame.f_globals, free)

    # -- shapes ------------------------------------------------------------------------------
    def on_shape_use(self, node: fx.Node, value: Any) -> None:
        """Python consumed a value computed from input shapes: guard those dimensions."""
        source = _frame_source(_user_frame())
        for access in self._shape_reads(node):
            _, i, leaf, dim = access
            self._add(access, self._example_dim(i, leaf, dim), source)

    def on_dims(self, node: fx.Node, dims: tuple[int, ...]) -> None:
        """Python read these dims of ``node`` (``len(x)`` reads dim 0)."""
        source = _frame_source(_user_frame())
        for access in self._dims_of(node, dims):
            _, i, leaf, dim = access
            self._add(access, self._example_dim(i, leaf, dim), source)

    def _example_dim(self, i: int, leaf: int | None, dim: int) -> int:
        name = self.arg_names[i]
        val = self.tracer._example.get(name)
        if leaf is not None:
            val = pytree.tree_leaves(val)[leaf]
        return int(val.shape[dim])

    def _shape_reads(self, node: fx.Node) -> set[tuple]:
        """The input dimensions a Python value computed from shapes depends on.

        A dim read straight off an input (``x.shape[2]``, ``x.size(0)``) is that dim; a read off
        an intermediate tensor depends on every non-batch dim of the inputs it comes from, and
        on the batch too when dim 0 (or the whole shape) is read.
        """
        reads: set[tuple] = set()
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            dims = _dims_read(n)
            if dims is not None:
                src = n.args[0] if n.args else None
                if isinstance(src, fx.Node) and src.op == "call_function" and \
                        getattr(src.target, "__name__", "") == "getattr":
                    src = src.args[0]
                if isinstance(src, fx.Node):
                    reads |= self._dims_of(src, dims)
                continue
            stack.extend(n.all_input_nodes)
        return reads

    def _dims_of(self, tensor_node: fx.Node, dims: tuple[int, ...] | None) -> set[tuple]:
        out: set[tuple] = set()
        if tensor_node.op == "placeholder" and tensor_node.target in self.arg_index and \
                self.arg_index[tensor_node.target][1] is None:
            i, leaf = self.arg_index[tensor_node.target]
            rank = self._example_rank(i, leaf)
            wanted = range(rank) if dims == () else [d % rank for d in dims]
            return {("shape", i, leaf, d) for d in wanted}
        batch = dims == () or any(d == 0 for d in dims)
        for p in _placeholders_above(tensor_node):
            if p.target not in self.arg_index:
                continue
            i, leaf = self.arg_index[p.target]
            leaves = [leaf] if leaf is not None else [None]
            if leaf == -1:
                leaves = range(len(pytree.tree_leaves(self.tracer._example[self.arg_names[i]])))
            for j in leaves:
                rank = self._example_rank(i, j)
                out |= {("shape", i, j, d) for d in range(0 if batch else 1, rank)}
        return out

    def _example_rank(self, i: int, leaf: int | None) -> int:
        val = self.tracer._example.get(self.arg_names[i])
        if leaf is not None:
            val = pytree.tree_leaves(val)[leaf]
        return val.dim()

    # -- tensor values deciding Python branches (masks, flags) -----------------------------
    def decide(self, node: fx.Node) -> tuple[bool, Any]:
        """The real value of ``node`` when it depends only on model tensors, at least one of
        which is not a trained parameter (a mask, a flag); guards those tensors.

        Returns ``(False, None)`` when the value depends on inputs or only on parameters.
        """
        ancestors = _ancestors(node)
        dynamic = {a: self._holder_targets[a.target] for a in ancestors
                   if a.op == "get_attr" and a.target in self._holder_targets}
        dynamic.update({a: ("arg", self._dynamic_placeholders[a.target]) for a in ancestors
                        if a.op == "placeholder" and a.target in self._dynamic_placeholders})
        if dynamic:
            return True, self._decide_on_dynamic(node, ancestors, dynamic)
        if any(a.op == "placeholder" for a in ancestors):
            return False, None
        if any(a.op == "call_module" for a in ancestors):
            return False, None
        watched = []
        for a in ancestors:
            if a.op != "get_attr":
                continue
            tensor = self._tensor_of(a.target)
            if not isinstance(tensor, torch.Tensor):
                return False, None
            if not isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
                watched.append((a.target, tensor))
        if not watched:
            return False, None
        try:
            value = self._evaluate(node)
        except Exception:  # noqa: BLE001 - not evaluable: the caller raises its TraceError
            return False, None
        source = _frame_source(_user_frame())
        for target, tensor in watched:
            access = _tensor_access(self.tracer.root, tensor, target)
            if access is not None:
                self._add(access, tensor.detach().to("cpu", copy=True), source)
        for a in ancestors:
            a.meta["python_only"] = True
        return True, value

    def _decide_on_dynamic(self, node: fx.Node, ancestors: list[fx.Node],
                           dynamic: dict[fx.Node, tuple]) -> Any:
        """A condition on numbers read at run time (``if drop_prob > 0.``): guard on its
        outcome, recomputed from the current numbers on each call, not on the numbers."""
        first = next(iter(dynamic.values()))
        if node in dynamic or any(a not in dynamic and a.op in ("placeholder", "get_attr",
                                                               "call_module")
                                  for a in ancestors):
            raise NotDynamic(first)  # the number itself, or mixed with tensors: a constant
        wanted = set(ancestors)
        refs: dict[fx.Node, Any] = {n: _In(access) for n, access in dynamic.items()}
        steps = []
        for n in node.graph.nodes:
            if n not in wanted or n in refs:
                continue
            args = _freeze(fx.node.map_arg(n.args, refs.__getitem__))
            kwargs = _freeze(fx.node.map_arg(n.kwargs, refs.__getitem__))
            steps.append((n.op, n.target, args, tuple(sorted(kwargs.items()))))
            refs[n] = _Ref(len(steps) - 1)
        inputs = tuple(sorted(set(dynamic.values())))
        now = {access: self._current_number(access) for access in inputs}
        try:
            value = run_condition(tuple(steps), now)
        except Exception:  # noqa: BLE001 - not computable on numbers: keep it a constant
            raise NotDynamic(first) from None
        source = _frame_source(_user_frame())
        text = source.split(": `", 1)[-1].rstrip("`") if source else node.name
        self._add(("cond", text, tuple(steps), inputs), value, source)
        for a in ancestors:
            if a not in dynamic:
                a.meta["python_only"] = True
        return value

    def _current_number(self, access: tuple) -> float:
        if access[0] == "arg":
            return self._dynamic_values[access[1]]
        return float(self.options.holders[access])

    def _tensor_of(self, target: str) -> Any:
        t = self.tracer.plain_tensor_attrs.get(target)
        if t is None:
            t = self.tracer._registered_tensors.get(target)
        return t

    def _evaluate(self, node: fx.Node) -> Any:
        if node in self._real:
            return self._real[node]
        args = fx.node.map_arg(node.args, self._evaluate)
        kwargs = fx.node.map_arg(node.kwargs, self._evaluate)
        with torch.no_grad():
            if node.op == "get_attr":
                value = self._tensor_of(node.target)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                raise ValueError(node.op)
        self._real[node] = value
        return value

    # -- the end of the trace ----------------------------------------------------------------
    def finish(self, graph: fx.Graph) -> None:
        """Globals and closure variables read by traced code; baked numbers in the graph."""
        self._constants_at: dict[tuple[str, int], set] = {}
        for node in graph.nodes:
            source = node.meta.get("source")
            if source is not None and node.op in ("call_function", "call_method"):
                self._constants_at.setdefault(source[:2], set()).update(
                    v for v in pytree.tree_leaves((node.args, node.kwargs))
                    if type(v) in (int, float))
        for code, (namespace, free) in self._codes.items():
            self._scan_code(code, namespace, free)
        self._find_baked_constants(graph)
        self._guard_identities(graph)

    def _guard_identities(self, graph: fx.Graph) -> None:
        """The graph reads these objects: a parameter, buffer or tensor attribute replaced
        on the model (``model.alpha = nn.Parameter(...)``, ``model.ops[1] = Zero()``) must
        re-trace.  In-place updates (optimizers, ``load_state_dict``) keep the objects."""
        root = self.tracer.root
        for node in graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            *parents, leaf = str(node.target).split(".")
            owner, path = root, ""
            for atom in parents:
                child = owner._modules.get(atom) if isinstance(owner, nn.Module) else None
                if child is None:
                    break
                self._add(("ident", path, atom, "_modules"), child)
                owner, path = child, f"{path}.{atom}" if path else atom
            else:
                for where in ("_modules", "_parameters", "_buffers", "__dict__"):
                    table = owner.__dict__ if where == "__dict__" else getattr(owner, where)
                    value = table.get(leaf, _MISSING)
                    if value is not _MISSING and (where == "_modules" or
                                                  isinstance(value, torch.Tensor)):
                        self._add(("ident", path, leaf, where), value)
                        break

    def _scan_code(self, code: types.CodeType, namespace: dict, free: dict) -> None:
        module_name = namespace.get("__name__")
        instructions = list(dis.get_instructions(code))
        for k, ins in enumerate(instructions):
            line = ins.positions.lineno if ins.positions else None
            where = f"{code.co_filename}:{line}: " \
                    f"`{linecache.getline(code.co_filename, line or 0).strip()}`"
            if ins.opname == "LOAD_GLOBAL" and module_name in sys.modules:
                name = ins.argval
                if name not in namespace:
                    continue  # a builtin
                chain = (name,)
                value = namespace[name]
                j = k + 1
                while not _guardable(value) and j < len(instructions) and \
                        instructions[j].opname == "LOAD_ATTR" and \
                        (_plain_object(value) or _user_class(value)):
                    chain += (instructions[j].argval,)
                    value = getattr(value, instructions[j].argval, _MISSING)
                    j += 1
                if value is not _MISSING and _guardable(value):
                    access = ("global", module_name, chain)
                    self._add(access, value, where,  # a class is never replaced by a view
                              dynamic=access in self.options.dynamic and
                              not isinstance(namespace[name], type))
            elif ins.opname in ("LOAD_DEREF", "LOAD_CLASSDEREF") and ins.argval in free \
                    and not code.co_name.startswith("<"):  # not a comprehension's loop var
                value = free[ins.argval]
                if type(value) in (int, float) and \
                        value in self._constants_at.get((code.co_filename, line), ()):
                    self.baked.append(BakedValue(f"closure variable `{ins.argval}`",
                                                 repr(value), where))

    def _find_baked_constants(self, graph: fx.Graph) -> None:
        """Numbers in the graph that are neither literals of their line nor guarded values."""
        known = set()
        for g in self.guards.values():
            for v in pytree.tree_leaves(g.expected):
                if type(v) in (int, float) or _numpy_number(v):
                    known.add(v)
        for b in self.baked:
            known.add(_maybe_number(b.value))
        for node in graph.nodes:
            source = node.meta.get("source")
            if source is None or node.op not in ("call_function", "call_method") or \
                    source[2].startswith("<") or self._entry_code is not None and \
                    (source[0], source[2]) == (self._entry_code.co_filename,
                                               self._entry_code.co_name):
                continue
            consts = _code_constants(source)
            if consts is None:
                continue
            defaults = _defaults(node.target) if node.op == "call_function" else {}
            kwargs = {k: v for k, v in node.kwargs.items()  # F.gumbel_softmax's eps=1e-10
                      if not (k in defaults and _same(v, defaults[k]))}
            for v in pytree.tree_leaves((node.args, kwargs)):
                if type(v) is not float or v in known or v in consts:
                    continue
                fname, line, func = source
                self.baked.append(BakedValue(
                    f"a number in `{node.name}`", repr(v),
                    f"{fname}:{line}: `{linecache.getline(fname, line).strip()}`"))
                known.add(v)


_DEFAULTS: dict[Any, dict[str, Any]] = {}


def _defaults(fn: Any) -> dict[str, Any]:
    """The default arguments of a library function: a traced call passes them all as
    keywords (``__torch_function__`` does for ``F.gumbel_softmax``), none is the user's."""
    try:
        return _DEFAULTS[fn]
    except KeyError:
        pass
    except TypeError:  # unhashable
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
        found = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):  # builtins without a signature
        found = {}
    _DEFAULTS[fn] = found
    return found


@dataclasses.dataclass(frozen=True)
class _Ref:
    """An earlier step's result in a condition program."""

    index: int


@dataclasses.dataclass(frozen=True)
class _In:
    """A number read at run time, in a condition program."""

    access: tuple


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def run_condition(steps: tuple, inputs: dict[tuple, Any]) -> Any:
    """Replay the Python arithmetic of a condition (``drop_prob > 0.``) on numbers."""
    env: list[Any] = []

    def resolve(v: Any) -> Any:
        if type(v) is _Ref:
            return env[v.index]
        if type(v) is _In:
            return inputs[v.access]
        if type(v) is tuple:
            return tuple(resolve(x) for x in v)
        return v

    for op, target, args, kwargs in steps:
        args = resolve(args)
        kwargs = {k: resolve(v) for k, v in kwargs}
        env.append(target(*args, **kwargs) if op == "call_function"
                   else getattr(args[0], target)(*args[1:], **kwargs))
    result = env[-1]
    return result.item() if isinstance(result, torch.Tensor) else result


def _maybe_number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


_CODE_CONSTANTS: dict[tuple[str, int], frozenset | None] = {}


def _code_constants(source: tuple[str, int, str]) -> frozenset | None:
    """Numeric literals written on a source line (None when the line cannot be parsed)."""
    fname, line, _ = source
    key = (fname, line)
    if key not in _CODE_CONSTANTS:
        import ast
        text = linecache.getline(fname, line).strip()
        found: set = set()
        try:
            tree = ast.parse(text.rstrip(":") + (" pass" if text.endswith(":") else ""))
        except SyntaxError:
            try:
                tree = ast.parse(text.rstrip(":"))
            except SyntaxError:
                _CODE_CONSTANTS[key] = None
                return None
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and type(n.value) in (int, float):
                found.add(n.value)
                found.add(-n.value)
        _CODE_CONSTANTS[key] = frozenset(found)
    return _CODE_CONSTANTS[key]


def _plain_object(value: Any) -> bool:
    """An instance of a user class (a scheduler, a config object), not a module or a type."""
    return not isinstance(value, (types.ModuleType, type, types.FunctionType,
                                  types.BuiltinFunctionType, nn.Module, torch.Tensor)) \
        and hasattr(value, "__dict__")


def _user_class(value: Any) -> bool:
    """A class of the user's (``MixedEdge``), whose attributes (``MixedEdge.MODE``, a
    class-level switch) a forward may read through the global name."""
    return isinstance(value, type) and \
        not (value.__module__ or "").split(".")[0] in ("torch", "builtins", "numpy", "typing")


def _class_attribute_access(cls: type, name: str) -> tuple | None:
    """``self.MODE`` found on a user's class (not torch's ``_compiled_call_impl``): the
    ``("global", module, (Class, name))`` access reading it through the first class of
    ``cls``'s MRO that is a global of its module (``getattr`` then finds it wherever a loop
    sets it: on the subclass or the base)."""
    owner = next((k for k in cls.__mro__ if name in k.__dict__), None)
    if owner is None or not _user_class(owner):
        return None
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and module.__dict__.get(klass.__qualname__) is klass:
            return ("global", klass.__module__, (klass.__qualname__, name))
        if klass is owner:
            return None
    return None


def _read_chain(namespace: dict, chain: tuple[str, ...]) -> Any:
    value = namespace.get(chain[0], _MISSING)
    for name in chain[1:]:
        if value is _MISSING:
            return _MISSING
        value = getattr(value, name, _MISSING)
    return value


class _AttributeView:
    """Stands in for a global object while tracing: ``view.rate`` is a graph value."""

    def __init__(self, obj: Any, chain: tuple[str, ...], proxy: Any):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_proxy", proxy)

    def __getattr__(self, name: str) -> Any:
        chain = object.__getattribute__(self, "_chain")
        obj = object.__getattribute__(self, "_obj")
        if name != chain[0]:
            return getattr(obj, name)
        if len(chain) == 1:
            return object.__getattribute__(self, "_proxy")
        return _AttributeView(getattr(obj, name), chain[1:],
                              object.__getattribute__(self, "_proxy"))


def _dims_read(node: fx.Node) -> tuple[int, ...] | None:
    """Which dims a shape read takes: ``()`` for the whole shape, None if not a shape read."""
    name = getattr(node.target, "__name__", node.target)
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return () if dim is None else (dim,) if isinstance(dim, int) else ()
    if node.op == "call_function" and name == "getattr" and node.args[1] in ("shape",):
        return ()
    if node.op == "call_function" and name == "getitem" and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if src.op == "call_function" and getattr(src.target, "__name__", "") == "getattr" \
                and src.args[1] == "shape" or src.op == "call_method" and src.target == "size" \
                and len(src.args) == 1:
            index = node.args[1]
            if isinstance(index, int):
                return (index,)
            return ()
    if node.op == "call_function" and name == "len":
        return (0,)
    return None


def _placeholders_above(node: fx.Node) -> list[fx.Node]:
    return [n for n in _ancestors(node) if n.op == "placeholder"]


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen)


def _tensor_access(root: nn.Module, tensor: torch.Tensor, target: str) -> tuple | None:
    """Where ``tensor`` lives in the model: ("tensor", module path, attribute, keys)."""
    for path, module in root.named_modules(remove_duplicate=False):
        for name, b in module._buffers.items():
            if b is tensor:
                return ("tensor", path, name, ())
        for name, value in module.__dict__.items():
            if value is tensor:
                return ("tensor", path, name, ())
            if isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if v is tensor:
                        return ("tensor", path, name, (i,))
            if isinstance(value, dict):
                for k, v in value.items():
                    if v is tensor:
                        return ("tensor", path, name, (k,))
    return None


def _user_frame() -> types.FrameType | None:
    from .tracer import _user_frame as find
    return find(sys._getframe(1))


# --------------------------------------------------------------------------------------
# Checking guards on every call
# --------------------------------------------------------------------------------------

class _TensorWatch:
    """Holds while a mask/flag tensor keeps its traced value (cheap when untouched)."""

    __slots__ = ("owner", "name", "keys", "expected", "seen", "version")

    def __init__(self, owner: nn.Module, name: str, keys: tuple, expected: torch.Tensor):
        self.owner, self.name, self.keys, self.expected = owner, name, keys, expected
        self.seen: Any = None
        self.version = -1

    def read(self) -> Any:
        value = getattr(self.owner, self.name, _MISSING)
        for k in self.keys:
            try:
                value = value[k]
            except Exception:  # noqa: BLE001
                return _MISSING
        return value

    def holds(self) -> bool:
        value = self.read()
        if value is self.seen and value._version == self.version:
            return True
        if not isinstance(value, torch.Tensor) or value.shape != self.expected.shape or \
                value.dtype != self.expected.dtype or \
                not torch.equal(value.detach().cpu(), self.expected):
            return False
        self.seen, self.version = value, value._version
        return True


class _DynamicSlot:
    """Copies a dynamic number from the model into its 0-d tensor before each call.

    The tensor is shared by every variant reading that number (and filled by a re-trace), so
    its version says whether this slot was the last to write it.  Each call's graph copies
    the tensor before using it (:func:`read_holders_once`), so filling it in place never
    reaches a graph still waiting for its backward."""

    __slots__ = ("read", "holder", "last", "version")

    def __init__(self, read: Callable[[], Any], holder: torch.Tensor):
        self.read, self.holder, self.last, self.version = read, holder, _MISSING, -1

    def refresh(self) -> None:
        value = self.read()
        if value != self.last or type(value) is not type(self.last) or \
                self.holder._version != self.version:  # why: another variant wrote it
            self.holder.fill_(float(value))
            self.last, self.version = value, self.holder._version


class GuardSet:
    """The guards of one variant, bound to one model: ``check(args)`` is one generated
    Python expression (no loop, no per-guard call except for mask tensors)."""

    def __init__(self, guards: Sequence[Guard], model: nn.Module,
                 holders: dict[tuple, torch.Tensor]):
        self.guards = tuple(guards)
        namespace: dict[str, Any] = {"_M": _MISSING, "_leaves": pytree.tree_leaves}
        terms: list[str] = []
        self.slots: list[_DynamicSlot] = []
        self._readers: list[Callable[[tuple], Any]] = []
        modules = dict(model.named_modules(remove_duplicate=False))
        tables: dict[int, tuple[dict, dict]] = {}  # submodule tables checked in one term
        for k, g in enumerate(self.guards):
            expr, read = _reader(g.access, modules, namespace, k, g.expected)
            self._readers.append(read)
            if g.access[0] == "tensor":
                terms.append(expr)
                continue
            if g.access[0] == "ident":
                if g.access[3] == "_modules" and type(g.expected).__eq__ is object.__eq__:
                    table = modules[g.access[1]]._modules
                    tables.setdefault(id(table), (table, {}))[1][g.access[2]] = g.expected
                    continue
                namespace[f"e{k}"] = g.expected
                terms.append(f"{expr} is e{k}")
                continue
            if g.dynamic:
                terms.append(f"(type(v{k} := {expr}) in (float, int) or _np_number(v{k}))")
                namespace["_np_number"] = _numpy_number
                holder = holders.get(g.access)
                if holder is not None and g.access[0] != "arg":
                    self.slots.append(_DynamicSlot(_closure(read), holder))
                continue
            namespace[f"e{k}"] = g.expected
            if type(g.expected) in (int, float, bool, str, type(None)):
                namespace[f"t{k}"] = type(g.expected)
                terms.append(f"(type(v{k} := {expr}) is t{k} and v{k} == e{k})")
            else:
                terms.append(f"_same({expr}, e{k})")
                namespace["_same"] = _same
        if tables:
            # the submodules on the graph's paths, all in one C-level comparison: modules
            # compare by identity; a key the trace did not read may differ too (a harmless
            # re-trace), a key it read and is gone makes the lengths differ
            expected: list[Any] = []
            for table, seen in tables.values():
                expected.extend(seen.get(key, value) for key, value in table.items())
                expected.extend(_MISSING for key in seen if key not in table)
            # dict views are live: they show the tables' contents at each call
            namespace.update(_V=tuple(t.values() for t, _ in tables.values()), _E=expected,
                             _chain=itertools.chain.from_iterable)
            terms.insert(0, "[*_chain(_V)] == _E")
        body = " and ".join(terms) or "True"
        source = f"def check(a):\n    return {body}\n"
        exec(compile(source, "<topo_compiler guards>", "exec"), namespace)  # noqa: S102
        self.check: Callable[[tuple], bool] = namespace["check"]
        self.source = source

    def first_failure(self, args: tuple) -> tuple[Guard, Any] | None:
        """The first guard that does not hold, and the value found there."""
        return next(self.failures(args), None)

    def failures(self, args: tuple) -> Iterable[tuple[Guard, Any]]:
        """Every guard that does not hold, in order, with the value found there (one guard
        at a time: the slow path of a re-trace, not the per-call check)."""
        for g, read in zip(self.guards, self._readers):
            try:
                value = read(args)
            except Exception:  # noqa: BLE001
                value = _MISSING
            if g.access[0] == "tensor":
                if not value.holds():
                    yield g, value.read()
                continue
            if g.access[0] == "ident":
                if value is not g.expected:
                    yield g, value
                continue
            ok = _is_number(value) if g.dynamic else _same(value, g.expected)
            if not ok:
                yield g, value

    def refresh(self) -> None:
        for slot in self.slots:
            slot.refresh()


def read_holders_once(module: fx.GraphModule, holders: Iterable[torch.Tensor]) -> int:
    """Make ``module``'s graph read each run-time number through a copy of its 0-d tensor,
    taken when the call reads it; returns how many reads were rewritten.

        before:  mul = aux * self._dynamic_beta                   (autograd saves the holder)
        after:   _dynamic_beta_now = self._dynamic_beta.clone()
                 mul = aux * _dynamic_beta_now                     (saves this call's copy)

    why: the holder is refilled in place before each call; a graph that saved it for its
    backward (``aux(x) * beta``) would see the next call's value, and autograd refuses
    ('modified by an inplace operation') when two forwards with different values run before
    one backward (eager bakes each call's float).  The holder itself stays what the graph
    reads, so a CUDA-graph runner still keys its captures on its value.
    """
    wanted = {id(h) for h in holders}
    graph = module.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "get_attr" or not node.users:
            continue
        value: Any = module
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
        if id(value) not in wanted or any(u.op == "call_method" and u.target == "clone" and
                                          u.name.endswith("_now") for u in node.users):
            continue
        with graph.inserting_after(node):
            now = graph.create_node("call_method", "clone", (node,), name=f"{node.name}_now")
        now.meta.update(node.meta)
        node.replace_all_uses_with(now, delete_user_cb=lambda user: user is not now)
        rewritten += 1
    if rewritten:
        module.recompile()
    return rewritten


def _closure(read: Callable[[tuple], Any]) -> Callable[[], Any]:
    return lambda: read(())


def _ask(module: nn.Module, name: str) -> Any:
    """A ``("call", path, name)`` guard's value: the method's answer now."""
    try:
        return getattr(module, name)()
    except Exception:  # noqa: BLE001 - a failing question is a changed answer
        return _MISSING


def _reader(access: tuple, modules: dict[str, nn.Module], ns: dict, k: int,
            expected: Any = None) -> tuple[str, Callable[[tuple], Any]]:
    """A Python expression reading ``access`` (objects it needs go into ``ns``) and the same
    read as a function of the call's arguments."""
    kind = access[0]
    if kind == "arg":
        i = access[1]
        return f"a[{i}]", lambda a: a[i]
    if kind == "shape":
        _, i, leaf, dim = access
        if leaf is None:
            return f"a[{i}].shape[{dim}]", lambda a: a[i].shape[dim]
        return f"_leaves(a[{i}])[{leaf}].shape[{dim}]", \
            lambda a: pytree.tree_leaves(a[i])[leaf].shape[dim]
    if kind == "attr":
        _, path, name = access
        d = modules[path].__dict__
        ns[f"d{k}"] = d
        return f"d{k}.get({name!r}, _M)", lambda a: d.get(name, _MISSING)
    if kind == "global":
        _, module_name, chain = access
        namespace = sys.modules[module_name].__dict__
        ns[f"g{k}"] = namespace
        expr = f"g{k}.get({chain[0]!r}, _M)"
        for name in chain[1:]:
            expr = f"getattr({expr}, {name!r}, _M)"
        return expr, lambda a: _read_chain(namespace, chain)
    if kind == "call":
        _, path, name = access
        module = modules[path]
        ns[f"m{k}"] = module
        ns["_ask"] = _ask
        return f"_ask(m{k}, {name!r})", lambda a: _ask(module, name)
    if kind == "ident":
        _, path, name, where = access
        table = modules[path].__dict__ if where == "__dict__" else \
            getattr(modules[path], where)
        ns[f"o{k}"] = table
        return f"o{k}.get({name!r}, _M)", lambda a: table.get(name, _MISSING)
    if kind == "cond":
        _, _, steps, inputs = access
        readers = [_reader(i, modules, {}, 0)[1] for i in inputs]
        memo: list[Any] = [None, None]

        def condition(a: tuple) -> Any:
            values = tuple(r(a) for r in readers)
            if values != memo[0]:
                memo[0], memo[1] = values, run_condition(steps, dict(zip(inputs, values)))
            return memo[1]

        ns[f"c{k}"] = condition
        return f"c{k}(a)", condition
    _, path, name, keys = access
    watch = _TensorWatch(modules[path], name, keys, expected)
    ns[f"w{k}"] = watch
    return f"w{k}.holds()", lambda a: watch


# --------------------------------------------------------------------------------------
# Variants and re-tracing
# --------------------------------------------------------------------------------------

_OPTIONS: list[TraceOptions] = []
"""Options for the trace a re-trace is running (read by ``trace_supernet``)."""


def pending_options() -> TraceOptions | None:
    """The options of a re-trace in progress, or None for a user's own compile."""
    return _OPTIONS[-1] if _OPTIONS else None


@contextlib.contextmanager
def trace_options(options: TraceOptions):
    """Run ``compile_supernet`` calls inside with these trace options."""
    _OPTIONS.append(options)
    try:
        yield options
    finally:
        _OPTIONS.pop()


@dataclasses.dataclass
class Variant:
    """One traced graph and the guards under which it is the model's function."""

    module: nn.Module
    guards: GuardSet
    reason: str

    def run(self, args: tuple) -> Any:
        """The variant's generated code (through its CUDA-graph runner when one is
        installed).  why: not ``module(*args)``: the first variant is the compiled module
        itself, whose ``forward`` is this dispatch and whose hooks already ran."""
        return self.module.graph_forward(*args)


class ForwardSignature:
    """Binds a call's positional and keyword arguments to the model's forward parameters."""

    def __init__(self, model: nn.Module):
        self.signature = inspect.signature(type(model).forward)
        params = list(self.signature.parameters.values())[1:]
        self.names = [p.name for p in params]
        self.n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                for p in params)
        self.defaults = tuple(p.default for p in params)
        self._bindable = inspect.Signature(params)

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        n = len(self.names)
        if not kwargs:
            if len(args) == n:
                return args
            if len(args) < n and all(d is not inspect.Parameter.empty
                                     for d in self.defaults[len(args):]):
                return tuple(args) + self.defaults[len(args):]
        bound = self._bindable.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[name] for name in self.names)


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """What ``compile_supernet`` was asked for: a re-trace or a reload compiles the same way."""

    passes: Any = None
    exact: bool = False
    leaf_modules: tuple = ()
    pass_options: Any = None
    cache_size_limit: int = DEFAULT_CACHE_SIZE_LIMIT
    partial: bool = True
    """A re-trace that cannot trace the forward falls back to partial compile."""

    def kwargs(self) -> dict[str, Any]:
        return dict(passes=self.passes, exact=self.exact, leaf_modules=self.leaf_modules,
                    pass_options=self.pass_options)


class Dispatch:
    """Runs the variant whose guards hold; re-traces (bounded) when none does."""

    def __init__(self, primary: nn.Module, model: nn.Module, settings: CompileSettings,
                 guards: Sequence[Guard], holders: dict[tuple, torch.Tensor] | None = None,
                 dynamic: Iterable[tuple] = (), report: Any = None):
        self.model = model
        self.report = report
        self.settings = settings
        self.signature = ForwardSignature(model)
        self.holders: dict[tuple, torch.Tensor] = dict(holders or {})
        self.dynamic: set[tuple] = set(dynamic)
        self.static_only: set[tuple] = set()
        self.history: list[tuple[Guard, Any, Any]] = []
        if self.holders:  # a compile that reads run-time numbers (a reload, a re-trace's)
            read_holders_once(primary, self.holders.values())
        self.variants: list[Variant] = [
            Variant(primary, GuardSet(guards, model, self.holders), "first trace")]
        self.retraces = 0
        self.fallback: Variant | None = None
        """The partial compile a re-trace fell back to: runs when no variant's guards hold."""

    # -- calls ---------------------------------------------------------------------------
    def __call__(self, args: tuple, kwargs: dict) -> Any:
        a = self.signature.bind(args, kwargs)
        v = self._variant_for(a)
        if v.guards.slots:
            v.guards.refresh()
        return v.run(a)

    def select(self, args: tuple, kwargs: dict | None = None) -> Variant:
        """The variant a call with these arguments runs (re-tracing if needed)."""
        return self._variant_for(self.signature.bind(args, kwargs or {}))

    def _variant_for(self, a: tuple) -> Variant:
        """The first variant whose guards hold, else the partial fallback, else a re-trace."""
        for v in self.variants:
            if v.guards.check(a):
                return v
        if self.fallback is not None:
            return self.fallback
        return self._retrace(a)

    # -- re-tracing -----------------------------------------------------------------------
    def _retrace(self, a: tuple) -> Variant:
        from .tracer import TraceError

        names = self.signature.names
        # why every failing guard, not the first: a float set on many modules at once (a
        # decaying beta on every mixed op, a tau on every cell) becomes a run-time input in
        # one re-trace, as dynamo's automatic dynamic marks every changed source
        failures = [list(v.guards.failures(a)) for v in self.variants]
        named = next((f for f in failures if f), [])
        guard, found = named[0] if named else (None, None)
        newly_dynamic = list(dict.fromkeys(
            g.access for g, value in itertools.chain.from_iterable(failures)
            if not g.dynamic and _is_float(g.expected) and _is_number(value)
            and g.access[0] in ("attr", "arg", "global")
            and g.access not in self.static_only and g.access not in self.dynamic))
        self.dynamic.update(newly_dynamic)
        sources = {g.access: g.source for g, _ in itertools.chain.from_iterable(failures)
                   if g.access in newly_dynamic}
        if guard is not None:
            self.history.append((guard, guard.expected, found))
        if len(self.variants) >= self.settings.cache_size_limit:
            raise RecompileLimitError(self._limit_message(guard, found, len(named) - 1))
        reason = "re-trace" if guard is None else \
            f"{guard.label(names)}{_and_more(len(named) - 1)} changed from " \
            f"{_short(guard.expected)} to {_short(found)}"
        if newly_dynamic:
            reason += " (now read at run time: " + describe_access(newly_dynamic[0], names) + \
                _and_more(len(newly_dynamic) - 1) + ")"
        while True:
            options = TraceOptions(frozenset(self.dynamic), self.holders)
            try:
                module = self._compile(a, options)
                break
            except TraceError as error:  # this state's forward cannot be traced
                return self._fall_back(a, error, reason)
            except NotDynamic as exc:  # Python needs its value: a constant after all
                # why: the same line of code reads it on every module promoted with it (one
                # trace per module otherwise); a wrong guess only costs a later re-trace
                line = sources.get(exc.access)
                static = {exc.access} | {d for d in newly_dynamic
                                         if line is not None and sources[d] == line}
                self.dynamic -= static
                self.static_only |= static
                reason += f" ({describe_access(exc.access, names)}" \
                          f"{_and_more(len(static) - 1)} decides Python control " \
                          f"flow or is needed as a number, so it stays a constant)"
        self.holders.update(options.holders)
        read_holders_once(module, self.holders.values())
        graphs = self.variants[-1].module.__dict__.get("cuda_graphs")  # the first trace's
        if graphs is not None:  # why: every variant replays captured graphs, not only the first
            graphs.adopt(module, variant=len(self.variants) + 1)
        variant = Variant(module, GuardSet(module.__dict__.pop("_trace_guards"), self.model,
                                           self.holders), reason)
        self.variants.insert(0, variant)
        self.retraces += 1
        if self.report is not None:
            self.report.variants.append(f"variant {len(self.variants)}: {reason}")
        return variant

    def _fall_back(self, a: tuple, error: Exception, reason: str) -> Variant:
        """The partial compile of the model as it is now (what a first compile would have
        returned), kept as the variant for every call no traced variant's guards admit.
        why: hours into a search, a re-trace's TraceError from ``compiled(x)`` is the worst
        outcome, while the partial module computes what the model computes."""
        from .partial import fall_back_partially

        module = fall_back_partially(self.model, a, self.signature.n_positional, error,
                                     reason, self.settings)
        self.fallback = Variant(module, GuardSet((), self.model, {}),
                                f"{reason}; the forward cannot be traced now, so it runs "
                                f"partially compiled")
        if self.report is not None:
            self.report.variants.append(f"fallback: {self.fallback.reason} "
                                        f"({module.report.root_error})")
        return self.fallback

    def _compile(self, a: tuple, options: TraceOptions) -> nn.Module:
        from .api import compile_supernet

        n = self.signature.n_positional
        with trace_options(options), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compile_supernet(
                self.model, tuple(a[:n]), example_kwargs=dict(zip(self.signature.names[n:], a[n:])),
                cache_size_limit=self.settings.cache_size_limit, **self.settings.kwargs())

    def _limit_message(self, guard: Guard | None, found: Any, others: int = 0) -> str:
        names = self.signature.names
        what = "the model's state" if guard is None else guard.label(names) + _and_more(others)
        seen = [f"{_short(old)} -> {_short(new)}" for g, old, new in self.history
                if guard is not None and g.access == guard.access]
        where = f"\n  read at {guard.source}" if guard is not None and guard.source else ""
        if guard is not None and _is_float(guard.expected):
            way_out = ("keep Python from needing the number itself (arithmetic on it stays "
                       "in the graph and is read at run time), or hold it in a tensor")
        elif guard is not None and guard.access[0] in ("shape", "tensor"):
            way_out = "keep the shapes (or the mask) fixed while searching"
        else:
            way_out = ("a value that picks a path (a sampled architecture, an index, a mode) "
                       "makes one graph per value: mark the module that reads it as a leaf "
                       "(leaf_modules=[...]) so it runs eagerly, or weight the candidates "
                       "with a tensor instead of picking one")
        return (
            f"the compiled supernet was traced {len(self.variants)} times "
            f"(cache_size_limit={self.settings.cache_size_limit}); {what} keeps changing "
            f"(last: {_short(guard.expected) if guard else '?'} -> {_short(found)}"
            f"{'; seen ' + ', '.join(seen[-4:]) if len(seen) > 1 else ''}){where}\n"
            f"  way out: {way_out}, or raise compile_supernet(..., cache_size_limit=N)")

    # -- reporting ----------------------------------------------------------------------
    def describe(self) -> list[str]:
        names = self.signature.names
        return [f"variant {len(self.variants) - i}: {v.reason}" for i, v in
                enumerate(self.variants)][::-1] + \
            ([f"fallback: {self.fallback.reason}"] if self.fallback is not None else []) + \
            [f"read at run time: {describe_access(d, names)}" for d in sorted(self.dynamic)]

    def train(self, mode: bool) -> None:
        for v in self.variants:
            nn.Module.train(v.module, mode)
        if self.fallback is not None:
            self.fallback.module.train(mode)

    def rebind(self, model: nn.Module, primary: nn.Module, memo: dict) -> "Dispatch":
        """A copy for a deep-copied model (variants and holders copied through ``memo``)."""
        new = object.__new__(Dispatch)
        new.model = model
        new.report = copy.deepcopy(self.report, memo)
        new.settings = self.settings
        new.signature = ForwardSignature(model)
        new.holders = {k: copy.deepcopy(v, memo) for k, v in self.holders.items()}
        new.dynamic = set(self.dynamic)
        new.static_only = set(self.static_only)
        new.history = list(self.history)
        new.retraces = self.retraces
        new.fallback = None  # why: the copy falls back again on its own model if it must
        new.variants = []
        for v in self.variants:
            module = primary if v.module is self.variants[-1].module else \
                copy.deepcopy(v.module, memo)
            guards = [dataclasses.replace(g, expected=memo.get(id(g.expected), g.expected))
                      if g.access[0] == "ident" else g for g in v.guards.guards]
            new.variants.append(Variant(module, GuardSet(guards, model, new.holders),
                                        v.reason))
        return new


def _and_more(n: int) -> str:
    return f" (and {n} more)" if n > 0 else ""


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if value is _MISSING:
        return "<missing>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
