"""Weight folding (``fold``): an architecture weight multiplying the output of one convolution
or BatchNorm goes into that module's kernel or affine transform.

::

    before:  w * conv(z, K, b)          w * bn(u)
    after:   conv(z, w K, w b)          bn(u) with weight w * gamma and bias w * beta

Exact (the same function, the same running-statistics update, for every input and weight),
so it also runs with ``exact=True``.  It removes the product of full tensors together with
the output autograd kept for ``w``'s gradient.  A product is folded only where it is the
module's only use, and a convolution only where its scaled kernel -- which autograd keeps
for backward instead -- is no larger than the output it frees (:func:`fold_pays`, at the
pass's ``batch``: kernels do not grow with the batch, activations do).  Runs after
``merge``: the selections PMS, FMS and merge leave behind are where such products sit.  Naming ``merge`` in ``passes=`` also runs ``fold`` (see
:data:`~topo_compiler.passes.IMPLIED`), which keeps the results ``merge`` gave when it
folded weights itself.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from topo_compiler import runtime
from topo_compiler.descriptors import Kind, Ref
from topo_compiler.ir import IRNode, Role, SupernetIR
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes.linear_candidates import KernelBuilder, conv_piece, scaled_conv
from topo_compiler.passes.mixed_op_driver import Tag

__all__ = ["WeightFolding", "match_fold", "fold_pays", "fold_weights"]

_FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class FoldMatch:
    """``product = weight * term``, where ``term`` is a convolution or BatchNorm read only by
    the product."""

    product: str
    weight: str
    term: str


def _is_weight(node: IRNode) -> bool:
    return node.notes.is_weight and isinstance(node.val, torch.Tensor) and \
        node.val.numel() == 1


def match_fold(ir: SupernetIR, name: str) -> FoldMatch | None:
    """The fold at the product ``name``, or None (never edits the IR)."""
    node = ir.node(name)
    if node.desc.op != "mul" or node.kind is not Kind.ARITH or node.kwargs or \
            len(node.args) != 2 or not all(isinstance(a, Ref) for a in node.args):
        return None
    a, b = (ir.node(r.name) for r in node.args)
    weight, term = (a, b) if _is_weight(a) else (b, a) if _is_weight(b) else (None, None)
    if weight is None or ir.users(term.name) != [name]:
        return None
    if term.opcode == "call_module" and isinstance(ir.modules[term.target], _FOLDABLE_NORMS):
        return FoldMatch(name, weight.name, term.name)
    if term.kind is Kind.CONV and conv_piece(ir, term.name) is not None and \
            isinstance(term.args[0], Ref):
        return FoldMatch(name, weight.name, term.name)
    return None


def rewrite_fold(ir: SupernetIR, match: FoldMatch) -> str:
    """Replace ``weight * term`` by the term's module with the weight folded in."""
    term = ir.node(match.term)
    tag = Tag("fold", term.notes.mixed_op)
    notes = dataclasses.replace(term.notes, folded_weight=True)
    if term.opcode == "call_module" and isinstance(ir.modules[term.target], _FOLDABLE_NORMS):
        module = ir.add_node("get_attr", term.target, origin="fold",
                             notes=tag.notes(role=Role.KERNEL))
        new = ir.add_node("call_function", runtime.scaled_batch_norm,
                          (Ref(module.name), term.args[0], Ref(match.weight)), origin="fold",
                          module_path=term.module_path, source=term.source, notes=notes,
                          name=f"{term.name}_scaled").name
    else:
        piece, stride = conv_piece(ir, term.name)
        b = KernelBuilder(ir, term.args[0].name, tag)
        new = scaled_conv(b, b.z, match.weight, piece.kernel, piece.bias, stride, piece,
                          like=term, notes=notes, name=f"{term.name}_scaled")
    ir.replace_all_uses(match.product, new)
    ir.remove_dead([match.product])
    return new


def fold_pays(ir: SupernetIR, match: FoldMatch, batch: int | None = None) -> bool:
    """Whether the fold keeps no more bytes for backward than it frees: the product kept
    the term's output (for ``w``'s gradient), a folded convolution keeps its scaled kernel
    and bias; ``batch`` scales the output (default: the example inputs' batch)."""
    term = ir.node(match.term)
    if term.kind is not Kind.CONV:
        return True  # BatchNorm: a C-element scaled affine transform
    piece, _ = conv_piece(ir, match.term)
    out = term.val.numel() * (batch / term.val.shape[0] if batch else 1)
    kernel = piece.out_channels * (piece.in_channels // piece.groups) * \
        math.prod(piece.kernel_size) + (piece.out_channels if piece.bias else 0)
    return kernel <= out


def fold_weights(ir: SupernetIR, batch: int | None = None) -> tuple[list[str], list[str]]:
    """Fold every foldable product that pays (:func:`fold_pays`), in program order, so nested
    products (``w_F * (w' * conv)``) fold one after the other; returns (the products folded,
    the products kept because folding would keep more)."""
    folded, kept = [], []
    for name in ir.topological_order():
        if name not in ir:
            continue
        match = match_fold(ir, name)
        if match is None:
            continue
        if fold_pays(ir, match, batch):
            rewrite_fold(ir, match)
            folded.append(name)
        else:
            kept.append(name)
    return folded, kept


@dataclasses.dataclass(frozen=True)
class WeightFolding(Pass):
    """``fold``: fold architecture weights into the convolution or BatchNorm computing their
    term."""

    name = "fold"
    batch: int | None = None
    """Batch size the memory comparison assumes (default: the example inputs'): compile with
    the training batch or say it here."""

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        folded, kept = fold_weights(ir, self.batch)
        if folded:
            ctx.decide(f"folded {len(folded)} weights into the convolution or BatchNorm "
                       f"that computes their term (w * conv(z) = conv(z, w K), w * bn(u) = "
                       f"bn(u) with its affine transform scaled)")
        if kept:
            ctx.decide(f"kept {len(kept)} products w * conv(z) as they are: the scaled "
                       f"kernel autograd would keep is larger than the output it frees at "
                       f"batch {self.batch or 'of the example inputs'}")
        return bool(folded)
