"""Reparameterization (``merge``): linear candidates of a selection become one convolution
(paper 3.4, Eq. 14-16, after MergeNAS).

After PMS and FMS the remaining unique parts of the candidates sit right next to weighted
sums.  Where they are linear -- convolutions of any kernel size, dilation or grouping (with or
without bias), depthwise-then-pointwise pairs, identity, zero, average pooling, the linear
core of DARTS's FactorizedReduce -- their weighted sum is one convolution::

    sum_i w_i (K_i * z) + b_i  =  (sum_i w_i pad(K_i)) * z + sum_i w_i b_i            (14)

``pad`` puts each kernel into a common frame centred on the output's anchor, dilated taps at
their offsets; identity is a Dirac kernel, average pooling a uniform one, zero drops out.  The
merged kernel is rebuilt from the current weights on every forward (never cached).

There is more than one exact way to merge, and the cheapest depends on channels and kernel
sizes, so a cost model decides (:mod:`~topo_compiler.passes.merge_cost`): for the real shapes
it estimates the FLOPs, the activation bytes autograd keeps and the memory traffic of one
training step (forward and backward), and a step time from them with a per-device roofline
(:data:`~topo_compiler.passes.merge_cost.DEVICES`).  Options:

* ``dense``: one ``C_out x C_in`` kernel -- keeps nothing but the input, costly in FLOPs
  when channels are many and kernels large;
* ``depthwise``: every candidate is per-channel (depthwise conv, identity, pooling): one
  depthwise kernel, the cheapest;
* ``separable``: depthwise kernels stacked into one grouped conv, then one pointwise conv
  whose kernel carries the weights (``W[o, c n + i] = w_i P_i[o, c]``);
* ``folded``: each candidate keeps its convolutions but its weight is folded into its last
  kernel (``w_i * conv(z, K) = conv(z, w_i K)``): the same FLOPs as keeping them apart,
  without the products of full tensors nor the outputs they keep for the weights' gradients;
* ``apart``: keep the candidates as they are.

A subset of the linear candidates may be merged and the rest kept apart (greedy: drop the
candidate whose removal lowers the cost most).  A merge is taken only when its estimated
step time and its saved bytes are both no worse than keeping the candidates apart: merging
never makes the step costlier.  The report states each decision and its estimate.

Exactness: merging is exact, except average pooling with ``count_include_pad=False`` (DARTS's
choice), whose divisor shrinks at the borders: that pool is merged in the paper's mode only,
and the decision says so.  Candidates with different strides or outputs that do not align
(asymmetric frames) are never merged together, nor is a candidate whose output differs in
shape or dtype from the mixed op's (one the sum broadcasts).  When two or more linear
candidates stay apart, the decision says why, with the cost model's estimates.

Linear candidates are recognized in :mod:`~topo_compiler.passes.linear_candidates`; folding
an architecture weight into the single convolution or BatchNorm computing its term is the
``fold`` pass (:mod:`~topo_compiler.passes.weight_folding`), which runs after this one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch

from topo_compiler import runtime
from topo_compiler.analysis import MixedOp, tensor_meta
from topo_compiler.descriptors import Ref
from topo_compiler.ir import SupernetIR
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes import mixed_op_driver as driver
from topo_compiler.passes.linear_candidates import (CONV, KernelBuilder, LinearCandidate,
                                                    functional_conv, linear_candidate,
                                                    scaled_conv)
from topo_compiler.passes.merge_cost import (DEVICES, DeviceModel, Estimate, FormChoice, Shapes,
                                             apart, best_form, forms_for, mergeable,
                                             shapes_of)
from topo_compiler.passes.mixed_op_driver import Tag
from topo_compiler.passes.selection import group_selection, rebuild_selection, weighted_sum

__all__ = ["Reparameterization", "MergePlan", "match_merge", "rewrite_merge", "FORMS"]

FORMS = ("dense", "depthwise", "separable", "folded")
"""The merge forms ``form=`` can force."""


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A merge: which linear candidates, in which form, on which frame, and why."""

    members: tuple[int, ...]
    form: str
    frame: tuple[int, ...]
    frame_dilation: tuple[int, ...]
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    candidates: tuple[LinearCandidate, ...]
    estimate: str
    inexact: tuple[str, ...]

    def describe(self, op: MixedOp) -> str:
        if self.form == "drop":
            return (f"{driver.display_name(op)}: dropped {len(self.members)} zero "
                    f"candidate(s) ({self.estimate})")
        what = ", ".join(c.label for c in self.candidates)
        k = "x".join(str(f) for f in self.frame)
        d = "" if all(v == 1 for v in self.frame_dilation) else \
            f" d{'x'.join(map(str, self.frame_dilation))}"
        note = f"; {', '.join(self.inexact)} merged in the paper's mode only (exact in the " \
               f"interior)" if self.inexact else ""
        return (f"{driver.display_name(op)}: merged {len(self.members)} candidates "
                f"[{what}] into one {self.form} {k}{d} conv ({self.estimate}){note}")


