"""``lower``: the supernet IR -> a :class:`CompiledSupernet` (an fx ``GraphModule``).

The graph is regenerated in the IR's stable topological order; the module around it holds
the user's model's own modules, parameters and buffers (same objects, so ``state_dict`` keys,
optimizers and ``compiled.modules()`` are the model's), plus, on its root only, the modules
and tensors passes and the tracer added.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .ir import SupernetIR, map_refs

__all__ = ["CompiledSupernet", "lower"]


class CompiledSupernet(fx.GraphModule):
    """The compiled supernet: an fx ``GraphModule`` sharing the user's parameters.

    ``report`` is the :class:`~topo_compiler.report.CompileReport`.  Its ``forward`` checks
    the guards of its variants (see :mod:`topo_compiler.guards`) and runs the one that holds,
    re-tracing when none does; calling it goes through ``nn.Module.__call__`` (the hooks
    registered on it, then ``forward``), so ``compiled(x)``, ``compiled.forward(x)`` and hooks
    behave as on the model, whatever variant runs.  A variant runs its generated code,
    ``graph_forward``, without hooks (see :meth:`recompile`).  Methods of the model it lacks
    (``arch_parameters()``, ``genotype()``, ``loss(x, y)``...) run the model's code with
    ``self`` reading the model's attributes and calling the compiled module.
    ``copy.deepcopy`` copies the model with it; pickling stores the model, the compile
    settings and the CUDA-graph options, and compiles again on load.
    """

    def recompile(self) -> Any:
        """fx's recompile, with the generated code kept as ``graph_forward`` and ``forward``
        the guarded entry.

            fx:    type(gm).forward = <generated code>
            here:  type(gm).graph_forward = <generated code>       (what a variant runs)
                   type(gm).forward = guarded(<generated code>)    (dispatch, same signature)

        why: fx writes the generated code as the per-instance class's ``forward`` on every
        recompile (the ``graph`` setter, ``__init__``, a user's ``recompile()``), so a
        ``forward`` defined once on this class would be shadowed and ``compiled.forward(x)``
        would run the first variant's code without its guards.
        """
        code = super().recompile()
        cls = type(self)
        generated = cls.__dict__["forward"]
        cls.graph_forward = generated
        cls.forward = _guarded_entry(generated)
        return code

    def _replicate_for_data_parallel(self) -> "CompiledSupernet":
        """Refused: ``nn.DataParallel`` over several devices replicates a module per call.

        why: fx's replica is a plain ``GraphModule`` copy that runs the first variant's code
        without its guards (stale once a guarded value changes), and the graph reaches its
        nested modules through aliases that would still point at the first device's modules.
        """
        raise TypeError(
            "nn.DataParallel over several devices cannot replicate a compiled supernet: a "
            "replica would run the first traced graph without its guards. Use "
            "DistributedDataParallel (one process per device, each compiling its model), or "
            "DataParallel with one device")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_source_model")
            if source is None or name.startswith("__") or name in ("forward",):
                raise
            static = inspect.getattr_static(type(source), name, None)
            if isinstance(static, types.FunctionType):  # a method: `self(x)` runs compiled
                return types.MethodType(static, self.model_view())
            if isinstance(static, property) and static.fget is not None:
                return static.fget(self.model_view())
            if name.startswith("_"):
                raise
            value = getattr(source, name)  # raises AttributeError naming `name`
            if isinstance(value, (nn.Module, torch.Tensor)):
                raise
            return value

    def __setattr__(self, name: str, value: Any) -> None:
        """``compiled.tau = 0.1`` sets the model's plain attribute (the guards read the
        model); modules, tensors, private names and the compiled module's own attributes
        stay here."""
        source = self.__dict__.get("_source_model")
        if source is not None and not name.startswith("_") and name != "training" and \
                name not in self.__dict__ and name in source.__dict__ and \
                not isinstance(value, (nn.Module, torch.Tensor)) and \
                not isinstance(source.__dict__[name], (nn.Module, torch.Tensor)):
            setattr(source, name, value)
            return
        super().__setattr__(name, value)

    @property
    def source_model(self) -> nn.Module:
        """The model this was compiled from (shares parameters and buffers)."""
        return self.__dict__["_source_model"]

    @property
    def variants(self) -> list[Any]:
        """The traced variants, most recent first (``guards.Variant``: module, guards,
        reason)."""
        dispatch = self.__dict__.get("_dispatch")
        return list(dispatch.variants) if dispatch is not None else []

    def model_view(self) -> nn.Module:
        """The model as its methods see it when called through the compiled module: every
        attribute is the model's own (same ``__dict__``), but calling it calls the compiled
        module (hooks included) and its ``forward`` is the compiled ``forward`` (no hooks, as
        ``self.forward(x)`` on the model)."""
        view = self.__dict__.get("_view")
        if view is None:
            source = self.source_model
            compiled = self

            def call(_, *args: Any, **kwargs: Any) -> Any:
                return compiled(*args, **kwargs)

            def forward(_, *args: Any, **kwargs: Any) -> Any:  # why: no hooks, as on the model
                return compiled.forward(*args, **kwargs)

            base = type(source)
            cls = type(base.__name__, (base,), {"__call__": call, "forward": forward,
                                                "__module__": base.__module__,
                                                "__qualname__": base.__qualname__})
            view = object.__new__(cls)
            object.__setattr__(view, "__dict__", source.__dict__)
            self.__dict__["_view"] = view
        return view

    def train(self, mode: bool = True) -> "CompiledSupernet":
        """Train/eval mode for the compiled module, its variants and the model (whose flags
        the guards read)."""
        super().train(mode)
        dispatch = self.__dict__.get("_dispatch")
        if dispatch is not None:
            dispatch.train(mode)
            dispatch.model.train(mode)
        return self

    def __copy__(self) -> "CompiledSupernet":
        """A shallow copy, as ``copy.copy`` makes of any module: it shares the parameters,
        submodules, hooks, graph, guards and variants (a re-trace through one serves both:
        they run the same model).

        why: fx's ``GraphModule.__copy__`` builds a plain ``GraphModule`` running the first
        variant's code without its guards (stale once a guarded value changes)."""
        res = object.__new__(type(self))
        res.__dict__.update(self.__dict__)
        res.__dict__.pop("_view", None)  # why: the model's methods called on it call the copy
        return res

    def __deepcopy__(self, memo: dict[int, Any]) -> "CompiledSupernet":
        source = self.__dict__.get("_source_model")
        model = copy.deepcopy(source, memo)  # first: shared tensors and leaves map through memo
        res = CompiledSupernet.__new__(CompiledSupernet)
        memo[id(self)] = res
        for key, value in self.__dict__.items():
            if key not in ("_dispatch", "_view", "_graph"):
                res.__dict__[key] = copy.deepcopy(value, memo)
        type(res).__name__ = type(self).__name__
        res.graph = copy.deepcopy(self.graph)
        dispatch = self.__dict__.get("_dispatch")
        if dispatch is not None:
            res.__dict__["_dispatch"] = dispatch.rebind(model, res, memo)
            res.__dict__["report"] = res.__dict__["_dispatch"].report
        return res

    def __reduce__(self):
        """Pickle the model, the compile settings and the CUDA-graph runner's options and
        backend (whether ``compile_supernet(cuda_graphs=...)`` or ``install`` put it there);
        loading compiles again and installs a runner, whose captures start empty (fx's own
        pickling re-traces the generated code through torch.fx, which cannot follow the
        compiler's runtime functions)."""
        from .api import recompile

        dispatch = self.__dict__.get("_dispatch")
        dynamic = tuple(dispatch.dynamic) if dispatch is not None else ()
        runner = self.__dict__.get("cuda_graphs")
        graphs = (runner.options, runner.backend) if runner is not None else None
        return (recompile, (self.source_model, self.__dict__["_compile_call"], dynamic,
                            graphs))


