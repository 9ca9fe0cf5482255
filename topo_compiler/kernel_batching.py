"""Lowering preparation: the per-candidate kernel arithmetic of all merges in a few batches.

Merged convolutions (Eq. 14) rebuild their kernels at every call, one candidate at a time: in
the 8-cell DARTS supernet 168 ``place`` calls (a kernel into its merge's frame), 168
``separable_to_dense`` calls and 616 ``weighted_kernel_sum`` calls (merged and folded
kernels), each a few tiny kernel launches and autograd nodes::

    before:  placed_3 = place(dw_3, (1, 1), (-1, -1), (5, 5), (1, 1))     # x 168
             dense_3 = separable_to_dense(placed_3, pw_3)                # x 168
             merged_kernel_7 = weighted_kernel_sum([w_a, w_b], [dense_3, dense_4])  # x 616
    after:   placed = place_many([dw_1, ..., dw_84], (1, 1), (-1, -1), (5, 5), (1, 1))
             dense = separable_to_dense_many([placed[0], ...], [pw_1, ...])
             merged = weighted_kernel_sums([[w_a, ...], [w_b, ...]], [[dense[0], ...], ...])
             merged_kernel_7 = merged[3]                     # tuple items, not tensor ops

:func:`batch_kernel_arithmetic` groups those calls by what makes one batch possible (the
function, its constant arguments, the operands' shapes and dtypes, the number of terms) and
by their depth (how many such calls lie on the longest path to them), so no member of a
group depends on another and the batched graph stays acyclic.  Only calls that do not depend
on the inputs are batched (like the weight program, they depend on parameters and
architecture weights only).  Each batch applies the same elementwise operations in the
same order as its members, so outputs and gradients are unchanged, bit for bit.
"""

from __future__ import annotations

import collections
import operator
from typing import Any, Callable

import torch

from .descriptors import Ref
from .ir import NodeNotes, Role, SupernetIR
from .runtime import (place, place_many, separable_to_dense, separable_to_dense_many,
                      weighted_kernel_sum, weighted_kernel_sums)
from .vectorize import _data_dependent

__all__ = ["batch_kernel_arithmetic", "MIN_BATCH"]

MIN_BATCH = 2
"""Groups with fewer calls than this are left as they are."""


def _tensor(ir: SupernetIR, arg: Any) -> torch.Tensor | None:
    if not isinstance(arg, Ref):
        return None
    val = ir.node(arg.name).val
    return val if isinstance(val, torch.Tensor) else None


def _sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _place_key(ir: SupernetIR, node: Any) -> tuple | None:
    if len(node.args) != 5 or node.kwargs:
        return None
    k = _tensor(ir, node.args[0])
    if k is None:
        return None
    return (*(tuple(a) for a in node.args[1:]), _sig(k))


def _dense_key(ir: SupernetIR, node: Any) -> tuple | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    d, p = (_tensor(ir, a) for a in node.args)
    return None if d is None or p is None else (_sig(d), _sig(p))


def _sum_key(ir: SupernetIR, node: Any) -> tuple | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    ws, ks = node.args
    if not isinstance(ws, (list, tuple)) or not isinstance(ks, (list, tuple)) or \
            len(ws) != len(ks) or not ws:
        return None
    wv = [_tensor(ir, w) for w in ws]
    kv = [_tensor(ir, k) for k in ks]
    if any(v is None for v in (*wv, *kv)):
        return None
    kernel = _sig(kv[0])
    if any(_sig(k) != kernel for k in kv) or \
            any(w.dim() != 0 or w.dtype != kernel[1] for w in wv):
        return None  # why: a 0-d weight of another dtype would promote differently batched
    return len(ws), kernel


def _place_call(members: list[Any]) -> tuple:
    first = members[0]
    return ([m.args[0] for m in members], *first.args[1:])


def _dense_call(members: list[Any]) -> tuple:
    return [m.args[0] for m in members], [m.args[1] for m in members]


def _sum_call(members: list[Any]) -> tuple:
    terms = len(members[0].args[0])
    return ([[m.args[0][j] for m in members] for j in range(terms)],
            [[m.args[1][j] for m in members] for j in range(terms)])


_BATCHED: dict[Callable, tuple[Callable, Callable, Callable, str]] = {
    # per-candidate function -> (group key, batched function, its arguments, node name)
    place: (_place_key, place_many, _place_call, "placed_kernels"),
    separable_to_dense: (_dense_key, separable_to_dense_many, _dense_call, "dense_kernels"),
    weighted_kernel_sum: (_sum_key, weighted_kernel_sums, _sum_call, "merged_kernels"),
}


def batch_kernel_arithmetic(ir: SupernetIR) -> str | None:
    """Batch the per-candidate kernel calls (see the module docstring); a summary line, or
    None when nothing was batched (then the IR is unchanged)."""
    order = ir.topological_order()
    dependent = _data_dependent(ir, order)
    depth: dict[str, int] = {}
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for name in order:
        node = ir.node(name)
        d = max((depth[r] for r in node.inputs), default=0)
        spec = _BATCHED.get(node.target) if node.opcode == "call_function" else None
        if spec is not None:
            d += 1
            key = spec[0](ir, node) if name not in dependent else None
            if key is not None:
                groups[(node.target, d, key)].append(name)
        depth[name] = d
    before = after = 0
    for (target, _, _), members in groups.items():
        if len(members) < MIN_BATCH:
            continue
        _, batched, call, label = _BATCHED[target]
        nodes = [ir.node(m) for m in members]
        batch = ir.add_node("call_function", batched, call(nodes), name=label,
                            origin="vectorize", notes=NodeNotes(role=Role.KERNEL))
        for i, node in enumerate(nodes):
            item = ir.add_node("call_function", operator.getitem, (Ref(batch.name), i),
                               name=node.name, val=batch.val[i], origin="vectorize",
                               module_path=node.module_path, notes=node.notes)
            ir.replace_all_uses(node.name, item.name)
        ir.remove_dead(members)
        before += len(members)
        after += 1
    if not after:
        return None
    return f"{before} per-candidate kernel calls -> {after} batched calls"
