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
sizes, so a cost model decides (:func:`estimate`): for the real shapes it estimates the FLOPs,
the activation bytes autograd keeps and the memory traffic of one training step (forward and
backward), and a step time from them with a per-device roofline (:data:`DEVICES`).  Options:

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
(asymmetric frames) are never merged together.
"""

from __future__ import annotations

import dataclasses
import math
from functools import reduce
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topo_compiler.analysis import MixedOp
from topo_compiler.descriptors import Kind, Ref
from topo_compiler.ir import IRNode, SupernetIR
from topo_compiler import runtime
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes import sharing
from topo_compiler.passes.selection import (data_inputs, group_selection, is_data,
                                            rebuild_selection, weighted_sum)

__all__ = ["Reparameterization", "MergePlan", "match_merge", "DEVICES", "DeviceModel",
           "functional_conv", "conv_piece"]


# --------------------------------------------------------------------------------------
# Linear candidates
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """One linear map inside a candidate: a kernel applied to the selection's input."""

    structure: str
    """'dense' (C_out x C_in / groups), 'depthwise' (C x 1) or 'separable' (depthwise then
    pointwise)."""
    kernel: tuple | None
    """Where the (depthwise) kernel comes from: ('module', target, 'weight') or ('node', name);
    None for a fixed kernel."""
    fixed: str | None
    """'identity' or 'avg_pool' for the kernels that have no parameters."""
    pointwise: tuple | None
    bias: tuple | None
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    start: tuple[int, ...]
    """Offset of the kernel's first tap from the output anchor (``-padding``)."""
    groups: int
    in_channels: int
    out_channels: int
    out_rows: tuple[int, int] | None = None
    """Output channels this piece writes (FactorizedReduce writes halves); None: all."""

    @property
    def learnable(self) -> bool:
        return self.kernel is not None

    def taps(self) -> list[tuple[int, ...]]:
        """Tap offsets from the anchor, per spatial dimension (first and last)."""
        return [(s, s + d * (k - 1)) for s, d, k in zip(self.start, self.dilation,
                                                         self.kernel_size)]


@dataclasses.dataclass(frozen=True)
class LinearCandidate:
    index: int
    pieces: tuple[Piece, ...]
    stride: tuple[int, ...] | None
    exact: bool
    label: str

    @property
    def zero(self) -> bool:
        return not self.pieces


def conv_piece(ir: SupernetIR, name: str) -> tuple[Piece, tuple[int, ...]] | None:
    """(piece, stride) of a convolution node, or None if it is not a plain zero-padded conv."""
    node = ir.node(name)
    desc = node.desc
    if node.kind is not Kind.CONV or desc.op.startswith("conv_transpose"):
        return None
    n = int(desc.op[-2])
    stride, dilation = desc.hparam("stride"), desc.hparam("dilation")
    groups, padding = desc.hparam("groups", 1), desc.hparam("padding")
    if node.opcode == "call_module":
        module = ir.modules[node.target]
        if module.padding_mode != "zeros":
            return None
        kernel = ("module", node.target, "weight")
        bias = ("module", node.target, "bias") if module.bias is not None else None
        ksize, c_in, c_out = tuple(module.kernel_size), module.in_channels, module.out_channels
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight, Ref):
            return None
        w = ir.node(weight.name).val
        kernel = ("node", weight.name)
        bias = ("node", bias_arg.name) if isinstance(bias_arg, Ref) else None
        if bias_arg is not None and bias is None:
            return None
        ksize, c_out, c_in = tuple(w.shape[2:]), w.shape[0], w.shape[1] * groups
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n
        elif all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, ksize)):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, ksize))
        else:
            return None
    structure = "depthwise" if groups == c_in == c_out else "dense"
    piece = Piece(structure, kernel, None, None, bias, ksize, tuple(dilation),
                  tuple(-p for p in padding), groups, c_in, c_out)
    return piece, tuple(stride)


