"""Lowering preparation: the architecture-weight arithmetic as one vectorized program, and
arithmetic that leaves its operand unchanged dropped.

Cascaded selections (Eq. 7-8) and merged kernels (Eq. 14) read architecture weights one
scalar at a time: per mixed op, per candidate, a chain of ``getitem``s into the softmaxed
alphas, sums ``w_S`` and quotients ``w' = w / w_S``.  In the 8-cell DARTS supernet that is
about 3000 scalar ops, each a kernel launch and an autograd node, for a few thousand numbers::

    before:  row = softmax[0]; a = row[1]; b = row[2]; w_S = a + b
             w_S_safe = nonzero_or_one(w_S); w1 = a / w_S_safe; ...   (thousands of these)
    after:   weights = self.weight_program(softmax, softmax_1)   # runtime.WeightProgram
             w1 = weights[17]; ...                          # tuple items, not tensor ops

:func:`vectorize_weights` finds the scalar ops (0-dim floating tensors computed by ``add``,
``sub``, ``mul``, ``truediv``, ``neg``, ``nonzero_or_one`` from other scalars, numbers, and
integer ``getitem`` chains into tensors that do not depend on the inputs), levels them by
depth, and replaces them with one :class:`~topo_compiler.runtime.WeightProgram` whose
outputs feed the same users.  Every value comes from the same elementwise floating-point
operation as before, so outputs are unchanged (gradients up to summation order).

:func:`drop_identity_arithmetic` removes ``0 + x``, ``x + 0``, ``x - 0``, ``1 * x``,
``x * 1`` and ``x / 1`` on tensors whose shape and dtype the op keeps, unless a user writes
to the result in place.
"""

from __future__ import annotations

import collections
import operator
from typing import Any

import networkx as nx
import torch

from .cse import writes_in_place
from .descriptors import Ref
from .ir import NodeNotes, Role, SupernetIR
from .meta import UNKNOWN
from .runtime import WeightProgram, nonzero_or_one

__all__ = ["vectorize_weights", "drop_identity_arithmetic", "MIN_SCALARS"]

MIN_SCALARS = 8
"""Fewer scalar ops than this are left as they are."""
_LAST = 1 << 62

_BINARY = {operator.add: "add", operator.sub: "sub", operator.mul: "mul",
           operator.truediv: "truediv", torch.add: "add", torch.sub: "sub", torch.mul: "mul",
           torch.div: "truediv"}
_UNARY = {operator.neg: "neg", torch.neg: "neg", nonzero_or_one: "nonzero_or_one"}
_NUMBER = (int, float)


