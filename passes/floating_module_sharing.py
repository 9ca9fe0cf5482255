"""Floating module sharing (``fms``): double-stacked candidates (paper 3.2.2, Eq. 11-13).

Candidates in a group F that are chains ``b_i(f(a_i(x)))`` with the same *floating* module
f between two non-empty halves become two cascaded selections sharing the architecture
weights, with f computed once::

    before:  sum_{i in F} w_i * b_i(f(a_i(x)))                                      (11)
    after:   y   = sum_{i in F} w'_i * a_i(x)                                        (12)
             out = w_F * sum_{i in F} w'_i * b_i(f(y))                               (13)

``w_F = sum_{i in F} w_i`` and ``w'_i = w_i / w_F`` as in PMS.  On a DARTS edge the two
separable convolutions (ReLU-dw-pw-BN-ReLU-dw-pw-BN) share the BN-ReLU between their halves.
Both selections are now next to weighted sums, so their convolutions can be merged.

f is the longest run of basic modules that two or more candidates have strictly inside their
chain; among runs the pass takes the one removing the most modules, ``(|F| - 1) * len(f)``,
then the longer run, then the larger group, then the earliest candidates.  Members must agree
in the shape and dtype of every tensor the rewrite joins (``a_i(x)``, f's output and the
candidate's output): MBConv candidates with expand ratios 3 and 6 share a floating ReLU6 among
themselves, never across ratios.

Exact only at the vertices of the simplex (one-hot weights), by the paper's design: products
of weights appear.  ``exact=True`` therefore never applies it.
"""

from __future__ import annotations

import dataclasses

from topo_compiler.analysis import MixedOp, tensor_meta
from topo_compiler.ir import Shared, SupernetIR
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes import mixed_op_driver as driver
from topo_compiler.passes.selection import (group_selection, rebuild_selection, remove_replaced,
                                            share_key, view_candidate, weighted_sum)

__all__ = ["FloatingModuleSharing", "FloatingPlan", "match_fms"]


@dataclasses.dataclass(frozen=True)
class FloatingPlan:
    """An FMS match: the group F and where its floating module sits in each chain."""

    members: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    """Per member, the floating module's [start, stop) positions in its chain."""
    length: int
    removed: int

    def describe(self, op: MixedOp) -> str:
        return (f"{driver.display_name(op)}: candidates {list(self.members)} share a floating "
                f"module of {self.length} ({self.removed} modules removed)")


def match_fms(ir: SupernetIR, op: MixedOp, exact: bool) -> FloatingPlan | None:
    """The best floating module of ``op``'s chains, or None (never edits the IR)."""
    if exact:
        return None
    runs: dict[tuple, dict[int, int]] = {}
    for i in range(len(op.candidates)):
        chain = view_candidate(ir, op, i).chain
        if chain is None or len(chain) < 3:
            continue
        keys = [share_key(ir.node(n)) for n in chain]
        for start in range(1, len(chain) - 1):
            for stop in range(start + 1, len(chain)):
                run = tuple(keys[start:stop])
                if None in run:
                    break
                # the two selections sum a_i(x) and b_i(f(y)), and f's output replaces the
                # others': every joined tensor must agree in shape and dtype
                joins = (tensor_meta(ir, chain[start - 1]), tensor_meta(ir, chain[stop - 1]),
                         tensor_meta(ir, chain[-1]))
                runs.setdefault((run, joins), {}).setdefault(i, start)  # first occurrence
    options = []
    for (run, _), where in runs.items():
        if len(where) < 2:
            continue
        members = tuple(sorted(where))
        spans = tuple((where[i], where[i] + len(run)) for i in members)
        options.append(FloatingPlan(members, spans, len(run),
                                    (len(members) - 1) * len(run)))
    if not options:
        return None
    return max(options, key=lambda o: (o.removed, o.length, len(o.members),
                                       [-i for i in o.members]))


def rewrite_fms(ir: SupernetIR, op: MixedOp, plan: FloatingPlan) -> str:
    """Apply ``plan`` (Eq. 12-13); returns the new output node of the mixed op."""
    tag = driver.tag_for(ir, op, "fms")
    chains = [view_candidate(ir, op, i).chain for i in plan.members]
    selection = group_selection(ir, op, plan.members, division_free=False, tag=tag)
    # first selection (12): y = sum w'_i a_i(x), a_i = chain[:start]
    firsts = [(w, chain[start - 1]) for w, chain, (start, _) in
              zip(selection.member_weights, chains, plan.spans)]
    y = weighted_sum(ir, firsts, tag, name="first_selection")
    # the floating module: the first member's run, now reading y; the others' runs go away
    keep_chain, (keep_start, keep_stop) = chains[0], plan.spans[0]
    head = keep_chain[keep_start]
    ir.set_args(head, driver.swap_input(ir.node(head).args, keep_chain[keep_start - 1], y),
                driver.swap_input(ir.node(head).kwargs, keep_chain[keep_start - 1], y))
    z = keep_chain[keep_stop - 1]
    for name in keep_chain[keep_start:keep_stop]:
        ir.annotate(name, shared=Shared.FLOATING)
    for chain, (start, stop) in zip(chains[1:], plan.spans[1:]):
        ir.replace_all_uses(chain[stop - 1], z)
    # second selection (13): sum w'_i b_i(f(y)), b_i = chain[stop:]
    seconds = [(w, chain[-1]) for w, chain in zip(selection.member_weights, chains)]
    out = weighted_sum(ir, seconds, tag, name="second_selection")
    new_out = rebuild_selection(ir, op, plan.members, out, selection, tag)
    for chain, (start, stop) in zip(chains[1:], plan.spans[1:]):
        remove_replaced(ir, chain[start:stop])
    return new_out


@dataclasses.dataclass(frozen=True)
class FloatingModuleSharing(Pass):
    """``fms``: compute a floating module between two stacked halves once."""

    name = "fms"
    visit_seed: int | None = None
    """Visit mixed ops in a seeded random order (the result must not depend on it)."""

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        if ctx.exact:
            return False
        return driver.run_on_mixed_ops(ir, ctx, lambda op: match_fms(ir, op, ctx.exact),
                                       lambda op, plan: rewrite_fms(ir, op, plan),
                                       driver.shuffled(self.visit_seed))