def _pool_piece(ir: SupernetIR, name: str, exact: bool) -> tuple[Piece, tuple, bool] | None:
    desc = ir.node(name).desc
    if not desc.op.startswith("avg_pool") or desc.hparam("ceil_mode") or \
            desc.hparam("divisor_override") is not None:
        return None
    k, s, p = desc.hparam("kernel_size"), desc.hparam("stride"), desc.hparam("padding")
    include_pad = desc.hparam("count_include_pad", True)
    if exact and not include_pad and any(pi > 0 for pi in p):
        return None  # the border divisor shrinks: not a convolution
    C = ir.node(name).val.shape[1]
    piece = Piece("depthwise", None, "avg_pool", None, None, tuple(k), (1,) * len(k),
                  tuple(-pi for pi in p), C, C, C)
    return piece, tuple(s), bool(include_pad) or not any(pi > 0 for pi in p)


def linear_candidate(ir: SupernetIR, op: MixedOp, index: int,
                     exact: bool) -> LinearCandidate | None:
    """The candidate as linear pieces, or None when it is not linear (never edits)."""
    cand = op.candidates[index]
    z = ir.node(op.input)
    if z.val is None or not isinstance(z.val, torch.Tensor) or z.val.dim() < 3:
        return None
    spatial = z.val.dim() - 2
    if cand.kind == "zero":
        return LinearCandidate(index, (), None, True, "zero")
    data = [n for n in cand.branch
            if is_data(ir.node(n)) and ir.node(n).kind is not Kind.IDENTITY]
    C = z.val.shape[1]
    if cand.kind == "identity" or not data:
        if tuple(ir.node(cand.output).val.shape) != tuple(z.val.shape):
            return None
        piece = Piece("depthwise", None, "identity", None, None, (1,) * spatial,
                      (1,) * spatial, (0,) * spatial, C, C, C)
        return LinearCandidate(index, (piece,), (1,) * spatial, True, "identity")
    kinds = [ir.node(n).kind for n in data]
    if len(data) == 1 and kinds[0] is Kind.CONV:
        got = conv_piece(ir, data[0])
        if got is None or data_inputs(ir, data[0]) != [op.input]:
            return None
        return LinearCandidate(index, (got[0],), got[1], True, ir.node(data[0]).desc.label())
    if len(data) == 1 and kinds[0] is Kind.POOL:
        got = _pool_piece(ir, data[0], exact)
        if got is None or data_inputs(ir, data[0]) != [op.input]:
            return None
        return LinearCandidate(index, (got[0],), got[1], got[2], ir.node(data[0]).desc.label())
    if len(data) == 2 and kinds == [Kind.CONV, Kind.CONV]:
        return _separable(ir, op, index, data)
    return _factorized_reduce(ir, op, index, data)


def _separable(ir, op, index, data) -> LinearCandidate | None:
    first, second = (conv_piece(ir, n) for n in data)
    if first is None or second is None or data_inputs(ir, data[0]) != [op.input] or \
            data_inputs(ir, data[1]) != [data[0]]:
        return None
    (dw, stride), (pw, pw_stride) = first, second
    if dw.structure != "depthwise" or pw.groups != 1 or any(k != 1 for k in pw.kernel_size) \
            or any(s != 1 for s in pw_stride) or any(s != 0 for s in pw.start) or \
            dw.bias is not None:
        return None
    piece = dataclasses.replace(dw, structure="separable", pointwise=pw.kernel, bias=pw.bias,
                                out_channels=pw.out_channels)
    label = f"{ir.node(data[0]).desc.label()} + {ir.node(data[1]).desc.label()}"
    return LinearCandidate(index, (piece,), stride, True, label)


