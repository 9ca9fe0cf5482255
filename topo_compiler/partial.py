"""Partial compile: graph breaks at module granularity.

When a supernet's forward cannot be traced (a Gumbel redraw loop ``while True: ... if
inf.any(): continue``, ``.item()`` of an argmax used as an index, Python-level sampling),
its submodules often can: the cells or candidate ops take the sampled weights as tensors.
:func:`compile_partially` runs the untraceable forwards eagerly and the traceable submodules
compiled (GDAS, ``tests/supernets/gdas_autodl.py``)::

    <root>                 eager     gdas_autodl.py:139 `if (torch.isinf(gumbels).any()) ...`
      cells.0              eager     called through forward_gdas, not __call__: its ops below
        cells.0.edges.1<-0.2  traced  ReLUConvBN: nothing to simplify, runs its own forward
      stem                 traced    ...

A submodule that traces is ``compiled`` when the passes change its graph (a DARTS cell taking
the sampled weights as an argument) and ``traced`` when they change nothing (a single
candidate op): it then runs its own forward, which costs no dispatch.

The returned module is a tree of views of the model's modules (subclasses of their classes
with the same names): every attribute -- Python state such as ``active_index`` or ``arch``,
parameters, buffers, hooks, ``training`` -- is read from and written to the model's module,
so state the search loop sets on the model after compiling is followed; only the children
(views in turn) and each submodule's ``forward``, which dispatches to its compiled graph, are
the view's own.  Untraceable modules run their own forward and their children dispatch in
turn.  The compiled submodules are compiled from the model's own modules, so their guards
read the same state.  A deep copy is a view of a deep copy of the model; a view cannot be
pickled (save the model and compile it again).

A compiled supernet whose re-trace meets an untraceable forward (the loop switched the model
into a mode the tracer cannot follow) falls back the same way: :func:`fall_back_partially`.

Granularity: a compiled graph is keyed by its input signature (shapes after the batch,
dtypes, non-tensor argument values).  A module that sees more than ``max_variants``
signatures (one per argmax, say) stops being compiled and stays eager, so the cache never
thrashes; its children, whose keys are few, are compiled instead.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .report import ModuleCounts
from .tracer import TraceError, _is_standard_leaf

__all__ = ["PartialReport", "ModuleOutcome", "compile_partially", "PartialCompileWarning"]


class PartialCompileWarning(UserWarning):
    """The forward could not be traced; parts of the model run eagerly."""


COMPILED, TRACED, EAGER, UNREACHED = "compiled", "traced", "eager", "unreached"


@dataclasses.dataclass
class ModuleOutcome:
    """What happened to one submodule: ``compiled`` (runs its compiled graph), ``traced``
    (traces, but the passes change nothing, so it runs its own forward and saves the
    dispatch), ``eager`` (cannot be traced) or ``unreached`` (not called through
    ``__call__`` so far)."""

    path: str
    module_type: str
    state: str
    reason: str
    """Why it stayed eager (the construct and its source line), or what was compiled."""
    variants: int = 0
    mixed_ops: int = 0
    reports: list[Any] = dataclasses.field(default_factory=list, repr=False)
    """The :class:`~topo_compiler.report.CompileReport` of each traced variant."""

    @property
    def compiled(self) -> bool:
        return self.state == COMPILED

    def __str__(self) -> str:
        extra = f", {self.variants} variant(s), {self.mixed_ops} mixed op(s)" \
            if self.state in (COMPILED, TRACED) else ""
        return f"{self.path or '<root>'} ({self.module_type}): {self.state}{extra} -- " \
               f"{self.reason}"


@dataclasses.dataclass
class PartialReport:
    """The partial compile's report: the root's refusal and each submodule's outcome."""

    model: str
    root_error: str
    outcomes: dict[str, ModuleOutcome]

    def _visible(self) -> list[ModuleOutcome]:
        """Outcomes of modules not inside a traced one (whose graph or forward runs them)."""
        whole = [p for p, o in self.outcomes.items() if o.state in (COMPILED, TRACED)]
        return [o for p, o in sorted(self.outcomes.items())
                if not any(p.startswith(c + ".") for c in whole)]

    def _paths(self, state: str) -> list[str]:
        return [o.path for o in self._visible() if o.state == state]

    @property
    def compiled(self) -> list[str]:
        """Modules running a compiled graph (compiled on first call when the example run
        did not reach them)."""
        return self._paths(COMPILED)

    @property
    def traced(self) -> list[str]:
        """Modules that trace but gain nothing from the passes: they run their own forward."""
        return self._paths(TRACED)

    @property
    def eager(self) -> list[str]:
        """Modules whose forward cannot be traced: it runs eagerly."""
        return self._paths(EAGER)

    @property
    def unreached(self) -> list[str]:
        """Modules not called through ``__call__`` so far (compiled on their first call)."""
        return self._paths(UNREACHED)

    def counts(self) -> tuple[ModuleCounts, ModuleCounts]:
        """Basic modules of the traced parts before and after the passes (first variant of
        each)."""
        firsts = [self.outcomes[p].reports[0] for p in self.compiled + self.traced]
        return (_sum_counts(r.input.counts for r in firsts),
                _sum_counts(r.final.counts for r in firsts))

    def to_markdown(self) -> str:
        before, after = self.counts()
        lines = [f"# Partial compile of {self.model}", "",
                 f"The forward of `<root>` runs eagerly: {self.root_error}", "",
                 f"{len(self.compiled)} module(s) compiled, {len(self.traced)} traced with "
                 f"nothing to simplify (they run their own forward), {len(self.eager)} eager, "
                 f"{len(self.unreached)} not reached; "
                 f"basic modules (conv/non-conv/total) of the traced parts: {before} before "
                 f"the passes, {after} after.", ""]
        lines += [f"* {o}" for o in self._visible()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


_MISSING = object()


class _Dispatch:
    """A submodule's ``forward`` in the partial model: its compiled graph for the input's
    signature, compiled on first sight, or the module's own forward when it cannot be traced
    or the passes gain nothing on it."""

    def __init__(self, path: str, module: nn.Module, shadow: nn.Module,
                 compile_fn: Callable[[nn.Module, tuple], nn.Module], max_variants: int,
                 outcome: ModuleOutcome):
        self.path = path
        self.module = module
        self.shadow = shadow
        self.eager = type(module).forward.__get__(shadow)
        self.compile_fn = compile_fn
        self.max_variants = max_variants
        self.variants: dict[Any, nn.Module | None] = {}
        self.outcome = outcome
        self.refused = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or self.refused:
            return self.eager(*args, **kwargs)
        key = _signature(args)
        compiled = self.variants.get(key, _MISSING)
        if compiled is _MISSING:
            compiled = self._compile(key, args)
        if compiled is None:
            return self.eager(*args)
        try:
            return compiled(*args)
        except TraceError as exc:  # its re-trace met an untraceable forward (before running)
            self._refuse(EAGER, f"a re-trace cannot trace it: {_short(exc)}")
            return self.eager(*args)

    def _refuse(self, state: str, reason: str) -> None:
        self.refused = True
        self.outcome.state = state
        self.outcome.reason = reason
        if state == TRACED:  # the user's own module runs, its children need no dispatch
            self.eager = self.module.forward
            self.shadow.__dict__["forward"] = self.module.forward

    def _compile(self, key: Any, args: tuple) -> nn.Module | None:
        if sum(v is not None for v in self.variants.values()) >= self.max_variants:
            self._refuse(EAGER, f"saw more than {self.max_variants} input signatures "
                                f"(non-tensor arguments or shapes change from call to call); "
                                f"kept eager so the compiled-graph cache does not thrash")
            return None
        try:
            compiled = self.compile_fn(self.module, args)
        except TraceError as exc:
            self._refuse(EAGER, _short(exc))
            return None
        report = getattr(compiled, "report", None)
        if report is not None:
            self.outcome.reports.append(report)
            self.outcome.mixed_ops = len(report.mixed_ops)
        self.outcome.variants = len(self.variants) + 1
        if not self.variants and report is not None and \
                not any(st.changed for st in report.stages[1:]):
            self._refuse(TRACED, "traced; the passes changed nothing, so it runs its own "
                                 "forward")
            return None
        self.variants[key] = compiled
        self.outcome.state = COMPILED
        self.outcome.reason = "traced and compiled"
        return compiled


_VIEW_CLASSES: dict[type, type] = {}
_VIEW_OWN = frozenset({"_modules", "_parameters", "_buffers", "forward", "_view_of", "report",
                       "source_model", "graph_forward"})


def _unview(value: Any) -> Any:
    """The model's module a view shows (what the model's own tree may hold), else ``value``."""
    if isinstance(value, nn.Module):
        source = object.__getattribute__(value, "__dict__").get("_view_of")
        if source is not None:
            return source
    return value


class _Children(dict):
    """A view's ``_modules``: the model module's children as they are now (a loop may set
    one to ``None`` and back, ProxylessNAS's ``unused_modules_off``), each non-leaf one seen
    through its view (made on first sight for a child set after compiling).  Writes go to
    the model module's ``_modules``.  why: a copy would keep the compile-time children."""

    def __init__(self, source: dict, tree: "_Tree", path: str):
        super().__init__()
        self.source = source
        self.tree = tree
        self.path = path
        self.cache: dict[str, tuple[nn.Module, nn.Module]] = {}

    def view(self, key: str, child: Any) -> Any:
        if child is None or _is_standard_leaf(child):
            return child
        hit = self.cache.get(key)
        if hit is not None and hit[0] is child:
            return hit[1]
        view = self.tree.view(child, f"{self.path}.{key}" if self.path else key)
        self.cache[key] = (child, view)
        return view

    def __getitem__(self, key):
        return self.view(key, self.source[key])

    def get(self, key, default=None):
        return self.view(key, self.source[key]) if key in self.source else default

    def __contains__(self, key):
        return key in self.source

    def __iter__(self):
        return iter(self.source)

    def __len__(self):
        return len(self.source)

    def __bool__(self):
        return bool(self.source)

    def keys(self):
        return self.source.keys()

    def values(self):
        return [self.view(k, m) for k, m in self.source.items()]

    def items(self):
        return [(k, self.view(k, m)) for k, m in self.source.items()]

    def __setitem__(self, key, value):
        self.source[key] = _unview(value)

    def __delitem__(self, key):
        del self.source[key]

    def pop(self, key, *default):
        return self.source.pop(key, *default)

    def __repr__(self):
        return f"_Children({dict(self.items())!r})"

    def __deepcopy__(self, memo):
        new = _Children(copy.deepcopy(self.source, memo), copy.deepcopy(self.tree, memo),
                        self.path)
        new.cache = copy.deepcopy(self.cache, memo)
        return new


class _Tree:
    """Makes the views of one partial compile (each module's once) and their dispatchers."""

    def __init__(self, compile_fn: Callable[[nn.Module, tuple], nn.Module], max_variants: int):
        self.compile_fn = compile_fn
        self.max_variants = max_variants
        self.outcomes: dict[str, ModuleOutcome] = {}
        self.dispatchers: dict[str, _Dispatch] = {}
        self.memo: dict[int, nn.Module] = {}

    def view(self, module: nn.Module, path: str) -> nn.Module:
        hit = self.memo.get(id(module))
        if hit is not None and object.__getattribute__(hit, "__dict__")["_view_of"] is module:
            return hit
        shadow = object.__new__(_view_class(type(module)))
        own = object.__getattribute__(shadow, "__dict__")
        own["_view_of"] = module
        for field in ("_parameters", "_buffers"):  # why: nn.Module reads them in __dict__
            own[field] = module.__dict__[field]
        self.memo[id(module)] = shadow
        children = own["_modules"] = _Children(module._modules, self, path)
        for name, child in module._modules.items():  # views (and dispatchers) up front
            children.view(name, child)
        if path and type(module).forward is not nn.Module.forward:
            outcome = ModuleOutcome(path, type(module).__name__, UNREACHED,
                                    "not called through __call__ so far (not reached, or its "
                                    "parent calls another method of it)")
            self.outcomes[path] = outcome
            dispatch = _Dispatch(path, module, shadow, self.compile_fn, self.max_variants,
                                 outcome)
            own["forward"] = dispatch
            self.dispatchers[path] = dispatch
        return shadow


def _view_class(cls: type) -> type:
    """``cls`` whose instances are views of one of the model's modules: every attribute
    but the children (views in turn), the dispatching ``forward`` and the report is the
    model module's own (read and written there).

    why: the search loop keeps setting Python state on the model's modules after compiling
    (ProxylessNAS's ``reset_binary_gates()`` rebinding ``active_index``, a sampler setting
    ``model.arch``); a copy of their ``__dict__`` would keep the compile-time values and run
    the compile-time path, silently.  The compiled submodules are compiled from the model's
    own modules, so their guards read the same state.
    """
    view = _VIEW_CLASSES.get(cls)
    if view is not None:
        return view
    data = {name for klass in cls.__mro__ for name, v in vars(klass).items()
            if hasattr(type(v), "__set__") or hasattr(type(v), "__delete__")}

    # an instance made otherwise (``self.__class__(...)``, ModuleList slicing) is a plain one
    def __getattribute__(self, name):
        own = object.__getattribute__(self, "__dict__")
        if name in own:
            return own[name]
        source = own.get("_view_of")
        if source is not None:
            source = source.__dict__
            if name in source and name not in data:
                return source[name]
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        own = object.__getattribute__(self, "__dict__")
        if "_view_of" not in own:
            cls.__setattr__(self, name, value)
        elif name in _VIEW_OWN:
            own[name] = value
        else:
            setattr(own["_view_of"], name, _unview(value))

    def __delattr__(self, name):
        own = object.__getattribute__(self, "__dict__")
        if "_view_of" not in own:
            cls.__delattr__(self, name)
        elif name in _VIEW_OWN and name in own:
            del own[name]
        else:
            delattr(own["_view_of"], name)

    def __dir__(self):
        own = object.__getattribute__(self, "__dict__")
        return sorted(set(nn.Module.__dir__(self)) | set(own["_view_of"].__dict__))

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a partially compiled {cls.__name__} is a view of the model's "
                        f"modules and cannot be pickled: save the model (model.state_dict()) "
                        f"and compile it again after loading")

    def __deepcopy__(self, memo):  # a view of a deep copy of the model's module
        own = object.__getattribute__(self, "__dict__")
        new = object.__new__(type(self))
        memo[id(self)] = new
        new_own = object.__getattribute__(new, "__dict__")
        for key, value in own.items():  # _view_of first: the registries are its own
            new_own[key] = copy.deepcopy(value, memo)
        return new

    view = type(cls.__name__, (cls,), {
        "__getattribute__": __getattribute__, "__setattr__": __setattr__,
        "__delattr__": __delattr__, "__dir__": __dir__, "__reduce_ex__": __reduce_ex__,
        "__deepcopy__": __deepcopy__,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__})
    _VIEW_CLASSES[cls] = view
    return view


