"""Partial module sharing (``pms``): siblings and common children (paper 3.2.1, Eq. 3-10).

Candidates in a group S that start with the same module h (siblings) and/or end with the
same module g (common child) are rewritten as two cascaded selections::

    before:  sum_{i in S} w_i * g(u_i(h(x)))  +  sum_{j in U} w_j * o_j(x)
    after:   w_S * g( sum_{i in S} w'_i * u_i(h(x)) )  +  sum_{j in U} w_j * o_j(x)   (4, 10)

with ``w_S = sum_{i in S} w_i`` and ``w'_i = w_i / w_S`` derived from the original weights
(Eq. 7-8); h and g are computed once.  The inner sum is itself a mixed op (over ``h(x)``),
which later rounds simplify again (Alg. 1).

Which group: every group of >= 2 candidates that shares a leading module, a trailing module,
or both is a candidate rewrite; the pass takes the one that removes the most basic modules
(``(|S| - 1)`` per shared module), breaking ties by the larger group, then by sharing both
ends, then by candidate order.  On a DARTS edge the four convolutions share their ReLU and BN
(6 modules removed) rather than all six parametric-or-pooling candidates sharing their BN (5);
the next round then shares the BN of the pools and the convolution group.  A group joins
only tensors of one shape and dtype: shared leading modules give one, and the inputs the inner
selection sums (the trailing modules' inputs) must agree -- "the same" ReLU after a 24- and a
48-channel tensor is no common child.

Exactness:

* sharing h (siblings) is always exact -- the h's compute the same function of the same x;
* sharing g is exact only when g is linear whatever the mode (the same bias-free convolution
  or linear layer, or average pooling): ``sum_i w_i g(y_i) = g(sum_i w_i y_i)``.  BatchNorm is
  affine in eval mode only; train/eval is decided at run time, so ``exact=True`` never shares
  it.  In the default (paper) mode g is shared whenever the g's are the same module; a
  trailing BatchNorm in training mode then sees the mixture's batch statistics, which is the
  topology the paper searches on purpose.

``exact=True`` also uses the division-free form ``g(sum_{i in S} w_i u_i(h(x)))`` (no ``w_S``,
no ``w'``), which equals the original for every weight, including weights that sum to zero.
"""

from __future__ import annotations

import dataclasses

from topo_compiler.analysis import MixedOp, tensor_meta
from topo_compiler.descriptors import Kind
from topo_compiler.ir import Shared, SupernetIR
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes import mixed_op_driver as driver
from topo_compiler.passes.selection import (CandidateView, group_selection, make_out_of_place,
                                            rebuild_selection, remove_replaced, share_key,
                                            view_candidate, weighted_sum)

__all__ = ["PartialModuleSharing", "SharingPlan", "match_pms"]

_LINEAR_IN_EVERY_MODE = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "identity"}


@dataclasses.dataclass(frozen=True)
class SharingPlan:
    """A PMS match: the group S and which ends of its candidates are shared."""

    members: tuple[int, ...]
    share_lead: bool
    share_trail: bool
    removed: int
    """Basic modules the rewrite removes."""

    def describe(self, op: MixedOp) -> str:
        ends = " and ".join(e for e, on in (("leading", self.share_lead),
                                             ("trailing", self.share_trail)) if on)
        return (f"{driver.display_name(op)}: candidates {list(self.members)} share their "
                f"{ends} module "
                f"({self.removed} modules removed)")


def _trail_is_exact(view: CandidateView, ir: SupernetIR) -> bool:
    node = ir.node(view.trail)
    if node.desc.op in _LINEAR_IN_EVERY_MODE:
        return True
    return node.kind in (Kind.CONV, Kind.LINEAR) and node.desc.hparam("bias") is False