def _scalar_val(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


def _data_dependent(ir: SupernetIR, order: list[str]) -> set[str]:
    """Nodes that read the inputs, directly or not."""
    dependent: set[str] = set()
    for name in order:
        node = ir.node(name)
        if node.opcode == "placeholder" or any(r in dependent for r in node.inputs):
            dependent.add(name)
    return dependent


def _element(ir: SupernetIR, name: str, dependent: set[str]) -> tuple[str, int] | None:
    """``(root, flat index)`` when ``name`` is a chain of integer getitems into a tensor that
    does not depend on the inputs (``softmax[0][3]``), else None."""
    path: list[int] = []
    node = ir.node(name)
    while (node.opcode == "call_function" and node.target is operator.getitem
           and len(node.args) == 2 and isinstance(node.args[0], Ref)
           and type(node.args[1]) is int and not node.kwargs):
        path.append(node.args[1])
        node = ir.node(node.args[0].name)
        if not isinstance(node.val, torch.Tensor):
            return None
    if not path or node.name in dependent or not isinstance(node.val, torch.Tensor):
        return None
    shape = tuple(node.val.shape)
    path.reverse()
    if len(path) > len(shape):
        return None
    flat, stride = 0, 1
    strides = []
    for size in reversed(shape):
        strides.append(stride)
        stride *= size
    strides.reverse()
    for index, size, step in zip(path, shape, strides):
        if not -size <= index < size:
            return None
        flat += (index % size) * step
    if len(path) != len(shape):  # a row, not an element
        return None
    return node.name, flat


def vectorize_weights(ir: SupernetIR) -> str | None:
    """Replace the scalar architecture-weight arithmetic by one program; a summary line, or
    None when there is too little of it (then the IR is unchanged)."""
    order = ir.topological_order()
    dependent = _data_dependent(ir, order)
    roots: list[str] = []
    leaves: dict[str, tuple[str, int]] = {}
    ops: dict[str, tuple[str, list[tuple[str, Any]]]] = {}
    dtypes: collections.Counter = collections.Counter()
    for name in order:
        node = ir.node(name)
        if node.opcode != "call_function" or not _scalar_val(node.val) or node.kwargs:
            continue
        element = _element(ir, name, dependent)
        if element is not None:
            leaves[name] = element
            dtypes[node.val.dtype] += 1
            if element[0] not in roots:
                roots.append(element[0])
            continue
        kind = _BINARY.get(node.target) if len(node.args) == 2 else \
            _UNARY.get(node.target) if len(node.args) == 1 else None
        if kind is None:
            continue
        operands = []
        for arg in node.args:
            if isinstance(arg, Ref) and (arg.name in leaves or arg.name in ops):
                operands.append(("v", arg.name))
            elif type(arg) in _NUMBER:
                operands.append(("c", arg))
            else:
                break
        else:
            if any(kind_ == "v" for kind_, _ in operands):
                ops[name] = (kind, operands)
                dtypes[node.val.dtype] += 1
    if not dtypes:
        return None
    dtype = dtypes.most_common(1)[0][0]
    chosen = [n for n in order if n in leaves or n in ops]
    chosen = _same_dtype(ir, chosen, leaves, ops, dtype)
    if len(chosen) < MIN_SCALARS:
        return None
    inside = set(chosen)
    roots = [r for r in roots if any(leaves.get(n, ("",))[0] == r for n in chosen)]
    offsets, total = {}, 0
    for r in roots:
        offsets[r] = total
        total += ir.node(r).val.numel()

    # positions in the value vector: the leaves first, then level after level
    position: dict[str, int] = {}
    leaf_index = []
    for n in chosen:
        if n in leaves:
            root, flat = leaves[n]
            position[n] = len(leaf_index)
            leaf_index.append(offsets[root] + flat)
    depth: dict[str, int] = {n: 0 for n in chosen if n in leaves}
    for n in chosen:
        if n in ops:
            depth[n] = 1 + max(depth[v] for k, v in ops[n][1] if k == "v")
    size = len(leaf_index)
    levels = []
    for level in range(1, max(depth.values()) + 1):
        groups: dict[tuple, list[str]] = collections.defaultdict(list)
        for n in chosen:
            if depth[n] == level:
                kind, operands = ops[n]
                shape = tuple((k, v if k == "c" else None) for k, v in operands)
                groups[(kind, shape)].append(n)
        spec = []
        for (kind, shape), members in groups.items():
            operands = []
            for i, (k, const) in enumerate(shape):
                if k == "c":
                    operands.append(("c", const))
                else:
                    operands.append(("v", [position[ops[m][1][i][1]] for m in members]))
            for m in members:
                position[m] = size
                size += 1
            spec.append((kind, operands))
        levels.append(spec)

    exports = [n for n in chosen if any(u not in inside for u in ir.users(n))]
    device = next((t.device for t in (*ir.root.parameters(), *ir.root.buffers())),
                  torch.device("cpu"))
    program = WeightProgram(leaf_index, levels, [position[n] for n in exports], device)
    target = _free_target(ir, "weight_program")
    # the weights do not depend on the inputs: compute them (and what they read) first
    early = set(roots).union(*(nx.ancestors(ir.graph, r) for r in roots))
    for n in early:
        ir.node(n).order = (-1,) + ir.node(n).order
    ir.generation += 1  # why: program order changed (no IR method edits it)
    ir.graph_generation += 1
    meta = tuple(torch.empty((), dtype=dtype, device="meta") for _ in exports)
    node = ir.add_node("call_module", target, tuple(Ref(r) for r in roots), module=program,
                       name="weights", order=(-1, _LAST), val=meta, origin="vectorize",
                       notes=NodeNotes(role=Role.WEIGHT))
    for i, n in enumerate(exports):
        item = ir.add_node("call_function", operator.getitem, (Ref(node.name), i),
                           name=n, order=(-1, _LAST, i), val=meta[i], origin="vectorize",
                           notes=NodeNotes(role=Role.WEIGHT))
        ir.replace_all_uses(n, item.name)
    ir.remove_dead(chosen)
    levels_ops = sum(len(level) for level in levels)
    return (f"{len(chosen)} scalar weight ops ({len(leaf_index)} reads of "
            f"{len(roots)} tensor(s)) -> one program of {len(levels)} levels, "
            f"{levels_ops} vectorized ops, {len(exports)} weights read by the graph")


def _same_dtype(ir: SupernetIR, chosen: list[str], leaves: dict, ops: dict,
                dtype: torch.dtype) -> list[str]:
    """The chosen nodes of ``dtype`` whose operands are chosen too (in order)."""
    kept: set[str] = set()
    for n in chosen:
        if ir.node(n).val.dtype != dtype:
            continue
        if n in ops and any(k == "v" and v not in kept for k, v in ops[n][1]):
            continue
        if n in leaves and ir.node(leaves[n][0]).val.dtype != dtype:
            continue
        kept.add(n)
    return [n for n in chosen if n in kept]


def _free_target(ir: SupernetIR, base: str) -> str:
    taken = set(ir.modules) | {n for n, _ in ir.root.named_modules()}
    target, i = base, 0
    while target in taken or hasattr(ir.root, target):
        i += 1
        target = f"{base}_{i}"
    return target


_IDENTITIES = {
    # (op, position of the constant, constant): x op c == x or c op x == x
    (operator.add, 0, 0), (operator.add, 1, 0), (operator.sub, 1, 0),
    (operator.mul, 0, 1), (operator.mul, 1, 1), (operator.truediv, 1, 1),
}


def drop_identity_arithmetic(ir: SupernetIR) -> int:
    """Remove ``0 + x`` and its kin (see the module docstring); how many were removed."""
    removed = 0
    for name in ir.topological_order():
        node = ir.node(name)
        if node.opcode != "call_function" or len(node.args) != 2 or node.kwargs:
            continue
        for pos in (0, 1):
            const, other = node.args[pos], node.args[1 - pos]
            if type(const) not in _NUMBER or not isinstance(other, Ref) or \
                    (node.target, pos, const) not in _IDENTITIES:
                continue
            x = ir.node(other.name)
            if x.val is UNKNOWN or node.val is UNKNOWN or not isinstance(x.val, torch.Tensor) \
                    or not isinstance(node.val, torch.Tensor) or x.val.shape != node.val.shape \
                    or x.val.dtype != node.val.dtype:
                continue
            if any(writes_in_place(ir.node(u)) or ir.node(u).opcode == "output"
                   for u in ir.users(name)):
                continue  # why: the result would alias x (in place, or handed out)
            ir.replace_all_uses(name, other.name)
            ir.remove_node(name)
            removed += 1
            break
    return removed