def _sum_counts(counts: Any) -> ModuleCounts:
    counts = list(counts)
    return ModuleCounts(sum(c.conv for c in counts), sum(c.non_conv for c in counts))


def _signature(args: tuple) -> Any:
    def key(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape[1:]), a.dtype, a.device.type)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(key(v) for v in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, key(v)) for k, v in sorted(a.items())))
        try:
            hash(a)
            return ("V", a)
        except TypeError:
            return ("id", id(a))
    return tuple(key(a) for a in args)


def _short(exc: TraceError) -> str:
    where = f" at {exc.source}" if exc.source else ""
    return f"{exc.problem}{where}"


def _record_calls(model: nn.Module, example_inputs: tuple) -> dict[str, tuple]:
    """Run a copy of the model once, eagerly, and keep each submodule's first arguments.

    The copy keeps the user's parameters, buffers and random generators untouched.
    """
    twin = copy.deepcopy(model, _detached_memo(model))
    calls: dict[str, tuple] = {}
    handles = []
    for path, module in twin.named_modules():
        if path and not _is_standard_leaf(module):
            def hook(mod, args, kwargs, path=path):
                if path not in calls and not kwargs:
                    calls[path] = args
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            twin(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
    return calls


def _detached_memo(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo giving each tensor with autograd history that a module keeps as
    a plain attribute (ProxylessNAS's ``AP_path_wb`` after a forward) a detached copy.

    why: ``deepcopy`` refuses non-leaf tensors, and a re-trace falls back to partial compile
    in the middle of a search, when the model holds the last forward's tensors."""
    memo: dict[int, Any] = {}

    def seed(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            memo[id(value)] = value.detach().clone()
        elif isinstance(value, (list, tuple)):
            for v in value:
                seed(v)
        elif isinstance(value, dict):
            for v in value.values():
                seed(v)

    for module in model.modules():
        for name, value in module.__dict__.items():
            if not name.startswith("_"):
                seed(value)
    return memo


def compile_partially(model: nn.Module, example_inputs: tuple, root_error: TraceError,
                      compile_fn: Callable[[nn.Module, tuple], nn.Module], *,
                      max_variants: int = 8) -> nn.Module:
    """The model with its untraceable forwards eager and its traceable submodules compiled.

    ``compile_fn(module, args)`` compiles one submodule (raising :class:`TraceError` when it
    cannot be traced).  Raises ``root_error`` when no submodule the example run reaches can
    be traced (or the model does not run on ``example_inputs``).
    """
    tree = _Tree(compile_fn, max_variants)
    outcomes, dispatchers = tree.outcomes, tree.dispatchers
    root = tree.view(model, "")
    report = PartialReport(type(model).__name__, _short(root_error), outcomes)

    # compile up front what the example run reaches, top-down (a compiled module's children
    # run inside its graph and are not tried)
    try:
        calls = _record_calls(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - the model does not run on these inputs either
        raise root_error from exc
    traced: list[str] = []
    for path in sorted(calls, key=lambda p: (p.count("."), p)):
        if any(path.startswith(c + ".") for c in traced) or path not in dispatchers:
            continue
        d = dispatchers[path]
        args = calls[path]
        d._compile(_signature(args), args)
        if d.outcome.state in (COMPILED, TRACED):
            traced.append(path)
    if not traced:  # nothing the example run reaches can be traced
        raise root_error
    root.__dict__["report"] = report
    root.__dict__["source_model"] = model
    warnings.warn(f"{type(model).__name__}.forward cannot be traced ({_short(root_error)}); "
                  f"{len(report.compiled)} submodule(s) compiled, the rest runs eagerly "
                  f"(see .report)", PartialCompileWarning, stacklevel=4)
    return root


def fall_back_partially(model: nn.Module, args: tuple, n_positional: int, error: TraceError,
                        reason: str, settings: Any) -> nn.Module:
    """What a compiled supernet runs when a re-trace cannot trace the forward (the model's
    state changed into an untraceable one, ProxylessNAS's ``MODE='full_v2'``): the partial
    compile of the model as it is now, with the first compile's ``settings``.  Raises
    ``error``, with a note saying why, when the first compile asked for ``partial=False``,
    when the forward has keyword-only arguments, or when nothing it reaches can be traced."""
    from .api import _compile_partially

    def refuse(why: str) -> None:
        error.add_note(f"raised by compiled(...) while re-tracing ({reason}); {why}")
        raise error

    if not settings.partial:
        refuse("compile_supernet(..., partial=True) (the default) would run this forward "
               "eagerly and compile its submodules instead")
    if len(args) > n_positional:
        refuse("a forward with keyword-only arguments cannot fall back to partial compile")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = _compile_partially(model, tuple(args), error,
                                        cache_size_limit=settings.cache_size_limit,
                                        **settings.kwargs())
        except TraceError as again:
            cause = again.__cause__
            refuse("partial compile cannot run it either: " +
                   (f"the model does not run on these arguments ({cause!r})" if cause else
                    "no submodule the call reaches can be traced"))
    module.__dict__["graph_forward"] = module.forward
    warnings.warn(f"{type(model).__name__}: re-tracing ({reason}) met a forward that cannot "
                  f"be traced ({_short(error)}); calls no traced variant admits now run "
                  f"partially compiled ({len(module.report.compiled)} submodule(s) compiled, "
                  f"the rest eagerly; see .report.variants)", PartialCompileWarning,
                  stacklevel=_callers_level())
    return module


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside the compiler and torch (the user's
    ``compiled(x)`` line) for a warning issued by the caller of this function."""
    import os
    skip = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
