"""Every function a compiled graph calls, each with its shape rule.

The passes add ``call_function`` nodes that call these functions, so merged kernels are
rebuilt from the current weights and architecture weights at every step and gradients flow
back to the original parameters.  Each function is registered with :func:`~.meta.shape_rule`:
the compiler infers the meta value of every node it adds from that rule instead of running
the function on meta tensors, and tracing a compiled supernet again records a call to the
function instead of tracing into it (:data:`~.meta.LEAF_FUNCTIONS`).

* kernel arithmetic of merged convolutions (paper Eq. 14-16): :func:`place`,
  :func:`depthwise_to_dense`, :func:`group_to_dense`, :func:`separable_to_dense`,
  :func:`weighted_kernel_sum`, :func:`weighted_bias_sum`, :func:`stack_depthwise`,
  :func:`stack_pointwise`, and the kernels without parameters :func:`fixed_kernel`,
  :func:`embed_rows`, :func:`eye_pointwise`; batched forms of the per-candidate ones for a
  whole supernet (:mod:`~.kernel_batching`): :func:`place_many`,
  :func:`separable_to_dense_many`, :func:`weighted_kernel_sums`;
* kernel normalization (Eq. 28): :func:`normalize_kernel`, :func:`normalize_kernels`;
* conditional weights of cascaded selections (Eq. 8): :func:`nonzero_or_one`;
* weight folding: :func:`scaled_batch_norm`;
* calls the tracer records whole (autograd Functions, scripted functions, checkpoints,
  distributions; :mod:`~.capture`): :class:`OpaqueCall`, whose meta value comes from the rule
  the tracer hands it;
* the architecture-weight arithmetic of the whole supernet, vectorized:
  :class:`WeightProgram` (a module the tracer keeps whole, so a compiled supernet traced
  again still reads one-element architecture weights).

Shapes follow ``torch.nn.functional``: kernels are ``(C_out, C_in / groups, *k)`` with 1, 2
or 3 spatial dimensions.  This module imports nothing from the passes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from .meta import leaf_module, shape_rule

__all__ = ["place", "depthwise_to_dense", "separable_to_dense", "group_to_dense",
           "weighted_kernel_sum", "place_many", "separable_to_dense_many",
           "weighted_kernel_sums", "stack_depthwise", "stack_pointwise", "weighted_bias_sum",
           "fixed_kernel", "embed_rows", "eye_pointwise", "normalize_kernel",
           "normalize_kernels", "KN_EPS", "nonzero_or_one", "scaled_batch_norm",
           "OpaqueCall", "WeightProgram"]


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


def place_many(kernels: Sequence[torch.Tensor], dilation: Sequence[int],
               start: Sequence[int], frame: Sequence[int],
               frame_dilation: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """:func:`place` of many kernels of one shape, placed alike, in one batch of ops."""
    stacked = torch.stack(list(kernels))
    n, c_out = stacked.shape[:2]
    placed = place(stacked.flatten(0, 1), dilation, start, frame, frame_dilation)
    return placed.unflatten(0, (n, c_out)).unbind(0)


class _SeparableToDenseMany(torch.autograd.Function):
    """``P_i * D_i^T`` for many pairs in one product, saving the pairs themselves for backward
    (autograd's own graph would keep stacked copies of them, which nothing else holds)."""

    @staticmethod
    def forward(ctx, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.n = n
        ctx.save_for_backward(*tensors)
        d, p = torch.stack(tensors[:n]), torch.stack(tensors[n:])
        return p * d.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tensors, n = ctx.saved_tensors, ctx.n
        d, p = torch.stack(tensors[:n]).transpose(1, 2), torch.stack(tensors[n:])
        grad_p = (grad * d).sum_to_size(p.shape).to(p.dtype)
        grad_d = (grad * p).sum_to_size(d.shape).to(d.dtype).transpose(1, 2)
        return (None, *grad_d.unbind(0), *grad_p.unbind(0))


def separable_to_dense_many(depthwise: Sequence[torch.Tensor],
                            pointwise: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`separable_to_dense` of many pairs of one shape, in one batch of ops."""
    return _SeparableToDenseMany.apply(len(depthwise), *depthwise, *pointwise).unbind(0)


class _WeightedKernelSums(torch.autograd.Function):
    """``sum_j w_j K_j`` for many merges at once, saving the weights and kernels themselves
    for backward (not stacked copies of them)."""

    @staticmethod
    def forward(ctx, terms: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.terms = terms
        ctx.save_for_backward(*tensors)
        out = None
        for w, k in _terms(tensors, terms):
            out = w * k if out is None else out + w * k
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads_w, grads_k = [], []
        for w, k in _terms(ctx.saved_tensors, ctx.terms):
            grads_w.extend((grad * k).flatten(1).sum(1).to(w.dtype).unbind(0))
            grads_k.extend((grad * w).to(k.dtype).unbind(0))
        return (None, *grads_w, *grads_k)


def _terms(tensors: Sequence[torch.Tensor], terms: int):
    """(stacked weights shaped to broadcast, stacked kernels) of each term."""
    n = len(tensors) // (2 * terms)
    for j in range(terms):
        k = torch.stack(tensors[(terms + j) * n:(terms + j + 1) * n])
        w = torch.stack(tensors[j * n:(j + 1) * n]).reshape((-1,) + (1,) * (k.dim() - 1))
        yield w, k


def weighted_kernel_sums(weights: Sequence[Sequence[torch.Tensor]],
                         kernels: Sequence[Sequence[torch.Tensor]]
                         ) -> tuple[torch.Tensor, ...]:
    """:func:`weighted_kernel_sum` of many merges with as many terms, in one batch of ops:
    ``weights[j][i]`` and ``kernels[j][i]`` are term ``j`` of merge ``i``.  The same
    elementwise operations in the same order (outputs are the unbatched ones bit for bit;
    gradients of the weights up to summation order)."""
    flat = [w for ws in weights for w in ws] + [k for ks in kernels for k in ks]
    return _WeightedKernelSums.apply(len(weights), *flat).unbind(0)


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
    """Kernel normalization (Eq. 28): ``(K - mean) / std`` over the whole kernel.

    The result is unchanged when K is scaled by ``a > 0`` or shifted by ``b`` -- exactly, not
    up to an epsilon, as long as the kernel's std exceeds ``KN_EPS`` -- which removes the
    coupling of Eq. 19: an architecture weight scales a candidate's whole kernel.  Statistics
    over the whole kernel, not per output filter (weight standardization): per filter, every
    depthwise filter would sum to zero (a high-pass filter that cannot pass a local average)
    and every pointwise filter would be a zero-mean mix of channels; in the search benchmark
    that cost retrained accuracy (BENCHMARKS.md, "Kernel normalization with and without
    merges").  The per-filter scales it leaves free are absorbed by the BatchNorm that
    follows.  A kernel whose std is below ``KN_EPS`` (constant up to rounding) normalizes to
    zeros, with zero gradient instead of NaN.  Statistics are computed in float32 at least, so
    fp16 / bf16 kernels neither overflow (their squares would) nor lose the variance.
    """
    return _normalize_rows(kernel.reshape(1, -1)).reshape(kernel.shape)


def _normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(rows.dtype, torch.float32)
    return _Standardize.apply(rows.to(compute)).to(rows.dtype)


def normalize_kernels(kernels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`normalize_kernel` of many kernels of one shape, in one batch of ops."""
    stacked = torch.stack(list(kernels))
    flat = _normalize_rows(stacked.reshape(stacked.shape[0], -1))
    return tuple(flat.reshape(stacked.shape).unbind(0))


def fixed_kernel(like: torch.Tensor, kind: str, channels: int,
                 kernel_size: Sequence[int]) -> torch.Tensor:
    """A depthwise kernel without parameters: identity (Dirac) or average pooling."""
    shape = (channels, 1) + tuple(kernel_size)
    if kind == "identity":
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    return torch.full(shape, 1.0 / math.prod(kernel_size), dtype=like.dtype,
                      device=like.device)


def embed_rows(kernel: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """Write a kernel's output rows at ``first`` of a ``total``-row zero kernel."""
    pad = [0, 0] * (kernel.dim() - 1) + [first, total - first - kernel.shape[0]]
    return F.pad(kernel, pad)


def eye_pointwise(like: torch.Tensor, channels: int, spatial: int) -> torch.Tensor:
    """The identity pointwise kernel of a depthwise-only candidate in the separable form."""
    eye = torch.eye(channels, dtype=like.dtype, device=like.device)
    return eye.view(channels, channels, *([1] * spatial))


def nonzero_or_one(w_group: torch.Tensor) -> torch.Tensor:
    """The denominator of ``w'_i = w_i / w_S`` (Eq. 8): ``w_S``, or 1 where ``w_S == 0`` so
    that one-hot weights stay finite in forward and backward."""
    return torch.where(w_group == 0, 1.0, w_group)


def scaled_batch_norm(bn: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * bn(x)``, computed as BatchNorm with its affine transform scaled.

    The same function, the same running-statistics update; but autograd keeps only ``x``
    (BatchNorm keeps it anyway) instead of also keeping ``bn(x)`` for the gradient of
    ``scale``.  Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``.
    """
    if torch.result_type(scale, x) != x.dtype:  # eager's product leaves x's dtype: so do we
        return scale * bn(x)
    # why: a 0-d scale of another dtype (a float64 run-time float, float32 alphas in a
    # float64 model) must match the BatchNorm's parameters, which F.batch_norm wants in x's
    # dtype, or in float32 for a bf16/fp16 x under autocast
    scale = scale.to(x.dtype if bn.running_mean is None else bn.running_mean.dtype)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    # why contiguous: torch's CPU batch_norm backward reads a stride-0 (expanded) weight wrongly
    # for channels_last inputs (garbage gradients, torch 2.13)
    weight = scale.expand(x.shape[1]).contiguous() if bn.weight is None else scale * bn.weight
    bias = None if bn.bias is None else scale * bn.bias
    return F.batch_norm(x, bn.running_mean if track else None,
                        bn.running_var if track else None, weight, bias, use_batch, factor,
                        bn.eps)


# Shape rules: the compiler infers the meta value of every node it adds; these are exact and
# far cheaper than running the functions on meta tensors.
def _meta(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


shape_rule(place)(lambda k, d, s, frame, fd: _meta(k.shape[:2] + tuple(frame), k))
shape_rule(depthwise_to_dense)(lambda k: _meta((k.shape[0], k.shape[0]) + k.shape[2:], k))
shape_rule(group_to_dense)(lambda k, g: _meta((k.shape[0], k.shape[1] * g) + k.shape[2:], k))
shape_rule(separable_to_dense)(lambda d, p: _meta((p.shape[0], d.shape[0]) + d.shape[2:], d))
shape_rule(weighted_kernel_sum)(lambda ws, ks: _meta(ks[0].shape, ks[0]))
shape_rule(weighted_bias_sum)(lambda ws, bs: _meta(bs[0].shape, bs[0]))
shape_rule(place_many)(
    lambda ks, d, s, frame, fd: tuple(_meta(k.shape[:2] + tuple(frame), k) for k in ks))
shape_rule(separable_to_dense_many)(
    lambda ds, ps: tuple(_meta((p.shape[0], d.shape[0]) + d.shape[2:], d)
                         for d, p in zip(ds, ps)))
shape_rule(weighted_kernel_sums)(lambda ws, ks: tuple(_meta(k.shape, k) for k in ks[0]))
shape_rule(stack_depthwise)(
    lambda ks: _meta((ks[0].shape[0] * len(ks), 1) + ks[0].shape[2:], ks[0]))
shape_rule(stack_pointwise)(
    lambda ws, ks: _meta((ks[0].shape[0], ks[0].shape[1] * len(ks)) + ks[0].shape[2:], ks[0]))
shape_rule(fixed_kernel)(lambda like, kind, c, k: _meta((c, 1) + tuple(k), like))
shape_rule(embed_rows)(lambda k, first, total: _meta((total,) + k.shape[1:], k))
shape_rule(eye_pointwise)(lambda like, c, spatial: _meta((c, c) + (1,) * spatial, like))
shape_rule(normalize_kernel)(lambda k: _meta(k.shape, k))
shape_rule(normalize_kernels)(lambda ks: tuple(_meta(k.shape, k) for k in ks))
shape_rule(nonzero_or_one)(lambda w: _meta(w.shape, w))
shape_rule(scaled_batch_norm)(lambda bn, x, scale: x)


_PROGRAM_OPS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.div,
                "neg": torch.neg, "nonzero_or_one": nonzero_or_one}


@leaf_module
class WeightProgram(nn.Module):
    """The architecture-weight arithmetic of a whole supernet, as a few vectorized ops.

    ``forward(*sources)`` flattens the source tensors (the softmaxed alphas), gathers the
    elements the scalar program reads, then runs the program level by level: at each level
    every group of like operations (``add``, ``truediv``, ``nonzero_or_one``...) is one
    gather per operand and one elementwise op over all of its instances, appended to the
    value vector.  Returns the exported scalars as a tuple of 0-dim tensors (``unbind``).
    Elementwise, so every value is computed by the same floating-point operation as the
    scalar op it replaces.  The index vectors are non-persistent buffers: they follow the
    module to its device and stay out of ``state_dict``.

    ``levels``: per level, groups ``(op, operands)``; an operand is ``("v", buffer name)``
    (positions in the value vector) or ``("c", number)``.
    """

    def __init__(self, leaves: Sequence[int],
                 levels: Sequence[Sequence[tuple[str, Sequence[tuple[str, Any]]]]],
                 exports: Sequence[int], device: torch.device | str = "cpu"):
        super().__init__()

        def index(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)
        self.register_buffer("leaves", index(leaves), persistent=False)
        self.register_buffer("exports", index(exports), persistent=False)
        self.levels: list[list[tuple[str, list[tuple[str, Any]]]]] = []
        for i, level in enumerate(levels):
            groups = []
            for j, (op, operands) in enumerate(level):
                specs = []
                for k, (kind, value) in enumerate(operands):
                    if kind == "v":
                        name = f"index_{i}_{j}_{k}"
                        self.register_buffer(name, index(value), persistent=False)
                        specs.append(("v", name))
                    else:
                        specs.append(("c", value))
                groups.append((op, specs))
            self.levels.append(groups)

    def forward(self, *sources: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([s.reshape(-1) for s in sources]) if len(sources) > 1 else \
            sources[0].reshape(-1)
        if self.leaves.device != flat.device:  # why: the sources moved without this module
            self.to(flat.device)
        values = flat.index_select(0, self.leaves)
        buffers = self._buffers
        for level in self.levels:
            results = [values]
            for op, specs in level:
                args = [values.index_select(0, buffers[v]) if kind == "v" else v
                        for kind, v in specs]
                results.append(_PROGRAM_OPS[op](*args))
            values = torch.cat(results)
        return values.index_select(0, self.exports).unbind(0)

    def extra_repr(self) -> str:
        ops = sum(len(level) for level in self.levels)
        return (f"leaves={self.leaves.numel()}, levels={len(self.levels)}, groups={ops}, "
                f"exports={self.exports.numel()}")



class OpaqueCall:
    """Runs ``fn`` on its arguments, rebuilt from the node's tensors and the constants the
    tracer captured (functions, modules, Python values fx cannot write into code)::

        gates = BinarizeSTE.apply(probs)   ->   gates = BinarizeSTE_apply(probs)

    The original runs, so a custom backward is kept.  On meta tensors it returns
    ``meta_rule(fn, args, kwargs)``; handed a proxy (a compiled graph traced again) it
    records itself as one node.
    """

    def __init__(self, fn: Callable[..., Any], label: str, spec: Any, constants: list[Any],
                 slots: list[int], meta_rule: Callable[[Callable, tuple, dict], Any]):
        self.fn = fn
        self.__name__ = self.__qualname__ = label
        self.__module__ = __name__
        self.spec = spec
        self.constants = constants
        self.slots = slots
        self.meta_rule = meta_rule

    def __repr__(self) -> str:
        return f"<opaque {self.__name__}>"

    def __call__(self, *tensors: Any) -> Any:
        proxy = next((t for t in tensors if isinstance(t, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", self, tensors, {})
        leaves = list(self.constants)
        for slot, value in zip(self.slots, tensors):
            leaves[slot] = value
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta"
               for t in pytree.tree_leaves(list(tensors))):
            return self.meta_rule(self.fn, args, kwargs)
        return self.fn(*args, **kwargs)
