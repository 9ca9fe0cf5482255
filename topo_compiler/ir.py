"""The supernet IR: a ``networkx.DiGraph`` of typed nodes.

One :class:`IRNode` per value, carrying a canonical :class:`~topo_compiler.descriptors.OpDesc`,
its ordered arguments (with :class:`~topo_compiler.descriptors.Ref` for other nodes) and its
meta value (shape and dtype on the example inputs).  Passes edit the IR only through
:class:`SupernetIR`'s methods, which keep the networkx edges, names and meta values
consistent.  :func:`~topo_compiler.lift.lift` builds it from the tracer's fx graph and
:func:`~topo_compiler.lower.lower` regenerates a GraphModule from it.

The graph is wrapped, not subclassed: ``ir.graph`` is a plain ``nx.DiGraph`` whose node key is
the node's name and whose ``"node"`` attribute is the :class:`IRNode`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import keyword
import re
from typing import Any, Callable, Iterable, Iterator

import networkx as nx
import torch
from torch import nn

from .descriptors import Kind, OpDesc, Ref, describe_call, describe_module
from .meta import UNKNOWN, run_on_meta, to_meta

__all__ = ["IRNode", "SupernetIR", "IRVerificationError", "map_refs", "Role", "Shared",
           "NodeNotes"]


class IRVerificationError(AssertionError):
    """The IR broke an invariant (names the pass and the node)."""


_LEAVES = (int, float, bool, str, type(None), torch.dtype, torch.device)


def map_refs(value: Any, fn: Callable[[Ref], Any]) -> Any:
    """Apply ``fn`` to every :class:`Ref` inside an argument structure."""
    kind = type(value)
    if kind is Ref:
        return fn(value)
    if kind in _LEAVES:
        return value
    if kind is tuple:
        return tuple([map_refs(v, fn) for v in value])
    if kind is list:
        return [map_refs(v, fn) for v in value]
    if kind is dict:
        return {k: map_refs(v, fn) for k, v in value.items()}
    if kind is slice:
        return slice(map_refs(value.start, fn), map_refs(value.stop, fn),
                     map_refs(value.step, fn))
    if isinstance(value, tuple):  # named tuples
        mapped = [map_refs(v, fn) for v in value]
        return kind(*mapped) if hasattr(value, "_fields") else kind(mapped)
    if isinstance(value, list):  # fx's immutable_list
        return [map_refs(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_refs(v, fn) for k, v in value.items()}
    return value


def _refs_in(value: Any, found: list[str] | None = None) -> list[str]:
    """Names of the nodes an argument structure refers to, in order."""
    found = [] if found is None else found
    kind = type(value)
    if kind is Ref:
        found.append(value.name)
    elif kind in _LEAVES:
        pass
    elif isinstance(value, (tuple, list)):
        for v in value:
            inner = type(v)  # why: most items are leaves or refs; no call for those
            if inner is Ref:
                found.append(v.name)
            elif inner not in _LEAVES:
                _refs_in(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _refs_in(v, found)
    elif kind is slice:
        for v in (value.start, value.stop, value.step):
            _refs_in(v, found)
    return found


class Role(enum.Enum):
    """What a node is for, beyond the op it computes (the pictures and counts read this)."""

    WEIGHT = "weight"
    """An architecture weight ``w_i``, or arithmetic on weights the input already had."""
    GROUP_WEIGHT = "group weight"
    """``w_S = sum_{i in S} w_i`` (Eq. 7), or the safe denominator made from it."""
    CONDITIONAL_WEIGHT = "conditional weight"
    """``w'_i = w_i / w_S`` (Eq. 8)."""
    KERNEL = "kernel"
    """Kernel arithmetic: reading, placing, summing or normalizing a kernel."""

    @property
    def is_weight(self) -> bool:
        return self is not Role.KERNEL


class Shared(str, enum.Enum):
    """Which sharing computes a module once for several candidates."""

    SIBLING = "sibling"
    COMMON_CHILD = "common child"
    FLOATING = "floating"


@dataclasses.dataclass(frozen=True)
class NodeNotes:
    """What passes leave on a node for later passes, the report and the pictures.

    Set through :meth:`SupernetIR.annotate` (or ``add_node(notes=...)``), which bumps the IR's
    generation like every other edit.
    """

    mixed_op: str | None = None
    """The mixed op (edge) of the input supernet the node belongs to."""
    role: Role | None = None
    shared: Shared | None = None
    """Set on a module that sharing computes once for several candidates."""
    merged: tuple[str, ...] | None = None
    """On a merged convolution: the labels of the candidates it absorbed."""
    merge_form: str | None = None
    """On a merged convolution: dense, depthwise, separable, folded (or one of its halves)."""
    kernels: tuple[str, ...] | None = None
    """On a merged convolution: the learnable kernels entering it (kernel normalization's
    outputs where ``kn`` ran before ``merge``)."""
    frame: tuple[int, ...] | None = None
    """On a merged convolution: its kernel frame."""
    kn: bool = False
    """Kernel normalization has handled this convolution."""
    folded_weight: bool = False
    """An architecture weight was folded into this convolution or BatchNorm."""

    @property
    def is_weight(self) -> bool:
        """Architecture-weight arithmetic (left out of the module counts)."""
        return self.role is not None and self.role.is_weight


