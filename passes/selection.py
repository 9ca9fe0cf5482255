"""Operation selection (not a pass): the weighted sums the rewrites build and take apart.

The paper rewrites a mixed op ``sum_i w_i o_i(x)`` into *cascaded operation selections*:
an outer selection that picks a group S of candidates with probability ``w_S`` and an inner
one that picks ``i`` inside S with the conditional probability ``w'_i`` (Eq. 7-8)::

    w_S  = sum_{i in S} w_i                 (7)
    w'_i = w_i / w_S                        (8)

No new architecture parameters appear: both are derived from the original weights on every
forward.  Where ``w_S == 0`` (one-hot or pruned weights, as GDAS produces) the ratio is 0/0;
:func:`~topo_compiler.runtime.nonzero_or_one` divides by 1 there instead, which keeps forward
and backward finite and changes nothing, because the group's term is multiplied by ``w_S = 0``.

This module holds the pieces both sharing passes need: views of a candidate as a chain of
basic modules (:class:`CandidateView`), the weight arithmetic, and :func:`rebuild_selection`,
which replaces a group of candidates' terms in a mixed op by one new term.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Sequence

import torch

from topo_compiler.analysis import Candidate, MixedOp
from topo_compiler.descriptors import Kind, Ref
from topo_compiler.ir import IRNode, Role, SupernetIR
from topo_compiler.passes.mixed_op_driver import Tag
from topo_compiler.runtime import nonzero_or_one

__all__ = ["CandidateView", "view_candidate", "SHAREABLE_KINDS",
           "share_key", "Selection", "rebuild_selection", "weighted_sum",
           "make_out_of_place", "remove_replaced"]

SHAREABLE_KINDS = (Kind.CONV, Kind.LINEAR, Kind.NORM, Kind.ACT, Kind.POOL, Kind.MODULE)
"""Basic modules the sharing passes may compute once (dropout is stochastic: two dropouts of
one input are not the same function)."""


def share_key(node: IRNode, compare_buffers: bool = False) -> tuple | None:
    """What makes two basic modules "the same module" (None: never shared).

    Same canonical op and hyperparameters, and the very same learnable parameters (none for
    ReLU, pools and ``BatchNorm(affine=False)``).  Buffers such as BN running statistics are
    state: in training they do not change the output, so the paper's form shares modules
    whatever their state; ``compare_buffers`` (the exact form) also needs the very same
    buffers, since eval-mode outputs read them and every module's buffers must keep being
    updated.
    """
    if node.kind not in SHAREABLE_KINDS or node.opcode == "get_attr":
        return None
    if compare_buffers:
        return node.desc.signature + (node.desc.state,)
    return node.desc.signature  # canonical: F.relu(x), x.relu() and nn.ReLU() agree


@dataclasses.dataclass(frozen=True)
class CandidateView:
    """A candidate seen as basic modules: its leading and trailing modules, and its chain.

    ``lead`` is the single node that reads the mixed op's input (if there is exactly one and
    it reads nothing else); ``trail`` is the candidate's output when it is a basic module with
    one data input ``trail_input``; ``chain`` lists the branch's nodes in order when the branch
    is a simple chain (each node feeds the next), else None.
    """

    candidate: Candidate
    index: int
    lead: str | None
    trail: str | None
    trail_input: str | None
    chain: tuple[str, ...] | None


def is_data(node: IRNode) -> bool:
    """Whether a node holds data: a tensor that is neither a parameter, a weight, nor kernel
    arithmetic (a normalized kernel is a parameter the graph computes)."""
    return node.opcode != "get_attr" and isinstance(node.val, torch.Tensor) and \
        not node.notes.is_weight and node.notes.role is not Role.KERNEL


def data_inputs(ir: SupernetIR, name: str) -> list[str]:
    """Inputs that are data (see :func:`is_data`): what a node computes on."""
    return [r for r in ir.node(name).inputs if is_data(ir.node(r))]


def view_candidate(ir: SupernetIR, op: MixedOp, index: int) -> CandidateView:
    cand = op.candidates[index]
    branch = set(cand.branch)
    if cand.kind != "op" or not branch:
        return CandidateView(cand, index, None, None, None, None)
    readers = [n for n in cand.branch if op.input in ir.node(n).inputs]
    lead = None
    if len(readers) == 1 and data_inputs(ir, readers[0]) == [op.input] and \
            share_key(ir.node(readers[0])) is not None:
        lead = readers[0]
    trail = trail_input = None
    out = cand.output
    if out in branch and share_key(ir.node(out)) is not None:
        ins = data_inputs(ir, out)
        if len(ins) == 1:
            trail, trail_input = out, ins[0]
    chain = _chain(ir, op.input, cand, lead)
    return CandidateView(cand, index, lead, trail, trail_input, chain)


def _chain(ir: SupernetIR, x: str, cand: Candidate, lead: str | None) -> tuple[str, ...] | None:
    """The branch's data nodes in order if they form a simple chain from ``x``."""
    if lead is None:
        return None
    chain, current = [lead], lead
    data_nodes = {n for n in cand.branch
                  if ir.node(n).opcode != "get_attr" and ir.node(n).kind is not Kind.SHAPE
                  and isinstance(ir.node(n).val, torch.Tensor)}
    while current != cand.output:
        users = [u for u in ir.users(current) if u in data_nodes]
        if len(users) != 1 or data_inputs(ir, users[0]) != [current]:
            return None
        current = users[0]
        chain.append(current)
    return tuple(chain) if set(chain) == data_nodes else None


# --------------------------------------------------------------------------------------
# Building selections
# --------------------------------------------------------------------------------------