def _factorized_reduce(ir, op, index, data) -> LinearCandidate | None:
    """``cat([conv_a(z), conv_b(z[:, :, 1:, 1:])], 1)`` with 1x1 stride-2 convs: one 2x2
    stride-2 kernel whose halves sit at offsets 0 and 1 (DARTS's FactorizedReduce core)."""
    cats = [n for n in data if ir.node(n).desc.op == "cat"]
    convs = [n for n in data if ir.node(n).kind is Kind.CONV]
    slices = [n for n in data if ir.node(n).desc.op == "getitem"]
    if len(data) != 4 or len(cats) != 1 or len(convs) != 2 or len(slices) != 1:
        return None
    (cat,) = cats
    if ir.node(cat).desc.hparam("dim") not in (1, -3):
        return None
    items = ir.node(cat).args[0]
    if not isinstance(items, (list, tuple)) or [r.name for r in items] != convs:
        return None
    pieces, rows, strides = [], 0, set()
    for conv in convs:
        got = conv_piece(ir, conv)
        if got is None:
            return None
        piece, stride = got
        (src,) = data_inputs(ir, conv)
        if src == op.input:
            shift = 0
        else:
            sl = ir.node(src)
            if sl.desc.op != "getitem" or data_inputs(ir, src) != [op.input]:
                return None
            index_arg = sl.args[1]
            expect = (slice(None), slice(None)) + (slice(1, None, None),) * len(stride)
            if tuple(index_arg) != expect:
                return None
            shift = 1
        if any(k != 1 for k in piece.kernel_size) or piece.structure != "dense":
            return None
        pieces.append(dataclasses.replace(
            piece, start=tuple(s + shift for s in piece.start),
            out_rows=(rows, rows + piece.out_channels)))
        rows += piece.out_channels
        strides.add(stride)
    if len(strides) != 1:
        return None
    pieces = [dataclasses.replace(p, out_channels=rows) for p in pieces]
    return LinearCandidate(index, tuple(pieces), strides.pop(), True, "factorized reduce")


# --------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """What one training step (forward + backward) costs on a machine.

    Convolutions do not run at one FLOP rate: a dense kernel with a long inner dimension
    ``K = C_in / groups * taps`` runs near the machine's peak, a short one far below it
    (``peak * K / (K + k_half)``), and depthwise convolutions at their own, much lower rate.
    Everything else moves memory (``bytes_per_s``), and every op costs a fixed overhead.
    The CPU figures were measured on this project's machines (one thread, fp32); the CUDA
    ones are for a recent data-centre GPU.  Only the ratios between options matter.
    """

    conv_peak: float
    conv_k_half: float
    depthwise_rate: float
    bytes_per_s: float
    seconds_per_op: float

    def conv_rate(self, inner: int, depthwise: bool) -> float:
        if depthwise:
            return self.depthwise_rate
        return self.conv_peak * inner / (inner + self.conv_k_half)


DEVICES = {
    "cpu": DeviceModel(1.5e11, 224, 5e9, 1e10, 1.1e-5),
    "cuda": DeviceModel(3e13, 512, 1e13, 2e12, 6e-6),
}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Cost of one training step (forward + backward) of part of a selection."""

    seconds: float
    flops: float
    saved_bytes: float

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.seconds + other.seconds, self.flops + other.flops,
                        self.saved_bytes + other.saved_bytes)