@dataclasses.dataclass
class IRNode:
    """One value of the supernet: what computes it, from what, and its meta value."""

    name: str
    opcode: str
    """fx opcode: placeholder, get_attr, call_module, call_function, call_method, output."""
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    desc: OpDesc
    val: Any = UNKNOWN
    """Meta value on the example inputs: a meta tensor, a Python value, a tuple, or UNKNOWN."""
    module_path: str = ""
    """The user's module whose forward issued this op ('' for the top level)."""
    source: tuple[str, int, str] | None = None
    order: tuple[int, ...] = (0,)
    origin: str = "input"
    """Who made the node: 'input' (traced) or the pass that created it."""
    notes: NodeNotes = NodeNotes()
    """Annotations passes leave for the report and the pictures (set through
    :meth:`SupernetIR.annotate`)."""

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("args", "kwargs"):
            self.__dict__.pop("_inputs", None)
        object.__setattr__(self, key, value)

    @property
    def inputs(self) -> list[str]:
        """Names of the nodes this one reads, in argument order, without repeats."""
        cached = self.__dict__.get("_inputs")
        if cached is None:
            cached = list(dict.fromkeys(_refs_in((self.args, self.kwargs))))
            self.__dict__["_inputs"] = cached
        return list(cached)

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.val, torch.Tensor)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return tuple(self.val.shape) if isinstance(self.val, torch.Tensor) else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.val.dtype if isinstance(self.val, torch.Tensor) else None

    @property
    def kind(self) -> Kind:
        return self.desc.kind