def match_merge(ir: SupernetIR, op: MixedOp, exact: bool, device: DeviceModel,
                form: str | None = None, batch: int | None = None,
                why: list[str] | None = None) -> MergePlan | None:
    """The cheapest merge of ``op``'s linear candidates, or None (never edits the IR).

    ``form`` forces one form (see :class:`Reparameterization`) and skips the cost model:
    every linear candidate is merged when the form applies.  ``why`` collects one line per
    declined merge of two or more linear candidates (the cost model's estimates).
    """
    out = ir.node(op.output).val
    if not isinstance(out, torch.Tensor) or not isinstance(ir.node(op.input).val, torch.Tensor):
        return None
    want = tensor_meta(ir, op.output)
    # one convolution computes them all: each live candidate must give the op's own shape
    # and dtype (a candidate broadcast by the sum, or computing in another dtype, stays)
    linear = [lc for i, cand in enumerate(op.candidates)
              if (lc := linear_candidate(ir, op, i, exact)) is not None and
              (lc.zero or tensor_meta(ir, cand.output) == want)]
    sh = shapes_of(ir, op, device)
    if batch is not None:
        sh = dataclasses.replace(sh, batch=batch)
    reasons: list[str] = []
    plan = _merge_plan(linear, sh, form, reasons) if len(linear) >= 2 else None
    if why is not None and plan is None:
        why.extend(f"{driver.display_name(op)}: kept {r}" for r in reasons)
    zeros = tuple(c for c in linear if c.zero and (plan is None or c.index not in plan.members))
    if zeros and plan is not None:
        return dataclasses.replace(plan, members=plan.members + tuple(c.index for c in zeros),
                                   candidates=plan.candidates + zeros)
    if zeros and len(zeros) < len(op.candidates):
        # w * (x * 0) adds nothing and has zero gradient: the term goes (exact for finite x)
        return MergePlan(tuple(c.index for c in zeros), "drop", (), (), (), (), zeros,
                         "a zero candidate adds nothing", ())
    return plan


class _GroupCost(NamedTuple):
    """Merging ``choice`` and keeping the other linear candidates apart (``rest``)."""

    seconds: float
    choice: FormChoice
    rest: Estimate


def _merge_plan(linear: list[LinearCandidate], sh: Shapes, form: str | None,
                why: list[str]) -> MergePlan | None:
    if form is not None:
        return _forced(linear, form)

    def score(group: list[LinearCandidate]) -> _GroupCost | None:
        best = best_form(group, sh)
        if best is None:
            return None
        rest = apart([c for c in linear if c not in group], sh)
        return _GroupCost(best.estimate.seconds + rest.seconds, best, rest)

    group = list(linear)
    current = score(group)
    improved = True
    while improved and len(group) > 2:
        improved = False
        for c in list(group):
            trial = score([g for g in group if g is not c])
            if trial is not None and (current is None or trial.seconds < current.seconds):
                group, current, improved = [g for g in group if g is not c], trial, True
    what = ", ".join(c.label for c in linear)
    if current is None:
        live = [c for c in linear if not c.zero]
        if len(live) >= 2 and any(p.learnable for c in live for p in c.pieces):
            why.append(f"[{what}] apart: no convolution computes them together (strides "
                       f"differ or their outputs do not align)")
        return None
    apart_all = apart(linear, sh)
    choice = current.choice
    total = choice.estimate + current.rest
    before = apart_all.seconds
    after = total.seconds
    if after > before or total.saved_bytes > apart_all.saved_bytes:
        why.append(f"[{what}] apart: est. step {before * 1e3:.3g} ms, saved "
                   f"{apart_all.saved_bytes / 1024:.3g} KiB apart vs {after * 1e3:.3g} ms, "
                   f"{total.saved_bytes / 1024:.3g} KiB with {len(group)} of them in one "
                   f"{choice.form} convolution")
        return None  # never merge when merging makes the step costlier
    estimate = (f"est. step time {100 * (after / before - 1):+.0f}%, saved bytes "
                f"{100 * (total.saved_bytes / max(apart_all.saved_bytes, 1) - 1):+.0f}%, "
                f"FLOPs {100 * (total.flops / max(apart_all.flops, 1) - 1):+.0f}%")
    inexact = tuple(c.label for c in group if not c.merges_exactly)
    stride = next(c.stride for c in group if not c.zero)
    frame = choice.frame
    return MergePlan(tuple(c.index for c in group), choice.form, frame.size, frame.dilation,
                     frame.padding, stride, tuple(group), estimate, inexact)


