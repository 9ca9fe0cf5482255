"""Kernel normalization (``kn``): standardize every kernel that enters a merge (paper 3.5,
Eq. 28).

Merging makes the search degenerate (Eq. 17-27): with ``o = BN((sum_i w_i K_i) * z)``,
scaling a kernel and dividing its weight by the same factor changes nothing, so every
architecture weight is optimal.  Normalizing each learnable kernel first removes that
freedom::

    before:  ... K_i ...                  (a merged component, or a linear candidate's conv)
    after:   ... (K_i - mean(K_i)) / std(K_i) ...                                      (28)

Choices (the paper leaves them open): statistics per output filter (every dimension but the
first, as in weight standardization) -- a per-filter scale is exactly the freedom a following
BatchNorm absorbs; std clamped at :data:`~.kernels.KN_EPS` so a constant filter gives zeros;
computed in float32 for fp16 / bf16.  Fixed kernels (identity's Dirac, average pooling's
uniform kernel) have no learnable scale to couple with a weight and are left as they are:
normalizing them would replace "identity" by a different, arbitrary filter.

The coupling exists whether or not the candidates were merged into one convolution (the
function ``sum_i w_i (K_i * z)`` is the same), so the pass normalizes the kernels of merged
convolutions and of linear candidates kept apart alike -- the paper's "+Sharing+KN" row is
sharing with KN and no merge.  KN changes the function on purpose: ``exact=True`` skips it.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..analysis import find_mixed_ops
from ..descriptors import Kind, Ref
from ..ir import SupernetIR
from ..pass_manager import Pass, PassContext
from .kernels import normalize_kernel
from .reparameterization import linear_candidate

__all__ = ["KernelNormalization"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _is_normalized(ir: SupernetIR, name: str) -> bool:
    node = ir.node(name)
    return node.opcode == "call_function" and node.target is normalize_kernel


def _normalize(ir: SupernetIR, kernel: str, notes: dict) -> str:
    return ir.add_node("call_function", normalize_kernel, (Ref(kernel),), origin="kn",
                       notes={**notes, "role": "kernel"}, name=f"{kernel}_normalized").name


def normalize_merged(ir: SupernetIR, name: str) -> int:
    """Normalize the learnable components of a merged convolution; returns how many."""
    node = ir.node(name)
    if node.notes.get("kn"):
        return 0
    count = 0
    for kernel in node.notes.get("kernels", []):
        if kernel not in ir or _is_normalized(ir, kernel):
            continue
        users = ir.users(kernel)
        builders = [u for u in users if ir.node(u).origin == "merge"]
        normalized = _normalize(ir, kernel, {"mixed_op": node.notes.get("mixed_op")})
        ir.replace_all_uses(kernel, normalized,
                            skip=[u for u in users if u not in builders] + [normalized])
        count += 1
    node.notes["kn"] = True
    return count


def normalize_conv(ir: SupernetIR, name: str) -> bool:
    """A linear candidate's own convolution now reads its normalized kernel."""
    node = ir.node(name)
    if node.notes.get("kn") or node.notes.get("merged"):
        return False
    tag = {k: v for k, v in node.notes.items() if k == "mixed_op"}
    spatial = node.val.dim() - 2
    if node.opcode == "call_module":
        module = ir.modules[node.target]
        weight = ir.add_node("get_attr", f"{node.target}.weight", origin="kn",
                             notes={**tag, "role": "kernel"}).name
        kwargs = {"stride": module.stride, "padding": module.padding,
                  "dilation": module.dilation, "groups": module.groups}
        if module.bias is not None:
            kwargs["bias"] = Ref(ir.add_node("get_attr", f"{node.target}.bias", origin="kn",
                                             notes={**tag, "role": "kernel"}).name)
        (data,) = [r for r in node.inputs]
        conv = ir.add_node("call_function", _CONV[spatial],
                           (Ref(data), Ref(_normalize(ir, weight, tag))), kwargs,
                           origin="kn", module_path=node.module_path, source=node.source,
                           notes={**node.notes, "kn": True}, name=f"{name}_kn")
        ir.replace_all_uses(name, conv.name)
        ir.remove_node(name)
        return True
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, Ref) or _is_normalized(ir, weight.name):
        return False
    normalized = Ref(_normalize(ir, weight.name, tag))
    if len(node.args) > 1:
        ir.set_args(name, (node.args[0], normalized) + tuple(node.args[2:]), node.kwargs)
    else:
        ir.set_args(name, node.args, {**node.kwargs, "weight": normalized})
    node.notes["kn"] = True
    return True


@dataclasses.dataclass(frozen=True)
class KernelNormalization(Pass):
    """``kn``: standardize the learnable kernels of merged and linear candidates (Eq. 28)."""

    name = "kn"

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        if ctx.exact:
            return False
        merged = [n.name for n in ir.nodes() if n.notes.get("kernels") is not None]
        normalized = sum(normalize_merged(ir, m) for m in merged)
        convs: dict[str, None] = {}  # find them all first: normalizing replaces nodes
        for op in find_mixed_ops(ir):
            for i, cand in enumerate(op.candidates):
                lc = linear_candidate(ir, op, i, exact=False)
                if lc is not None and any(p.learnable for p in lc.pieces):
                    convs.update((n, None) for n in cand.branch
                                 if ir.node(n).kind is Kind.CONV)
        kept_apart = sum(normalize_conv(ir, name) for name in convs)
        if normalized:
            ctx.decide(f"normalized {normalized} kernels entering {len(merged)} merged "
                       f"convolutions")
        if kept_apart:
            ctx.decide(f"normalized the kernels of {kept_apart} linear candidate convolutions "
                       f"kept apart")
        return bool(normalized or kept_apart)