_NONE = Estimate(0.0, 0.0, 0.0)
_TRAIN = 3  # backward costs about twice the forward (grad input + grad weight)


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    c_in: int
    c_out: int
    in_pixels: int
    out_pixels: int
    itemsize: int
    device: DeviceModel

    def act(self, channels: int, out: bool = True) -> float:
        return float(self.batch * channels * (self.out_pixels if out else self.in_pixels)
                     * self.itemsize)

    def conv(self, c_in: int, c_out: int, groups: int, taps: int, in_bytes: float,
             out_bytes: float) -> Estimate:
        """A convolution's forward and backward."""
        inner = (c_in // groups) * taps
        flops = _TRAIN * 2.0 * self.batch * c_out * inner * self.out_pixels
        depthwise = c_in // groups == 1 and groups > 1
        d = self.device
        seconds = (flops / d.conv_rate(inner, depthwise)
                   + _TRAIN * (in_bytes + out_bytes) / d.bytes_per_s + 2 * d.seconds_per_op)
        return Estimate(seconds, flops, 0.0)

    def elementwise(self, tensors: float, count: int = 1, saved: float = 0.0) -> Estimate:
        """``count`` elementwise ops, forward and backward, each moving ``tensors`` bytes."""
        d = self.device
        return Estimate(count * (_TRAIN * tensors / d.bytes_per_s + 2 * d.seconds_per_op),
                        0.0, saved)

    def tiny(self, count: int) -> Estimate:
        """Kernel and weight arithmetic: op overhead only."""
        return Estimate(2 * count * self.device.seconds_per_op, 0.0, 0.0)


def _candidate_convs(c: LinearCandidate, sh: Shapes) -> tuple[Estimate, float]:
    """(cost of a candidate's own convolutions, bytes its intermediate tensors keep)."""
    total, kept = _NONE, 0.0
    out = sh.act(sh.c_out)
    for p in c.pieces:
        taps = math.prod(p.kernel_size)
        if p.structure == "separable":
            mid = sh.act(p.in_channels)
            total += sh.conv(p.in_channels, p.in_channels, p.in_channels, taps,
                             sh.act(sh.c_in, False), mid)
            total += sh.conv(p.in_channels, p.out_channels, 1, 1, mid, out)
            kept += mid
        elif p.fixed == "avg_pool":
            total += sh.elementwise(sh.act(sh.c_in, False) + out)
        elif p.fixed is None:
            total += sh.conv(p.in_channels, p.out_channels, p.groups, taps,
                             sh.act(sh.c_in, False), out)
    return total, kept


def _apart(cands: Sequence[LinearCandidate], sh: Shapes) -> Estimate:
    """Each candidate computed, weighted and summed as it is."""
    total = _NONE
    out = sh.act(sh.c_out)
    for c in cands:
        convs, kept = _candidate_convs(c, sh)
        if c.zero:
            convs = sh.elementwise(out)  # x * 0
        # w_i * o_i keeps o_i for the weight's gradient; the add reads and writes it
        total += convs + sh.elementwise(out, 2, saved=out + kept)
    return total


def _kernels(sh: Shapes, elements: float, ops: int) -> Estimate:
    """Kernel arithmetic: ``ops`` small ops over kernels of ``elements`` values in all.

    Autograd keeps the kernels it multiplies by weights and the merged kernel the conv reads;
    unlike activations they do not grow with the batch, so a merge that keeps nothing else can
    still cost memory when the batch is small and the kernels large.
    """
    nbytes = elements * sh.itemsize
    return sh.tiny(ops) + Estimate(_TRAIN * 2 * nbytes / sh.device.bytes_per_s, 0.0, nbytes)


def _merged(form: str, cands: Sequence[LinearCandidate], frame: Sequence[int],
            sh: Shapes) -> Estimate:
    pieces = [p for c in cands for p in c.pieces]
    n, taps = len(pieces), math.prod(frame)
    out, z = sh.act(sh.c_out), sh.act(sh.c_in, False)
    if form == "folded":  # each candidate's convs, its weight folded into its last kernel
        total = sh.elementwise(out, len(cands) - 1)
        for c in cands:
            convs, kept = _candidate_convs(c, sh)
            (p,) = c.pieces
            last = p.out_channels * (p.in_channels if p.structure == "separable" else
                                     p.in_channels // p.groups * math.prod(p.kernel_size))
            total += convs + Estimate(0.0, 0.0, kept) + _kernels(sh, last, 2)
        return total
    if form == "dense":
        return (_kernels(sh, (n + 1) * sh.c_out * sh.c_in * taps, 3 * n + 2)
                + sh.conv(sh.c_in, sh.c_out, 1, taps, z, out))
    if form == "depthwise":
        return (_kernels(sh, (n + 1) * sh.c_in * taps, 3 * n + 2)
                + sh.conv(sh.c_in, sh.c_in, sh.c_in, taps, z, out))
    stacked = sh.act(n * sh.c_in)
    return (_kernels(sh, n * sh.c_in * taps + sh.c_out * n * sh.c_in, 3 * n + 4)
            + sh.conv(sh.c_in, n * sh.c_in, sh.c_in, taps, z, stacked)
            + sh.conv(n * sh.c_in, sh.c_out, 1, 1, stacked, out)
            + Estimate(0.0, 0.0, stacked))


# --------------------------------------------------------------------------------------
# Matching: which candidates, which form
# --------------------------------------------------------------------------------------

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

    removed = 0  # merging keeps the module count of Table II's conv units: see the counts

    def kind(self, names: Sequence[str]) -> str:
        """What like decisions share, in the user's words (candidate ``names``)."""
        if self.form == "drop":
            return f"dropped the zero candidate{'s' if len(self.members) > 1 else ''}"
        k = "x".join(str(f) for f in self.frame)
        d = "" if all(v == 1 for v in self.frame_dilation) else \
            f" d{'x'.join(map(str, self.frame_dilation))}"
        return f"merged {', '.join(names)} into one {self.form} {k}{d} conv"

    def detail(self) -> str:
        if self.form == "drop":
            return self.estimate
        what = "; ".join(c.label for c in self.candidates)
        note = f"; {', '.join(self.inexact)} merged in the paper's mode only (exact in the " \
               f"interior)" if self.inexact else ""
        return f"{what}: {self.estimate}{note}"


def _frame(cands: Sequence[LinearCandidate]) -> tuple | None:
    """(frame size, frame dilation, padding) shared by the candidates, or None if misaligned."""
    pieces = [p for c in cands for p in c.pieces]
    if not pieces:
        return None
    spatial = len(pieces[0].kernel_size)
    size, dil, pad = [], [], []
    for d in range(spatial):
        lo = min(p.taps()[d][0] for p in pieces)
        hi = max(p.taps()[d][1] for p in pieces)
        if lo != -hi:
            return None  # an asymmetric frame would need asymmetric padding
        offsets = [p.start[d] for p in pieces] + \
            [p.dilation[d] for p in pieces if p.kernel_size[d] > 1]
        g = reduce(math.gcd, [abs(o) for o in offsets if o], 0) or 1
        if hi % g:
            g = 1
        size.append(2 * hi // g + 1)
        dil.append(g)
        pad.append(hi)
    return tuple(size), tuple(dil), tuple(pad)


def _forms(cands: Sequence[LinearCandidate]) -> list[str]:
    pieces = [p for c in cands for p in c.pieces]
    forms = ["dense"]
    if all(p.fixed is None and p.out_rows is None for p in pieces):
        forms.append("folded")
    if all(p.structure == "depthwise" and p.out_rows is None for p in pieces):
        forms.append("depthwise")
    elif all(p.structure in ("depthwise", "separable") and p.out_rows is None
             for p in pieces):
        forms.append("separable")
    return forms


def _shapes(ir: SupernetIR, op: MixedOp, device: DeviceModel) -> Shapes:
    z, out = ir.node(op.input).val, ir.node(op.output).val
    return Shapes(z.shape[0], z.shape[1], out.shape[1], math.prod(z.shape[2:]),
                  math.prod(out.shape[2:]), z.element_size(), device)


def _mergeable(cands: Sequence[LinearCandidate]) -> tuple[list, tuple] | None:
    """(the non-zero candidates, their frame) when they can be one convolution: a learnable
    kernel among them, one stride, aligned outputs."""
    live = [c for c in cands if not c.zero]
    if not any(p.learnable for c in live for p in c.pieces) or \
            len({c.stride for c in live}) != 1:
        return None
    frame = _frame(live)
    return None if frame is None else (live, frame)


def _best_form(cands, sh) -> tuple[float, Estimate, str, tuple] | None:
    got = _mergeable(cands) if len(cands) >= 2 else None
    if got is None:
        return None
    live, frame = got
    best = None
    for form in _forms(live):
        est = _merged(form, live, frame[0], sh)
        if best is None or est.seconds < best[0]:
            best = (est.seconds, est, form, frame)
    return best


def match_merge(ir: SupernetIR, op: MixedOp, exact: bool, device: DeviceModel,
                form: str | None = None, batch: int | None = None) -> MergePlan | None:
    """The cheapest merge of ``op``'s linear candidates, or None (never edits the IR).

    ``form`` forces one form (see :class:`Reparameterization`) and skips the cost model:
    every linear candidate is merged when the form applies.
    """
    out = ir.node(op.output).val
    if not isinstance(out, torch.Tensor) or not isinstance(ir.node(op.input).val, torch.Tensor):
        return None
    linear = [lc for i in range(len(op.candidates))
              if (lc := linear_candidate(ir, op, i, exact)) is not None]
    sh = _shapes(ir, op, device)
    if batch is not None:
        sh = dataclasses.replace(sh, batch=batch)
    plan = _merge_plan(linear, sh, form) if len(linear) >= 2 else None
    zeros = tuple(c for c in linear if c.zero and (plan is None or c.index not in plan.members))
    if zeros and plan is not None:
        return dataclasses.replace(plan, members=plan.members + tuple(c.index for c in zeros),
                                   candidates=plan.candidates + zeros)
    if zeros and len(zeros) < len(op.candidates):
        # w * (x * 0) adds nothing and has zero gradient: the term goes (exact for finite x)
        return MergePlan(tuple(c.index for c in zeros), "drop", (), (), (), (), zeros,
                         "a zero candidate adds nothing", ())
    return plan


def _merge_plan(linear: list[LinearCandidate], sh: Shapes,
                form: str | None) -> MergePlan | None:
    if form is not None:
        return _forced(linear, form)

    def score(group):
        best = _best_form(group, sh)
        if best is None:
            return None
        rest = [c for c in linear if c not in group]
        apart = _apart(rest, sh)
        return best[0] + apart.seconds, best, apart

    group = list(linear)
    current = score(group)
    improved = True
    while improved and len(group) > 2:
        improved = False
        for c in list(group):
            trial = score([g for g in group if g is not c])
            if trial is not None and (current is None or trial[0] < current[0]):
                group, current, improved = [g for g in group if g is not c], trial, True
    if current is None:
        return None
    apart_all = _apart(linear, sh)
    _, (_, merged, form, frame), rest = current
    total = merged + rest
    before = apart_all.seconds
    after = total.seconds
    if after > before or total.saved_bytes > apart_all.saved_bytes:
        return None  # never merge when merging makes the step costlier
    estimate = (f"est. step time {100 * (after / before - 1):+.0f}%, saved bytes "
                f"{100 * (total.saved_bytes / max(apart_all.saved_bytes, 1) - 1):+.0f}%, "
                f"FLOPs {100 * (total.flops / max(apart_all.flops, 1) - 1):+.0f}%")
    inexact = tuple(c.label for c in group if not c.exact)
    stride = next(c.stride for c in group if not c.zero)
    size, dil, pad = frame
    return MergePlan(tuple(c.index for c in group), form, size, dil, pad, stride,
                     tuple(group), estimate, inexact)


def _forced(linear: list[LinearCandidate], form: str) -> MergePlan | None:
    got = _mergeable(linear)
    if got is None or form not in _forms(got[0]):
        return None
    live, (size, dil, pad) = got
    return MergePlan(tuple(c.index for c in linear), form, size, dil, pad, live[0].stride,
                     tuple(linear), "form forced, cost model skipped",
                     tuple(c.label for c in linear if not c.exact))


# --------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------

class _Builder:
    """Adds the kernel arithmetic of one merge to the IR."""

    def __init__(self, ir: SupernetIR, plan: MergePlan, z: str, tag: dict):
        self.ir, self.plan, self.z, self.tag = ir, plan, z, tag
        self.learnable: list[str] = []

    def call(self, fn, *args, name: str, **kwargs) -> str:
        return self.ir.add_node("call_function", fn, args, kwargs, origin="merge",
                                notes={**self.tag["notes"], "role": "kernel"},
                                name=name).name

    def tensor(self, ref: tuple, learnable: bool = True) -> str:
        if ref[0] == "node":
            name = ref[1]
        else:
            target = f"{ref[1]}.{ref[2]}"
            name = self.ir.add_node("get_attr", target, origin="merge",
                                    notes={**self.tag["notes"], "role": "kernel"}).name
        if learnable:
            self.learnable.append(name)
        return name

    def fixed(self, piece: Piece) -> str:
        C = piece.in_channels
        return self.call(runtime.fixed_kernel, Ref(self.z), piece.fixed, C, piece.kernel_size,
                         name=f"{piece.fixed}_kernel")

    def depthwise(self, piece: Piece) -> str:
        """The piece's depthwise kernel placed in the frame."""
        raw = self.fixed(piece) if piece.fixed else self.tensor(piece.kernel)
        return self.place(raw, piece)

    def place(self, kernel: str, piece: Piece) -> str:
        return self.call(runtime.place, Ref(kernel), piece.dilation, piece.start,
                         self.plan.frame, self.plan.frame_dilation, name="placed")

    def dense(self, piece: Piece) -> str:
        """The piece as a dense ``(C_out, C_in, *frame)`` kernel."""
        if piece.structure == "separable":
            dw = self.depthwise(piece)
            return self.call(runtime.separable_to_dense, Ref(dw),
                             Ref(self.tensor(piece.pointwise)), name="dense")
        if piece.structure == "depthwise":
            return self.call(runtime.depthwise_to_dense, Ref(self.depthwise(piece)),
                             name="dense")
        raw = self.tensor(piece.kernel)
        if piece.groups != 1:
            raw = self.call(runtime.group_to_dense, Ref(raw), piece.groups, name="dense")
        placed = self.place(raw, piece)
        if piece.out_rows is not None:
            placed = self.call(runtime.embed_rows, Ref(placed), piece.out_rows[0],
                               piece.out_channels, name="rows")
        return placed


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def rewrite_merge(ir: SupernetIR, op: MixedOp, plan: MergePlan) -> str:
    """Replace the planned candidates by one merged convolution (Eq. 14-16)."""
    tag = sharing.tag_for(ir, op, "merge")
    if plan.form == "drop":
        return rebuild_selection(ir, op, plan.members, None, None, tag)
    b = _Builder(ir, plan, op.input, tag)
    # the raw weights go into the kernel: sum_S w_i K_i = w_S sum_S w'_i K_i is the same
    # function, and without the product by w_S the conv output need not be kept for backward
    selection = group_selection(ir, op, plan.members, True, tag)
    weights = dict(zip(plan.members, selection.member_weights))
    live = [c for c in plan.candidates if not c.zero]
    conv = _CONV[len(plan.frame)]
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
                          notes={**tag["notes"], "merged": [c.label for c in plan.candidates],
                                 "merge_form": "separable (depthwise half)"})
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
                         notes={**tag["notes"], "merged": [c.label for c in plan.candidates],
                                "merge_form": plan.form, "kernels": list(b.learnable),
                                "frame": plan.frame})
    if tuple(merged.val.shape) != tuple(ir.node(op.output).val.shape):
        raise AssertionError(f"merge of {op.name} produced {tuple(merged.val.shape)}, "
                             f"expected {tuple(ir.node(op.output).val.shape)}")
    return rebuild_selection(ir, op, plan.members, merged.name, selection, tag)


def functional_conv(ir: SupernetIR, data: str, kernel: str, bias: str | None,
                    stride: Sequence[int], piece: Piece, *, like: IRNode | None = None,
                    **node: Any) -> str:
    """``F.convNd(data, kernel, bias)`` with the piece's own geometry (padding, dilation,
    groups); ``like`` lends its module path and source line; ``node`` goes to ``add_node``."""
    kwargs = {"stride": tuple(stride), "padding": tuple(-s for s in piece.start),
              "dilation": piece.dilation, "groups": piece.groups}
    if bias is not None:
        kwargs["bias"] = Ref(bias)
    if like is not None:
        node.setdefault("module_path", like.module_path)
        node.setdefault("source", like.source)
    return ir.add_node("call_function", _CONV[len(kwargs["stride"])], (Ref(data), Ref(kernel)),
                       kwargs, **node).name


def _scaled_conv(b: _Builder, data: str, weight: str, kernel: tuple, bias: tuple | None,
                 stride: Sequence[int], piece: Piece, **node: Any) -> str:
    """``w * conv(data, K, b)`` computed as ``conv(data, w K, w b)``."""
    scaled = b.call(runtime.weighted_kernel_sum, [Ref(weight)], [Ref(b.tensor(kernel))],
                    name="folded_kernel")
    scaled_bias = None
    if bias is not None:
        scaled_bias = b.call(runtime.weighted_bias_sum, [Ref(weight)],
                             [Ref(b.tensor(bias, learnable=False))], name="folded_bias")
    return functional_conv(b.ir, data, scaled, scaled_bias, stride, piece, origin="merge",
                           **node)


def _folded(ir: SupernetIR, b: _Builder, live: Sequence[LinearCandidate],
            weights: dict[int, str], tag: dict) -> str:
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
                                   notes={**tag["notes"], "merged": [c.label],
                                          "merge_form": "folded (depthwise half)"})
            last = dataclasses.replace(p, kernel=p.pointwise, kernel_size=(1,) * len(c.stride),
                                       dilation=(1,) * len(c.stride),
                                       start=(0,) * len(c.stride), groups=1)
            stride = (1,) * len(c.stride)
        out = _scaled_conv(b, data, weights[c.index], last.kernel, p.bias, stride, last,
                           name="folded_conv",
                           notes={**tag["notes"], "merged": [c.label], "merge_form": "folded",
                                  "frame": p.kernel_size})
        ir.node(out).notes["kernels"] = b.learnable[first:]
        outs.append(out)
    return weighted_sum(ir, [(None, o) for o in outs], tag, name="folded_sum")