class SupernetIR:
    """The networkx IR of a traced supernet, with the methods passes edit it through."""

    def __init__(self, root: nn.Module, tensor_attrs: dict[str, torch.Tensor] | None = None,
                 device_type: str = "cpu"):
        self.graph = nx.DiGraph()
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        """call_module targets -> module (the user's leaves, plus modules passes add)."""
        self.tensor_attrs: dict[str, torch.Tensor] = dict(tensor_attrs or {})
        """get_attr targets naming plain (unregistered) tensor attributes of the model."""
        self._seq = itertools.count()
        self.generation = 0
        """Bumped by every edit, notes included: analyses of an unchanged IR can be reused."""
        self.graph_generation = 0
        """Bumped by every edit but :meth:`annotate`: analyses that read no notes can be
        reused across annotations."""
        self.cache: dict[str, tuple[int, Any]] = {}
        self._name_counters: dict[str, int] = {}
        self._meta_cache: dict[int, nn.Module] = {}
        self.codegen = None
        """The fx graph's code generator (pytree in/out specs), handed from lift to lower."""
        self.device_type = device_type
        """Device of the example inputs (the merge cost model's default machine)."""

    # -- reading -----------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.graph

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def node(self, name: str) -> IRNode:
        return self.graph._node[name]["node"]  # the node attribute dict, without the view

    def nodes(self) -> list[IRNode]:
        """All nodes in the stable topological order used for lowering."""
        return [self.node(n) for n in self.topological_order()]

    def topological_order(self) -> list[str]:
        return list(nx.lexicographical_topological_sort(
            self.graph, key=lambda n: self.graph.nodes[n]["node"].order))

    def users(self, name: str) -> list[str]:
        """Nodes that read ``name``, sorted by program order."""
        return sorted(self.graph.successors(name), key=lambda n: self.node(n).order)

    def placeholders(self) -> list[IRNode]:
        return sorted((n for n in self._all() if n.opcode == "placeholder"),
                      key=lambda n: n.order)

    def output(self) -> IRNode:
        outs = [n for n in self._all() if n.opcode == "output"]
        if len(outs) != 1:
            raise IRVerificationError(f"expected one output node, found {len(outs)}")
        return outs[0]

    def _all(self) -> Iterator[IRNode]:
        return (data["node"] for _, data in self.graph.nodes(data=True))

    def attr(self, target: str) -> Any:
        """The tensor a get_attr target names (parameter, buffer or tensor attribute)."""
        if target in self.tensor_attrs:
            return self.tensor_attrs[target]
        obj: Any = self.root
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj

    # -- editing -------------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        base = re.sub(r"\W", "_", hint) or "v"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "_" + base
        if base not in self.graph:
            return base
        i = self._name_counters.get(base, 0)
        while True:
            i += 1
            candidate = f"{base}_{i}"
            if candidate not in self.graph:
                self._name_counters[base] = i
                return candidate

    def add_node(self, opcode: str, target: Any, args: tuple = (), kwargs: dict | None = None,
                 *, name: str | None = None, after: str | Iterable[str] | None = None,
                 desc: OpDesc | None = None, val: Any = None, module_path: str | None = None,
                 origin: str = "input", notes: NodeNotes | None = None,
                 module: nn.Module | None = None, order: tuple[int, ...] | None = None,
                 source: tuple[str, int, str] | None = None) -> IRNode:
        """Add a node; its meta value and descriptor are computed unless given.

        ``after`` names the node(s) it should follow in program order (default: its
        inputs); new nodes sort right after the latest of them, in creation order.
        """
        kwargs = dict(kwargs or {})
        if opcode == "call_module":
            if module is not None:
                self.modules[target] = module
            elif target not in self.modules:
                self.modules[target] = self.root.get_submodule(target)
        name = self.fresh_name(name or _default_name(opcode, target))
        refs = _refs_in((args, kwargs))
        missing = [r for r in refs if r not in self.graph]
        if missing:
            raise IRVerificationError(f"node {name!r} reads unknown node(s) {missing}")
        if order is None:
            anchors = [after] if isinstance(after, str) else list(after or refs)
            base = max((self.node(a).order for a in anchors), default=(0,))
            order = base + (next(self._seq),)
        if desc is None:
            desc = self.describe(opcode, target, args, kwargs)
        if val is None:
            val = self.infer_val(opcode, target, args, kwargs)
        if module_path is None:
            module_path = self.node(refs[0]).module_path if refs else ""
        node = IRNode(name, opcode, target, tuple(args), kwargs, desc, val, module_path,
                      source, order, origin, notes or NodeNotes())
        self._edited()
        self.graph.add_node(name, node=node)
        for r in set(refs):
            self.graph.add_edge(r, name)
        return node

    def set_args(self, name: str, args: tuple, kwargs: dict | None = None) -> None:
        """Replace a node's arguments, keeping edges in sync (descriptor recomputed)."""
        node = self.node(name)
        self._edited()
        for r in node.inputs:
            self.graph.remove_edge(r, name)
        node.args = tuple(args)
        node.kwargs = dict(kwargs if kwargs is not None else node.kwargs)
        for r in node.inputs:
            if r not in self.graph:
                raise IRVerificationError(f"node {name!r} reads unknown node {r!r}")
            self.graph.add_edge(r, name)
        if node.opcode in ("call_function", "call_method"):
            node.desc = self.describe(node.opcode, node.target, node.args, node.kwargs)

    def set_target(self, name: str, target: Any, *, module: nn.Module | None = None) -> None:
        """Make a node call ``target`` instead (registering ``module`` under that name for a
        call_module), descriptor recomputed; arguments and edges stay."""
        node = self.node(name)
        if module is not None:
            self.modules[target] = module
        node.target = target
        node.desc = self.describe(node.opcode, node.target, node.args, node.kwargs)
        self._edited()

    def replace_all_uses(self, old: str, new: str, *, skip: Iterable[str] = ()) -> None:
        """Make every user of ``old`` (except ``skip``) read ``new`` instead."""
        skip = set(skip)
        for user in list(self.graph.successors(old)):
            if user in skip or user == new:
                continue
            node = self.node(user)
            swap = lambda r: Ref(new) if r.name == old else r  # noqa: E731
            self.set_args(user, map_refs(node.args, swap), map_refs(node.kwargs, swap))

    def annotate(self, name: str, **fields: Any) -> None:
        """Replace some of a node's :class:`NodeNotes` fields."""
        node = self.node(name)
        node.notes = dataclasses.replace(node.notes, **fields)
        self.generation += 1  # why: not graph_generation, the graph itself is unchanged

    def remove_node(self, name: str) -> None:
        if any(True for _ in self.graph.successors(name)):
            raise IRVerificationError(f"cannot remove {name!r}: still read by "
                                      f"{self.users(name)}")
        self._edited()
        self.graph.remove_node(name)

    def remove_dead(self, names: Iterable[str]) -> int:
        """Remove the given nodes and their now-unused, side-effect-free producers."""
        removed = 0
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in self.graph or any(True for _ in self.graph.successors(name)):
                continue
            node = self.node(name)
            if node.opcode in ("placeholder", "output") or node.desc.inplace:
                continue
            preds = list(self.graph.predecessors(name))
            self._edited()
            self.graph.remove_node(name)
            removed += 1
            stack.extend(preds)
        return removed

    def _edited(self) -> None:
        self.generation += 1
        self.graph_generation += 1

    def cached(self, key: str, compute: Callable[[], Any], *, reads_notes: bool = True) -> Any:
        """``compute()``, reused while the IR is unchanged (see :attr:`generation`); an
        analysis that reads no notes passes ``reads_notes=False`` and is reused across
        :meth:`annotate` calls too."""
        stamp = self.generation if reads_notes else self.graph_generation
        hit = self.cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        self.cache[key] = (stamp, value)
        return value

    # -- descriptors and meta values -----------------------------------------------------
    def describe(self, opcode: str, target: Any, args: tuple, kwargs: dict) -> OpDesc:
        if opcode == "placeholder":
            return OpDesc(Kind.INPUT, "input", (("name", target),))
        if opcode == "output":
            return OpDesc(Kind.OUTPUT, "output")
        if opcode == "get_attr":
            return OpDesc(Kind.PARAM, "get_attr", params=(target,))
        if opcode == "call_module":
            return describe_module(self.modules[target], target)
        arg_types = None
        try:
            vals = map_refs(tuple(args), lambda r: self.node(r.name).val)
            if not any(v is UNKNOWN for v in vals):
                arg_types = tuple(type(v) for v in vals)
        except KeyError:
            pass
        desc = describe_call(target, opcode, tuple(args), dict(kwargs),
                             lambda a: isinstance(a, Ref), arg_types)
        # the tensors a function is handed as attributes (F.conv2d(x, self.w1)) are its
        # parameters: two calls differing only there are different functions
        reads = tuple(self.node(r).target for r in _refs_in((args, kwargs))
                      if r in self.graph and self.node(r).opcode == "get_attr")
        return dataclasses.replace(desc, params=reads) if reads else desc

    def infer_val(self, opcode: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if opcode in ("placeholder", "output"):
            return UNKNOWN if opcode == "placeholder" else None
        if opcode == "get_attr":
            return to_meta(self.attr(target))
        margs = map_refs(tuple(args), lambda r: self.node(r.name).val)
        mkwargs = map_refs(dict(kwargs), lambda r: self.node(r.name).val)
        module = self.modules.get(target) if opcode == "call_module" else None
        try:
            return run_on_meta(opcode, target, margs, mkwargs, module, self._meta_cache)
        except Exception as exc:  # noqa: BLE001 - a rewrite produced an ill-shaped node
            raise IRVerificationError(
                f"{opcode} {getattr(target, '__name__', target)} fails on its inputs' meta "
                f"values: {type(exc).__name__}: {exc}") from exc

    # -- checking ------------------------------------------------------------------------
    def verify(self, stage: str = "") -> None:
        """Check the IR's invariants; raise :class:`IRVerificationError` naming the node."""
        where = f" after {stage}" if stage else ""

        def fail(msg: str) -> None:
            raise IRVerificationError(f"IR invalid{where}: {msg}")

        if not nx.is_directed_acyclic_graph(self.graph):
            cycle = nx.find_cycle(self.graph)
            fail(f"cycle through {[u for u, _ in cycle]}")
        outputs = 0
        resolved: set[str] = set()
        for name, data in self.graph.nodes(data=True):
            node = data.get("node")
            if not isinstance(node, IRNode) or node.name != name:
                fail(f"node key {name!r} does not hold its IRNode")
            if not isinstance(node.desc, OpDesc):
                fail(f"node {name!r} has no descriptor")
            if not isinstance(node.notes, NodeNotes):
                fail(f"node {name!r}: notes are {type(node.notes).__name__}, not NodeNotes "
                     f"(set them through SupernetIR.annotate)")
            refs = set(_refs_in((node.args, node.kwargs)))  # not the cache: catch edits in place
            preds = self.graph.pred[name]
            if len(refs) != len(preds) or any(r not in preds for r in refs):
                fail(f"node {name!r}: arguments read {sorted(refs)} but edges say "
                     f"{sorted(preds)} (edit the IR through SupernetIR's methods)")
            if node.opcode == "output":
                outputs += 1
                if any(True for _ in self.graph.successors(name)):
                    fail("the output node is read by other nodes")
            elif node.opcode == "placeholder" and refs:
                fail(f"placeholder {name!r} reads other nodes")
            elif node.opcode == "call_module" and node.target not in self.modules:
                fail(f"node {name!r} calls unknown module {node.target!r}")
            elif node.opcode == "get_attr" and node.target not in resolved:
                try:
                    self.attr(node.target)
                except AttributeError:
                    fail(f"node {name!r} reads unknown attribute {node.target!r}")
                resolved.add(node.target)
        if outputs != 1:
            fail(f"expected exactly one output node, found {outputs}")


def _default_name(opcode: str, target: Any) -> str:
    if opcode in ("call_module", "get_attr", "placeholder"):
        return str(target).replace(".", "_")
    if opcode == "call_method":
        return str(target)
    return getattr(target, "__name__", "op")
