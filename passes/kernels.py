"""Kernel arithmetic the merged convolutions compute on every forward (paper Eq. 14-16, 28).

Each function here is called from the compiled graph (one ``call_function`` node each), so
merged kernels are rebuilt from the current weights and architecture weights at every step
and gradients flow back to the original parameters.  Shapes follow ``torch.nn.functional``:
kernels are ``(C_out, C_in / groups, *k)`` with 1, 2 or 3 spatial dimensions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["place", "depthwise_to_dense", "separable_to_dense", "group_to_dense",
           "weighted_kernel_sum", "stack_depthwise", "stack_pointwise", "weighted_bias_sum",
           "normalize_kernel", "normalize_kernels", "KN_EPS"]


def place(kernel: torch.Tensor, dilation: Sequence[int], start: Sequence[int],
          frame: Sequence[int], frame_dilation: Sequence[int]) -> torch.Tensor:
    """Put a (dilated) kernel into a common frame: MergeNAS's kernel alignment (Eq. 14).

    Tap ``j`` of the kernel sits at offset ``start + j * dilation`` from the output's anchor;
    in the frame, whose taps are ``frame_dilation`` apart and centred on the anchor, that is
    index ``(start + j * dilation) / frame_dilation + (frame - 1) / 2``.
    """
    spatial = kernel.dim() - 2
    firsts, steps = [], []
    for d in range(spatial):
        firsts.append(start[d] // frame_dilation[d] + (frame[d] - 1) // 2)
        steps.append(max(dilation[d] // frame_dilation[d], 1))  # one tap: dilation is moot
    sizes = kernel.shape[2:]
    if all(step == 1 or k == 1 for step, k in zip(steps, sizes)):
        pad = []  # contiguous taps: one F.pad, last dimension first
        for d in reversed(range(spatial)):
            pad += [firsts[d], frame[d] - firsts[d] - sizes[d]]
        return F.pad(kernel, pad) if any(pad) else kernel
    out = kernel.new_zeros(kernel.shape[:2] + tuple(frame))
    index = [slice(None), slice(None)] + [
        slice(f, f + s * (k - 1) + 1, s) for f, s, k in zip(firsts, steps, sizes)]
    out[tuple(index)] = kernel
    return out


def depthwise_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """``(C, 1, *k)`` depthwise kernel -> ``(C, C, *k)`` dense (diagonal) kernel."""
    C = kernel.shape[0]
    eye = torch.eye(C, dtype=kernel.dtype, device=kernel.device)
    return eye.view(C, C, *([1] * (kernel.dim() - 2))) * kernel.transpose(0, 1)


def group_to_dense(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """``(C_out, C_in / g, *k)`` grouped kernel -> ``(C_out, C_in, *k)`` block diagonal."""
    c_out, per_group = kernel.shape[:2]
    blocks = kernel.view(groups, c_out // groups, per_group, *kernel.shape[2:])
    dense = kernel.new_zeros((groups, c_out // groups, groups, per_group) + kernel.shape[2:])
    for g in range(groups):
        dense[g, :, g] = blocks[g]
    return dense.reshape(c_out, groups * per_group, *kernel.shape[2:])


def separable_to_dense(depthwise: torch.Tensor, pointwise: torch.Tensor) -> torch.Tensor:
    """Depthwise ``D (C, 1, *k)`` then pointwise ``P (C_out, C, 1...)``:
    ``W[o, c] = P[o, c] D[c]``."""
    return pointwise * depthwise.transpose(0, 1)


def weighted_kernel_sum(weights: Sequence[torch.Tensor],
                        kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i w_i K_i`` (Eq. 14): the merged kernel."""
    out = weights[0] * kernels[0]
    for w, k in zip(weights[1:], kernels[1:]):
        out = out + w * k
    return out