# --------------------------------------------------------------------------------------
# Folding the weight of a term into the module that computes it
# --------------------------------------------------------------------------------------

_FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_weights(ir: SupernetIR) -> list[str]:
    """Fold the weight of ``w * conv(z)`` into the kernel and of ``w * bn(u)`` into the
    normalization's affine transform, where the product is the module's only use.

    Exact, and it removes the product of full tensors together with the output autograd
    kept for ``w``'s gradient.  Runs in program order, so nested products (``w_F * (w' *
    conv)``) fold one after the other.
    """
    folded = []
    for name in ir.topological_order():
        if name not in ir:
            continue
        node = ir.node(name)
        if node.desc.op != "mul" or node.kind is not Kind.ARITH or node.kwargs or \
                len(node.args) != 2 or not all(isinstance(a, Ref) for a in node.args):
            continue
        a, b = (ir.node(r.name) for r in node.args)
        weight, term = (a, b) if _is_weight(a) else (b, a) if _is_weight(b) else (None, None)
        if weight is None or ir.users(term.name) != [name]:
            continue
        new = _fold_into(ir, term, weight.name)
        if new is not None:
            ir.replace_all_uses(name, new)
            ir.remove_dead([name])
            folded.append(name)
    return folded


def _is_weight(node: IRNode) -> bool:
    return node.notes.get("role") == "weight" and isinstance(node.val, torch.Tensor) and \
        node.val.numel() == 1


