"""The mixed-op driver every rewrite of mixed ops uses (not a pass): match every mixed op,
rewrite the outermost.

A pass run finds the mixed ops afresh, asks the pass's matcher for a plan on each (matching
never edits), and rewrites every mixed op that has a plan and is not nested inside another
mixed op that has one.  Nested mixed ops wait for the next round of the pass manager's fixed
point.  Plans depend only on the structure of their own mixed op and the rewritten mixed ops
are disjoint, so the result does not depend on the order in which mixed ops are visited.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

from topo_compiler import naming
from topo_compiler.analysis import MixedOp, find_mixed_ops, mixed_op_at
from topo_compiler.descriptors import Ref
from topo_compiler.ir import NodeNotes, SupernetIR, map_refs
from topo_compiler.pass_manager import PassContext

__all__ = ["run_on_mixed_ops", "Tag", "tag_for", "swap_input", "display_name", "shuffled"]


@dataclasses.dataclass(frozen=True)
class Tag:
    """Who makes the nodes of a rewrite (the pass's name) and for which edge of the input."""

    origin: str
    mixed_op: str | None = None

    def notes(self, **fields: Any) -> NodeNotes:
        """Notes for a new node: this tag's edge plus ``fields``."""
        return NodeNotes(mixed_op=self.mixed_op, **fields)


def tag_for(ir: SupernetIR, op: MixedOp, origin: str) -> Tag:
    """The tag for the nodes a rewrite of ``op`` creates."""
    return Tag(origin, ir.node(op.output).notes.mixed_op)


def shuffled(seed: int | None) -> Callable[[list[MixedOp]], list[MixedOp]] | None:
    """A seeded random visiting order (None: program order)."""
    if seed is None:
        return None
    rng = random.Random(seed)
    return lambda ops: rng.sample(ops, len(ops))


def display_name(op: MixedOp) -> str:
    """``edge over input``: which edge of the network, and which (possibly nested) selection."""
    return f"{op.name} over {op.input}"


def swap_input(args: Any, old: str, new: str) -> Any:
    """``args`` with every reference to ``old`` replaced by ``new``."""
    return map_refs(args, lambda r: Ref(new) if r.name == old else r)


def run_on_mixed_ops(ir: SupernetIR, ctx: PassContext,
                     match: Callable[[MixedOp], Any | None],
                     rewrite: Callable[[MixedOp, Any], str],
                     visit_order: Callable[[list[MixedOp]], list[MixedOp]] | None = None,
                     nested: bool = False) -> bool:
    """Rewrite the outermost mixed ops that ``match`` finds a plan for; True if any.

    ``nested=True`` rewrites nested mixed ops in the same run too (for rewrites that only
    touch a selection's own candidates and sums, such as merging).
    """
    ops = find_mixed_ops(ir)
    if visit_order is not None:
        ops = visit_order(ops)
    plans = [(op, plan) for op in ops if (plan := match(op)) is not None]
    regions = {op.output: set(op.nodes) for op, _ in plans}
    outermost = [(op, plan) for op, plan in plans
                 if nested or not any(op.output in nodes for out, nodes in regions.items()
                                      if out != op.output)]
    changed = False
    for op, _ in outermost:
        # an earlier rewrite may have renamed this op's input (the previous edge's output)
        op = mixed_op_at(ir, op.output, op.name)
        plan = match(op) if op is not None else None
        if plan is not None:
            names = naming.candidate_names(ir, op, plan.members)  # before the rewrite
            kind, where, edge = plan.kind(names), naming.where(ir, op), naming.edge_of(ir, op)
            rewrite(op, plan)
            ctx.decide(f"{where}: {kind} ({plan.detail()})", kind=kind, mixed_op=edge,
                       removed=plan.removed)
            changed = True
    return changed