def _guarded_entry(generated: Any) -> Any:
    """The compiled module's ``forward``: its dispatcher (guards, re-trace, the variant's
    CUDA-graph runner), or the generated code of a module without one (a variant, a bare
    lowering).  Signature and name are the generated code's (``inspect.signature`` shows the
    model's forward arguments)."""

    @functools.wraps(generated)
    def forward(self: CompiledSupernet, *args: Any, **kwargs: Any) -> Any:
        dispatch = self.__dict__.get("_dispatch")
        if dispatch is None:
            return self.graph_forward(*args, **kwargs)
        return dispatch(args, kwargs)

    return forward


def _share_model_tree(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` the root parameters, buffers and children of ``source``: the same
    objects, in fresh dicts (the model's own dicts are never written).

    ``compiled.modules()``, ``named_modules()``, ``compiled.layers[0]`` are then the model's
    own modules (same identity and class): a search loop walking the compiled module to set
    ``m.tau`` or to find ``isinstance(m, GumbelSoftmax)`` reaches the model, whose attributes
    the guards read.  ``state_dict`` keys and persistence are the model's.
    """
    target.training = source.training
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
    target._modules.update(source._modules)


def _free_alias(root: nn.Module, taken: set[str]) -> str:
    """A root attribute name the model does not use (for a target kept off the model)."""
    i = len(taken)
    while True:
        name = f"_private_target_{i}"
        if name not in taken and name not in root.__dict__ and \
                name not in root._parameters and name not in root._buffers and \
                name not in root._modules:
            taken.add(name)
            return name
        i += 1


def _off_the_model(opcode: str, target: Any, ir: SupernetIR,
                   original_targets: set[str]) -> bool:
    """Whether a nested ``call_module`` / ``get_attr`` target names something the model's
    modules do not hold: a module a pass added, or a plain tensor attribute the tracer
    proxied (a tensor in a list or dict attribute, ``cells.0.alphas_1``)."""
    if not isinstance(target, str) or "." not in target:
        return False
    if opcode == "call_module":
        return target not in original_targets
    return opcode == "get_attr" and target in ir.tensor_attrs


def _set_attr(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    """A plain tensor attribute of the compiled root (a buffer of that name stays off)."""
    gm._buffers.pop(name, None)
    gm._non_persistent_buffers_set.discard(name)
    object.__setattr__(gm, name, value)


def lower(ir: SupernetIR, class_name: str | None = None) -> CompiledSupernet:
    """Regenerate a :class:`CompiledSupernet` from the IR, in stable topological order."""
    graph = fx.Graph()
    if ir.codegen is not None:
        graph._codegen = ir.codegen
    env: dict[str, fx.Node] = {}
    aliases: dict[str, str] = {}
    original_targets = {n for n, _ in ir.root.named_modules()}
    taken: set[str] = set()
    for node in ir.nodes():
        args = map_refs(node.args, lambda r: env[r.name])
        kwargs = map_refs(node.kwargs, lambda r: env[r.name])
        target = node.target
        if node.opcode in ("call_module", "get_attr") and _unsafe_for_codegen(target):
            target = aliases.setdefault(target, f"_quoted_target_{len(aliases)}")
        elif _off_the_model(node.opcode, target, ir, original_targets):
            # why: the model's modules are the compiled module's own (_share_model_tree);
            # a plain tensor attribute or a pass's module below them would be written into
            # the model: it is reached through a root attribute of the compiled module
            if target not in aliases:
                aliases[target] = _free_alias(ir.root, taken)
            target = aliases[target]
        fx_node = graph.create_node(node.opcode, target, args, kwargs, name=node.name)
        if node.opcode != "output":
            fx_node.meta["val"] = node.val
        fx_node.meta["module_path"] = node.module_path
        env[node.name] = fx_node
    graph.lint()

    name = class_name or f"Compiled{type(ir.root).__name__}"
    gm = CompiledSupernet(nn.Module(), fx.Graph(), name)
    _share_model_tree(gm, ir.root)
    for target, module in ir.modules.items():
        if target not in original_targets and "." not in target:
            gm.add_module(target, module)
    for target, tensor in ir.tensor_attrs.items():
        if "." not in target:
            _set_attr(gm, target, tensor)
    for target, alias in aliases.items():
        # fx writes getattr(self, "<atom>") without escaping: a name with a quote or a
        # backslash (a ModuleDict key) is reached through a plain attribute instead, which
        # stays out of state_dict; the module itself still sits at its real path.  So is a
        # target below the model's modules that the model lacks (see _off_the_model).
        if target in ir.modules:
            gm.__dict__[alias] = ir.modules[target] if target not in original_targets \
                else gm.get_submodule(target)
        else:
            gm.__dict__[alias] = ir.attr(target)
    gm.__dict__["_source_model"] = ir.root
    _shorten_attribute_chains(gm, graph)
    gm.graph = graph
    return gm


def _shorten_attribute_chains(gm: nn.Module, graph: fx.Graph) -> None:
    """Reach every module the graph calls or reads from through one attribute of ``gm``.

        before:  getattr(getattr(getattr(self.cells, "0")._ops, "4").op, "1").weight
        after:   self._cells_0__ops_4_op_1.weight

    fx emits the chain for every call, one ``nn.Module.__getattr__`` per atom (some 11000 per
    call in the 8-cell DARTS supernet).  The alias is a plain attribute (``gm.__dict__``), so
    ``state_dict``, ``named_modules`` and ``.to()`` still see the module at its real path
    only; parameters and buffers are still read from their module at every call, so one
    replaced there (as ``.to()`` replaces buffers) is seen.
    """
    aliases: dict[str, str] = {}
    taken = set(gm.__dict__) | set(dir(type(gm)))
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or "." not in node.target:
            continue
        *parents, last = node.target.split(".")
        owner: Any = gm
        try:
            for atom in parents:
                owner = getattr(owner, atom)
            value = getattr(owner, last)
        except AttributeError:
            continue
        if isinstance(value, nn.Module):
            path, leaf, module = node.target, None, value
        elif isinstance(owner, nn.Module) and len(parents) > 1 and last.isidentifier():
            path, leaf, module = ".".join(parents), last, owner
        else:
            continue
        alias = aliases.get(path)
        if alias is None:
            base = "_" + re.sub(r"[^0-9A-Za-z_]", "_", path)  # why: ASCII, not NFKC
            alias, i = base, 0
            while alias in taken:
                i += 1
                alias = f"{base}_{i}"
            taken.add(alias)
            aliases[path] = alias
            gm.__dict__[alias] = module
        node.target = alias if leaf is None else f"{alias}.{leaf}"


def _unsafe_for_codegen(target: str) -> bool:
    return any('"' in atom or "\\" in atom or "\n" in atom for atom in str(target).split("."))