def match_pms(ir: SupernetIR, op: MixedOp, exact: bool) -> SharingPlan | None:
    """The best sibling / common-child group of ``op``, or None (never edits the IR)."""
    views = [view_candidate(ir, op, i) for i in range(len(op.candidates))]
    lead_groups: dict[tuple, list[int]] = {}
    trail_groups: dict[tuple, list[int]] = {}
    for v in views:
        if v.lead is not None:
            # one computation of h stands for all: same function, same shape and dtype out
            key = (share_key(ir.node(v.lead), compare_buffers=exact), tensor_meta(ir, v.lead))
            lead_groups.setdefault(key, []).append(v.index)
        # a one-module candidate (lead == trail) can join a sibling group only
        if v.trail is not None and v.trail != v.lead and \
                (not exact or _trail_is_exact(v, ir)):
            # the inner selection sums the trail inputs: they must agree in shape and dtype
            key = (share_key(ir.node(v.trail), compare_buffers=exact),
                   tensor_meta(ir, v.trail_input), tensor_meta(ir, v.trail))
            trail_groups.setdefault(key, []).append(v.index)
    options: list[SharingPlan] = []
    for members in lead_groups.values():
        options.append(SharingPlan(tuple(members), True, False, len(members) - 1))
    for members in trail_groups.values():
        options.append(SharingPlan(tuple(members), False, True, len(members) - 1))
    for lead_members in lead_groups.values():
        for trail_members in trail_groups.values():
            both = tuple(i for i in lead_members if i in trail_members)
            options.append(SharingPlan(both, True, True, 2 * (len(both) - 1)))
    options = [o for o in options if len(o.members) >= 2]
    if not options:
        return None
    return max(options, key=lambda o: (o.removed, len(o.members), o.share_lead and o.share_trail,
                                       [-i for i in o.members]))


def rewrite_pms(ir: SupernetIR, op: MixedOp, plan: SharingPlan, exact: bool) -> str:
    """Apply ``plan`` to ``op`` (Eq. 4-10); returns the new output node of the mixed op."""
    tag = driver.tag_for(ir, op, "pms")
    views = [view_candidate(ir, op, i) for i in plan.members]
    z = op.input
    if plan.share_lead:
        shared = views[0].lead
        for v in views[1:]:
            ir.replace_all_uses(v.lead, shared)
            ir.remove_node(v.lead)
        ir.annotate(shared, shared=Shared.SIBLING)
        make_out_of_place(ir, shared)
        z = shared
    # what each member's inner selection picks: u_i(h(x)), or the candidate output
    picks = []
    for v in views:
        if plan.share_trail:
            y = v.trail_input
            if plan.share_lead and y == v.lead:
                y = z
            picks.append(y)
        elif plan.share_lead and v.candidate.output == v.lead:
            picks.append(z)
        else:
            picks.append(v.candidate.output)
    selection = group_selection(ir, op, plan.members, division_free=exact, tag=tag)
    inner = weighted_sum(ir, list(zip(selection.member_weights, picks)), tag, name="inner")
    group_out = inner
    if plan.share_trail:
        g = ir.node(views[0].trail)
        group_out = ir.add_node(g.opcode, g.target,
                                driver.swap_input(g.args, views[0].trail_input, inner),
                                g.kwargs, origin="pms", module_path=g.module_path,
                                notes=tag.notes(shared=Shared.COMMON_CHILD),
                                source=g.source).name
        make_out_of_place(ir, group_out)
    new_out = rebuild_selection(ir, op, plan.members, group_out, selection, tag)
    if plan.share_trail:
        remove_replaced(ir, [v.trail for v in views])
    return new_out


@dataclasses.dataclass(frozen=True)
class PartialModuleSharing(Pass):
    """``pms``: share leading (sibling) and trailing (common child) modules of candidates."""

    name = "pms"
    visit_seed: int | None = None
    """Visit mixed ops in a seeded random order (the result must not depend on it)."""

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        return driver.run_on_mixed_ops(
            ir, ctx, lambda op: match_pms(ir, op, ctx.exact),
            lambda op, plan: rewrite_pms(ir, op, plan, ctx.exact),
            driver.shuffled(self.visit_seed))