def _forced(linear: list[LinearCandidate], form: str) -> MergePlan | None:
    got = mergeable(linear)
    if got is None or form not in forms_for(got[0]):
        return None
    live, frame = got
    return MergePlan(tuple(c.index for c in linear), form, frame.size, frame.dilation,
                     frame.padding, live[0].stride, tuple(linear),
                     "form forced, cost model skipped",
                     tuple(c.label for c in linear if not c.merges_exactly))


def rewrite_merge(ir: SupernetIR, op: MixedOp, plan: MergePlan) -> str:
    """Replace the planned candidates by one merged convolution (Eq. 14-16)."""
    tag = driver.tag_for(ir, op, "merge")
    if plan.form == "drop":
        return rebuild_selection(ir, op, plan.members, None, None, tag)
    b = KernelBuilder(ir, op.input, tag, plan.frame, plan.frame_dilation)
    # the raw weights go into the kernel: sum_S w_i K_i = w_S sum_S w'_i K_i is the same
    # function, and without the product by w_S the conv output need not be kept for backward
    selection = group_selection(ir, op, plan.members, division_free=True, tag=tag)
    weights = dict(zip(plan.members, selection.member_weights))
    live = [c for c in plan.candidates if not c.zero]
    conv = CONV[len(plan.frame)]
    z = Ref(op.input)
    if plan.form == "folded":
        merged = _folded(ir, b, live, weights, tag)
        return rebuild_selection(ir, op, plan.members, merged, selection, tag)
    biases = [(weights[c.index], b.tensor(p.bias, learnable=False))
              for c in live for p in c.pieces if p.bias]  # KN leaves biases alone
    if plan.form == "separable":
        pieces = [(weights[c.index], p) for c in live for p in c.pieces]
        dw = b.call(runtime.stack_depthwise, [Ref(b.depthwise(p)) for _, p in pieces],
                    name="stacked_depthwise")
        C = live[0].pieces[0].in_channels
        pointwise = [Ref(b.tensor(p.pointwise)) if p.pointwise else
                     Ref(b.call(runtime.eye_pointwise, Ref(op.input), C, len(plan.frame),
                                name="eye")) for _, p in pieces]
        pw = b.call(runtime.stack_pointwise, [Ref(w) for w, _ in pieces], pointwise,
                    name="stacked_pointwise")
        mid = ir.add_node("call_function", conv, (z, Ref(dw)),
                          {"stride": plan.stride, "padding": plan.padding,
                           "dilation": plan.frame_dilation, "groups": C},
                          origin="merge", name="merged_depthwise",
                          notes=tag.notes(merged=tuple(c.label for c in plan.candidates),
                                          merge_form="separable (depthwise half)"))
        out_args = (Ref(mid.name), Ref(pw))
        out_kwargs: dict = {}
    else:
        if plan.form == "depthwise":
            ks = [(weights[c.index], b.depthwise(p)) for c in live for p in c.pieces]
            groups = live[0].pieces[0].in_channels
        else:
            ks = [(weights[c.index], b.dense(p)) for c in live for p in c.pieces]
            groups = 1
        kernel = b.call(runtime.weighted_kernel_sum, [Ref(w) for w, _ in ks],
                        [Ref(k) for _, k in ks], name="merged_kernel")
        out_args = (z, Ref(kernel))
        out_kwargs = {"stride": plan.stride, "padding": plan.padding,
                      "dilation": plan.frame_dilation, "groups": groups}
    if biases:
        bias = b.call(runtime.weighted_bias_sum, [Ref(w) for w, _ in biases],
                      [Ref(t) for _, t in biases], name="merged_bias")
        out_kwargs["bias"] = Ref(bias)
    merged = ir.add_node("call_function", conv, out_args, out_kwargs, origin="merge",
                         name="merged_conv",
                         notes=tag.notes(merged=tuple(c.label for c in plan.candidates),
                                         merge_form=plan.form, kernels=tuple(b.learnable),
                                         frame=plan.frame))
    if tuple(merged.val.shape) != tuple(ir.node(op.output).val.shape):
        raise AssertionError(f"merge of {op.name} produced {tuple(merged.val.shape)}, "
                             f"expected {tuple(ir.node(op.output).val.shape)}")
    return rebuild_selection(ir, op, plan.members, merged.name, selection, tag)