def weight_node(ir: SupernetIR, op: MixedOp, index: int, tag: Tag) -> str:
    """The node holding candidate ``index``'s weight (a getitem for the stack forms)."""
    ref = op.candidates[index].weight
    if ref.index is None:
        return ref.node
    # one element, no dimensions: w.view(-1, 1, 1, 1, 1)[i] would broadcast what it scales
    vector = ir.node(ref.node).val
    item = (ref.index,) + (0,) * (vector.dim() - 1) if vector.dim() > 1 else ref.index
    return ir.add_node("call_function", operator.getitem, (Ref(ref.node), item),
                       origin=tag.origin, notes=tag.notes(role=Role.WEIGHT)).name


def weighted_sum(ir: SupernetIR, terms: Sequence[tuple[str | None, str]], tag: Tag,
                 name: str = "selection", role: Role | None = None) -> str:
    """``sum_i w_i * y_i`` as mul and add nodes (a None weight means weight 1); the new
    nodes get ``role``."""
    products = []
    for w, y in terms:
        if w is None:
            products.append(y)
        else:
            products.append(ir.add_node("call_function", operator.mul, (Ref(w), Ref(y)),
                                        origin=tag.origin, notes=tag.notes(role=role)).name)
    acc = products[0]
    for p in products[1:]:
        acc = ir.add_node("call_function", operator.add, (Ref(acc), Ref(p)),
                          origin=tag.origin, notes=tag.notes(role=role), name=name).name
    return acc


@dataclasses.dataclass(frozen=True)
class Selection:
    """Weights of a group S: ``w_S`` and, per member, the weight its inner selection uses
    (``w'_i`` in the paper's form; the raw ``w_i`` in the division-free form)."""

    group_weight: str | None
    """``w_S``; None in the division-free form (the group's term is not rescaled)."""
    member_weights: tuple[str, ...]


def group_selection(ir: SupernetIR, op: MixedOp, members: Sequence[int], division_free: bool,
                    tag: Tag) -> Selection:
    """Eq. 7-8 weights for ``members`` (``division_free``: the raw weights and no ``w_S``,
    which equals the original for every weight, including weights that sum to zero)."""
    raw = [weight_node(ir, op, i, tag) for i in members]
    if division_free:
        return Selection(None, tuple(raw))
    group_notes = tag.notes(role=Role.GROUP_WEIGHT)
    group = weighted_sum(ir, [(None, w) for w in raw], tag, name="w_group",
                         role=Role.GROUP_WEIGHT)
    if len(raw) == 1:
        group = ir.add_node("call_function", operator.pos, (Ref(group),), origin=tag.origin,
                            notes=group_notes, name="w_group").name
    denominator = ir.add_node("call_function", nonzero_or_one, (Ref(group),),
                              origin=tag.origin, notes=group_notes, name="w_group_safe").name
    ratios = tuple(
        ir.add_node("call_function", operator.truediv, (Ref(w), Ref(denominator)),
                    origin=tag.origin, notes=tag.notes(role=Role.CONDITIONAL_WEIGHT),
                    name="w_cond").name
        for w in raw)
    return Selection(group, ratios)


def rebuild_selection(ir: SupernetIR, op: MixedOp, members: Sequence[int],
                      group_out: str | None, selection: Selection | None, tag: Tag) -> str:
    """Replace the terms of ``members`` in ``op`` by one term ``w_S * group_out`` (Eq. 4),
    or by nothing when ``group_out`` is None (the members contribute zero).

    The other candidates keep their weights; the summing nodes are rebuilt in candidate
    order and the old ones removed (a zero slot of a stack goes with them: its term is
    exactly zero).  Returns the new output node of the mixed op.
    """
    members = set(members)
    first = min(members)
    terms: list[tuple[str | None, str]] = []
    for i, cand in enumerate(op.candidates):
        if i == first and group_out is not None:
            terms.append((selection.group_weight, group_out))
        elif i not in members and not cand.slot:  # a zero slot's term is exactly zero
            terms.append((weight_node(ir, op, i, tag), cand.output))
    new_out = weighted_sum(ir, terms, tag, name="mixed")
    ir.replace_all_uses(op.output, new_out)
    ir.remove_dead(list(op.sum_nodes))
    return new_out


def make_out_of_place(ir: SupernetIR, name: str) -> None:
    """An in-place module or function that now feeds shared data computes out of place.

    Sharing can make one in-place ReLU read a tensor other candidates still read; its
    out-of-place form computes the same function without clobbering that tensor.
    """
    node = ir.node(name)
    if not node.desc.inplace:
        return
    if node.opcode == "call_module":
        clone = copy.copy(ir.modules[node.target])
        clone.inplace = False
        ir.set_target(name, f"{node.target}_out_of_place", module=clone)
    elif node.opcode == "call_method" and str(node.target).endswith("_"):
        ir.set_target(name, str(node.target)[:-1])
    elif "inplace" in node.kwargs:
        ir.set_args(name, node.args, {**node.kwargs, "inplace": False})


def remove_replaced(ir: SupernetIR, names: Sequence[str]) -> None:
    """Remove the modules a rewrite replaced by a shared one, and what only they read.

    ``remove_dead`` keeps in-place nodes (their mutation may be what a later reader sees),
    but a replaced module's readers all read the shared module now: left in the graph, an
    in-place one would still clobber its input, which the new selections read.
    """
    for name in reversed(list(names)):
        if name in ir and not ir.users(name):
            preds = ir.node(name).inputs
            ir.remove_node(name)
            ir.remove_dead(preds)