def _fold_into(ir: SupernetIR, term: IRNode, weight: str) -> str | None:
    tag = {k: v for k, v in term.notes.items() if k == "mixed_op"}
    notes = {**term.notes, "folded_weight": True}
    if term.opcode == "call_module" and isinstance(ir.modules[term.target], _FOLDABLE_NORMS):
        module = ir.add_node("get_attr", term.target, origin="merge",
                             notes={**tag, "role": "kernel"})
        return ir.add_node("call_function", runtime.scaled_batch_norm,
                           (Ref(module.name), term.args[0], Ref(weight)), origin="merge",
                           module_path=term.module_path, source=term.source, notes=notes,
                           name=f"{term.name}_scaled").name
    got = conv_piece(ir, term.name) if term.kind is Kind.CONV else None
    if got is None:
        return None
    piece, stride = got
    if not isinstance(term.args[0], Ref):
        return None
    b = _Builder(ir, None, term.args[0].name, {"origin": "merge", "notes": tag})
    out = _scaled_conv(b, b.z, weight, piece.kernel, piece.bias, stride, piece, like=term,
                       notes=notes, name=f"{term.name}_scaled")
    if term.opcode == "call_module":
        ir.node(out).notes["kernels"] = list(b.learnable)  # for KN, as merged kernels
    return out


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

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        if self.form not in (None, "dense", "depthwise", "separable", "folded"):
            raise ValueError(f"merge form {self.form!r}: choose dense, depthwise, separable "
                             f"or folded")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"merge device {self.device!r}: choose one of {sorted(DEVICES)}")
        device = DEVICES.get(self.device or ir.device_type, DEVICES["cpu"])
        merged = sharing.run_on_mixed_ops(
            ir, ctx, lambda op: match_merge(ir, op, ctx.exact, device, self.form, self.batch),
            lambda op, plan: rewrite_merge(ir, op, plan), nested=True)
        folded = fold_weights(ir)
        if folded:
            ctx.decide(f"folded {len(folded)} weights into the convolution or BatchNorm "
                       f"that computes their term (w * conv(z) = conv(z, w K), w * bn(u) = "
                       f"bn(u) with its affine transform scaled)")
        return merged or bool(folded)