def weighted_bias_sum(weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i w_i b_i`` over the candidates that have a bias."""
    return weighted_kernel_sum(weights, biases)


def stack_depthwise(kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """n depthwise kernels ``(C, 1, *k)`` -> one ``(C * n, 1, *k)`` kernel whose output
    channel ``c * n + i`` is candidate i on channel c (a conv with ``groups = C``)."""
    stacked = torch.stack(list(kernels), dim=1)
    return stacked.reshape(-1, 1, *stacked.shape[3:])


def stack_pointwise(weights: Sequence[torch.Tensor],
                    kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W[o, c * n + i] = w_i P_i[o, c]``: one pointwise kernel after :func:`stack_depthwise`."""
    stacked = torch.stack([w * k for w, k in zip(weights, kernels)], dim=2)
    c_out, c, n = stacked.shape[:3]
    return stacked.reshape(c_out, c * n, *stacked.shape[3:])


KN_EPS = 1e-6
"""The smallest standard deviation a filter is divided by: a constant filter (std 0)
normalizes to zeros, finite in forward and backward."""


class _Standardize(torch.autograd.Function):
    """Row-wise ``(x - mean) / std`` that keeps only its output and the std for backward.

    ``dx = (dy - mean(dy) - y * mean(dy * y)) / std`` row by row (zero on constant rows).
    Autograd's own graph of the same formula would keep two more copies of every kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        flat = var <= KN_EPS * KN_EPS  # constant (up to rounding): no direction to keep
        std = var.clamp_min(KN_EPS * KN_EPS).sqrt()
        y = torch.where(flat, torch.zeros_like(x), (x - mean) / std)
        ctx.save_for_backward(y, std, flat)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        y, std, flat = ctx.saved_tensors
        dx = (dy - dy.mean(dim=1, keepdim=True)
              - y * (dy * y).mean(dim=1, keepdim=True)) / std
        return torch.where(flat, torch.zeros_like(dx), dx)


def normalize_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel normalization (Eq. 28): ``(K - mean) / std`` per output filter.

    Statistics run over every dimension but the first (as in weight standardization), so the
    result is unchanged when K is scaled by ``a > 0`` or shifted by ``b`` -- exactly, not up
    to an epsilon, as long as the filter's std exceeds ``KN_EPS`` -- which removes the
    coupling of Eq. 19 between weights and kernels.  A filter whose std is below ``KN_EPS``
    (constant up to rounding) normalizes to zeros, with zero gradient instead of NaN.
    Statistics are computed in float32 at least, so fp16 / bf16 kernels neither overflow
    (their squares would) nor lose the variance.
    """
    compute = torch.promote_types(kernel.dtype, torch.float32)
    rows = kernel.to(compute).reshape(kernel.shape[0], -1)
    return _Standardize.apply(rows).reshape(kernel.shape).to(kernel.dtype)


def normalize_kernels(kernels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`normalize_kernel` of many kernels of one shape, in one batch of ops."""
    stacked = torch.stack(list(kernels))
    n, c = stacked.shape[:2]
    flat = normalize_kernel(stacked.reshape(n * c, -1))
    return tuple(flat.reshape(stacked.shape).unbind(0))


# Shape rules: the compiler infers the meta value of every node it adds; these are exact and
# far cheaper than running the kernel arithmetic on meta tensors.
def _meta(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


def _register_shape_rules() -> None:
    from topo_compiler.meta import shape_rule

    shape_rule(place)(lambda k, d, s, frame, fd: _meta(k.shape[:2] + tuple(frame), k))
    shape_rule(depthwise_to_dense)(lambda k: _meta((k.shape[0], k.shape[0]) + k.shape[2:], k))
    shape_rule(group_to_dense)(
        lambda k, g: _meta((k.shape[0], k.shape[1] * g) + k.shape[2:], k))
    shape_rule(separable_to_dense)(
        lambda d, p: _meta((p.shape[0], d.shape[0]) + d.shape[2:], d))
    shape_rule(weighted_kernel_sum)(lambda ws, ks: _meta(ks[0].shape, ks[0]))
    shape_rule(weighted_bias_sum)(lambda ws, bs: _meta(bs[0].shape, bs[0]))
    shape_rule(stack_depthwise)(
        lambda ks: _meta((ks[0].shape[0] * len(ks), 1) + ks[0].shape[2:], ks[0]))
    shape_rule(stack_pointwise)(
        lambda ws, ks: _meta((ks[0].shape[0], ks[0].shape[1] * len(ks)) + ks[0].shape[2:],
                             ks[0]))
    shape_rule(normalize_kernel)(lambda k: _meta(k.shape, k))
    shape_rule(normalize_kernels)(lambda ks: tuple(_meta(k.shape, k) for k in ks))


_register_shape_rules()
