"""Lowering preparation: one computation for each pure op repeated on the same operands.

A supernet's forward often recomputes the same function of the same parameters: DARTS's
``Network.forward`` takes ``F.softmax(self.alphas_reduce, dim=-1)`` in every reduction cell and
``F.softmax(self.alphas_normal, dim=-1)`` in every normal cell, so the traced graph holds one
softmax (and one backward node) per cell::

    before:  softmax = F.softmax(alphas_normal, dim=-1)      # cell 0
             softmax_2 = F.softmax(alphas_normal, dim=-1)    # cell 2 ... and so on
    after:   softmax = F.softmax(alphas_normal, dim=-1)      # read by every normal cell

:func:`eliminate_common_subexpressions` keeps the first of the nodes that call the same
target with the same arguments and points the users of the others at it.  It is exact: each
merged node computes the same values (gradients sum the same terms).  Only ops known to be
pure and deterministic are merged (an allowlist, never random ops such as dropout,
``bernoulli`` or ``rand_like``, never in-place ops); nodes whose operands may change during a
call are left alone: a tensor written in place (or anything that may alias it through a
view), a registered buffer (BatchNorm updates its running statistics mid-call).  Two results
both handed to the caller stay separate objects.

Why not ``torch.fx.passes.dialect.common.cse_pass.CSEPass``: it targets functional aten graphs
(make_fx) and bans only aten random and in-place overloads, so on a torch-level graph it would
merge ``F.dropout``, ``torch.rand_like``, ``x.bernoulli_()`` and stateful ``call_module``
nodes (two BatchNorm calls on one input update the running statistics twice); it hashes raw
arguments (a ``slice`` is unhashable before Python 3.12); and it rebuilds a plain
``GraphModule`` instead of editing the IR.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .descriptors import Kind, freeze
from .ir import SupernetIR

__all__ = ["eliminate_common_subexpressions", "writes_in_place", "PURE_FUNCTIONS",
           "PURE_METHODS"]

PURE_FUNCTIONS = frozenset({
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.sigmoid, torch.tanh,
    torch.exp, torch.log, torch.abs, torch.sqrt, torch.neg,
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.neg, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
    torch.stack, torch.cat, torch.sum, torch.mean, torch.flatten, torch.reshape,
    torch.transpose, torch.unsqueeze, torch.squeeze,
})
"""Functions whose result depends on their arguments only (no randomness, no state)."""

PURE_METHODS = frozenset({
    "softmax", "log_softmax", "sigmoid", "tanh", "exp", "log", "abs", "sqrt", "neg",
    "sum", "mean", "view", "reshape", "flatten", "unsqueeze", "squeeze", "permute",
    "transpose", "t", "contiguous", "size", "dim",
})
"""Tensor methods likewise (their in-place forms end in ``_`` and are not listed)."""


def writes_in_place(node: Any) -> bool:
    """The node writes into its first argument (``x.add_(y)``, ``F.relu(x, inplace=True)``,
    ``x[i] = v``)."""
    return node.desc.inplace or (node.opcode == "call_function"
                                 and node.target is operator.setitem)


def _pure(node: Any) -> bool:
    if writes_in_place(node) or "out" in node.kwargs:
        return False
    if node.opcode == "call_function":
        try:
            return node.target in PURE_FUNCTIONS
        except TypeError:  # an unhashable target
            return False
    return node.opcode == "call_method" and node.target in PURE_METHODS


def _unstable(ir: SupernetIR, order: list[str]) -> set[str]:
    """Nodes whose value may change during a call after it is computed: tensors written in
    place and everything that may alias them through views, and registered buffers."""
    parent = {n: n for n in order}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    written: list[str] = []
    buffers = {id(b) for b in ir.root.buffers()}
    for name in order:
        node = ir.node(name)
        if writes_in_place(node) and node.inputs:
            written.append(node.inputs[0])
        if node.kind is Kind.LAYOUT or node.opcode == "call_method" and \
                node.target in ("view", "reshape", "flatten", "unsqueeze", "squeeze",
                                "permute", "transpose", "t", "contiguous"):
            for r in node.inputs:  # why: a view shares memory with what it reads
                parent[find(r)] = find(name)
        if node.opcode == "get_attr":
            try:
                value = ir.attr(node.target)
            except AttributeError:
                written.append(name)
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and \
                    id(value) in buffers:
                written.append(name)
    roots = {find(n) for n in written}
    return {n for n in order if find(n) in roots}


def eliminate_common_subexpressions(ir: SupernetIR) -> int:
    """Merge repeated pure computations (see the module docstring); how many were removed."""
    order = ir.topological_order()
    unstable = _unstable(ir, order)
    output = ir.output().name
    first: dict[tuple, str] = {}
    removed = 0
    for name in order:
        node = ir.node(name)
        if not _pure(node) or name in unstable or any(r in unstable for r in node.inputs):
            continue
        key = (node.opcode, node.target, freeze(node.args), freeze(node.kwargs))
        try:
            kept = first.setdefault(key, name)
        except TypeError:  # an unhashable argument
            continue
        if kept == name:
            continue
        if output in ir.graph.successors(name) and output in ir.graph.successors(kept):
            continue  # why: two outputs the caller may treat as separate tensors
        ir.replace_all_uses(name, kept)
        ir.remove_node(name)
        removed += 1
    return removed