def _folded(ir: SupernetIR, b: KernelBuilder, live: Sequence[LinearCandidate],
            weights: dict[int, str], tag: Tag) -> str:
    """Each candidate keeps its convolutions, its weight folded into its last kernel
    (``w_i * conv(z, K) = conv(z, w_i K)``): no product of full tensors, nothing kept for
    the weight's gradient but what the convolutions keep anyway."""
    outs = []
    for c in live:
        (p,) = c.pieces
        first = len(b.learnable)
        data, stride, last = b.z, c.stride, p
        if p.structure == "separable":
            dw = dataclasses.replace(p, structure="depthwise", groups=p.in_channels)
            data = functional_conv(ir, b.z, b.tensor(p.kernel), None, c.stride, dw,
                                   origin="merge", name="folded_depthwise",
                                   notes=tag.notes(merged=(c.label,),
                                                   merge_form="folded (depthwise half)"))
            last = dataclasses.replace(p, kernel=p.pointwise, kernel_size=(1,) * len(c.stride),
                                       dilation=(1,) * len(c.stride),
                                       start=(0,) * len(c.stride), groups=1)
            stride = (1,) * len(c.stride)
        out = scaled_conv(b, data, weights[c.index], last.kernel, p.bias, stride, last,
                          name="folded_conv",
                          notes=tag.notes(merged=(c.label,), merge_form="folded",
                                          frame=p.kernel_size))
        ir.annotate(out, kernels=tuple(b.learnable[first:]))
        outs.append(out)
    return weighted_sum(ir, [(None, o) for o in outs], tag, name="folded_sum")


@dataclasses.dataclass(frozen=True)
class Reparameterization(Pass):
    """``merge``: merge the linear candidates of each selection into one convolution."""

    name = "merge"
    device: str | None = None
    """Cost model to use ('cpu', 'cuda'); default: the device of the example inputs."""
    batch: int | None = None
    """Batch size the cost model assumes (default: the example inputs'). Activations grow
    with it, merged kernels do not: compile with the training batch (tracing only uses
    shapes, so a large example batch costs nothing) or say it here."""
    form: str | None = None
    """Force one merge form ('dense', 'depthwise', 'separable', 'folded') instead of the
    cost model."""

    def __post_init__(self) -> None:
        # why: checked when the pipeline is built, not after the passes before this one ran
        if self.form is not None and self.form not in FORMS:
            raise ValueError(f"merge form {self.form!r}: choose {', '.join(FORMS[:-1])} "
                             f"or {FORMS[-1]}")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"merge device {self.device!r}: choose one of {sorted(DEVICES)}")

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        device = DEVICES.get(self.device or ir.device_type, DEVICES["cpu"])
        declined: list[str] = []
        changed = driver.run_on_mixed_ops(
            ir, ctx, lambda op: match_merge(ir, op, ctx.exact, device, self.form, self.batch,
                                            declined),
            lambda op, plan: rewrite_merge(ir, op, plan), nested=True)
        for line in dict.fromkeys(declined):
            ctx.decide(line)
        return changed
