"""The merge cost model (not a pass): what one training step of a merge form costs.

For the real shapes of a mixed op it estimates the FLOPs, the activation bytes autograd keeps
and the memory traffic of one training step (forward and backward), and a step time from them
with a per-device roofline (:data:`DEVICES`).  :func:`best_form` picks the cheapest form of
merging a group of linear candidates; :func:`apart` is the cost of keeping them as they are.
Only the ratios between options matter.
"""

from __future__ import annotations

import dataclasses
import math
from functools import reduce
from typing import Sequence

from topo_compiler.analysis import MixedOp
from topo_compiler.ir import SupernetIR
from topo_compiler.passes.linear_candidates import LinearCandidate

__all__ = ["DeviceModel", "DEVICES", "Estimate", "Shapes", "shapes_of", "apart", "merged_cost",
           "Frame", "FormChoice", "mergeable", "forms_for", "best_form"]


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


def apart(cands: Sequence[LinearCandidate], sh: Shapes) -> Estimate:
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


def merged_cost(form: str, cands: Sequence[LinearCandidate], frame: Sequence[int],
                sh: Shapes) -> Estimate:
    """The cost of merging ``cands`` in ``form`` on a kernel frame of size ``frame``."""
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


@dataclasses.dataclass(frozen=True)
class Frame:
    """The common kernel frame of merged candidates: size, tap spacing and padding."""

    size: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]


def frame_of(cands: Sequence[LinearCandidate]) -> Frame | None:
    """The frame shared by the candidates, or None if their outputs are misaligned."""
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
    return Frame(tuple(size), tuple(dil), tuple(pad))


def forms_for(cands: Sequence[LinearCandidate]) -> list[str]:
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


def shapes_of(ir: SupernetIR, op: MixedOp, device: DeviceModel) -> Shapes:
    z, out = ir.node(op.input).val, ir.node(op.output).val
    return Shapes(z.shape[0], z.shape[1], out.shape[1], math.prod(z.shape[2:]),
                  math.prod(out.shape[2:]), z.element_size(), device)


def mergeable(cands: Sequence[LinearCandidate]
              ) -> tuple[list[LinearCandidate], Frame] | None:
    """(the non-zero candidates, their frame) when they can be one convolution: a learnable
    kernel among them, one stride, aligned outputs."""
    live = [c for c in cands if not c.zero]
    if not any(p.learnable for c in live for p in c.pieces) or \
            len({c.stride for c in live}) != 1:
        return None
    frame = frame_of(live)
    return None if frame is None else (live, frame)


@dataclasses.dataclass(frozen=True)
class FormChoice:
    """The cheapest way to merge a group: its form, its frame and what it costs."""

    form: str
    frame: Frame
    estimate: Estimate


def best_form(cands: Sequence[LinearCandidate], sh: Shapes) -> FormChoice | None:
    """The cheapest form of merging ``cands`` (at least two), or None if they cannot merge."""
    got = mergeable(cands) if len(cands) >= 2 else None
    if got is None:
        return None
    live, frame = got
    best = None
    for form in forms_for(live):
        est = merged_cost(form, live, frame.size, sh)
        if best is None or est.seconds < best.estimate.seconds:
            best = FormChoice(form, frame, est)
    return best
