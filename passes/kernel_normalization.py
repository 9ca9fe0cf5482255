"""Kernel normalization (``kn``): standardize every learnable kernel of every linear candidate
the sharing passes leave in a mixed op (paper 3.5, Eq. 28).

Sharing moves a candidate's normalization behind the mixture (PMS's common child: ``sum_i w_i
BN_i(K_i * z)`` becomes ``BN(sum_i w_i (K_i * z))``), and then the search is degenerate
(Eq. 17-27): scaling a kernel and dividing its weight by the same factor changes nothing, so
every architecture weight is optimal.  Normalizing each learnable kernel first removes that
freedom::

    before:  ... K_i ...                  (a linear candidate's convolution)
    after:   ... (K_i - mean(K_i)) / std(K_i) ...                                      (28)

Which kernels: every learnable kernel (depthwise and pointwise alike) of every linear
candidate of a mixed op found after ``pms`` and ``fms``.  A candidate that keeps its own
normalization is not linear, and its kernels are left alone: that BatchNorm absorbs their
scale.  The coupling is the same whether the candidates are later merged into one convolution
or not (``sum_i w_i (K_i * z)`` is one function), so this pass runs *before* ``merge`` and
``fold``, which then build their kernels from the normalized ones.  The paper motivates KN
by merging, but normalizing only what is merged would make the function depend on the merge
cost model's and ``fold``'s memory decisions, hence on the example batch and the device: the
same supernet compiled at batch 2 and at batch 64 would search with different kernels.  Here
the kernels normalized depend on the sharing passes only.

Choices (the paper leaves them open): statistics over each whole kernel -- the weight scales
the whole kernel, and per-filter statistics (weight standardization) would also force every
filter to zero mean, turning each depthwise filter into a high-pass filter (measured: it cost
retrained accuracy, see :func:`~topo_compiler.runtime.normalize_kernel`); std clamped at
:data:`~topo_compiler.runtime.KN_EPS` so a constant kernel gives zeros; computed in float32
for fp16 / bf16.  Fixed kernels (identity's Dirac, average
pooling's uniform kernel) have no learnable scale to couple with a weight and are left as
they are: normalizing them would replace "identity" by a different, arbitrary filter.  KN
changes the function on purpose: ``exact=True`` skips it.
"""

from __future__ import annotations

import dataclasses
import operator

from topo_compiler.analysis import find_mixed_ops
from topo_compiler.descriptors import Kind, Ref
from topo_compiler.ir import NodeNotes, Role, SupernetIR
from topo_compiler.pass_manager import Pass, PassContext
from topo_compiler.passes.linear_candidates import (ModuleTensor, conv_piece, functional_conv,
                                                    linear_candidate)
from topo_compiler.passes.mixed_op_driver import Tag
from topo_compiler.runtime import normalize_kernel, normalize_kernels

__all__ = ["KernelNormalization"]


def _is_normalized(ir: SupernetIR, name: str) -> bool:
    node = ir.node(name)
    if node.opcode == "call_function" and node.target is normalize_kernel:
        return True
    return node.desc.op == "getitem" and isinstance(node.args[0], Ref) and \
        ir.node(node.args[0].name).target is normalize_kernels


class _Requests:
    """Kernels to normalize and the nodes that must read the normalized version.

    All kernels of one shape and dtype are normalized by a single call
    (:func:`~topo_compiler.runtime.normalize_kernels`): a DARTS supernet has about a thousand small
    kernels, and one op per kernel would cost more than the convolutions they feed.
    """

    def __init__(self, ir: SupernetIR):
        self.ir = ir
        self.readers: dict[str, list[str]] = {}

    def add(self, kernel: str, readers: list[str]) -> None:
        self.readers.setdefault(kernel, []).extend(readers)

    def kernel_bytes(self) -> int:
        """Bytes of the kernels requested: what their normalized copies, which autograd keeps
        for backward (the parameters themselves are resident), add to a step's memory."""
        return sum(self.ir.node(k).val.numel() * self.ir.node(k).val.element_size()
                   for k in self.readers)

    def apply(self) -> int:
        groups: dict[tuple, list[str]] = {}
        for kernel in self.readers:
            val = self.ir.node(kernel).val
            groups.setdefault((tuple(val.shape), val.dtype), []).append(kernel)
        for (shape, _), kernels in groups.items():
            label = "x".join(map(str, shape))
            batch = self.ir.add_node("call_function", normalize_kernels,
                                     ([Ref(k) for k in kernels],), origin="kn",
                                     notes=NodeNotes(role=Role.KERNEL),
                                     name=f"normalized_{label}")
            for i, kernel in enumerate(kernels):
                one = self.ir.add_node("call_function", operator.getitem, (Ref(batch.name), i),
                                       origin="kn", notes=NodeNotes(role=Role.KERNEL),
                                       name=f"{kernel}_normalized").name
                readers = set(self.readers[kernel])
                self.ir.replace_all_uses(kernel, one, skip=[u for u in self.ir.users(kernel)
                                                            if u not in readers])
        return len(self.readers)


def request_conv(ir: SupernetIR, name: str, requests: _Requests) -> bool:
    """A linear candidate's own convolution is to read its normalized kernel (a module call
    becomes the functional convolution it computes)."""
    node = ir.node(name)
    if node.notes.kn:
        return False
    tag = Tag("kn", node.notes.mixed_op)
    if node.opcode == "call_module":
        piece, stride = conv_piece(ir, name)  # linear candidates' convs always have one

        def read(ref: ModuleTensor | None) -> str | None:
            return None if ref is None else ir.add_node(
                "get_attr", ref.path, origin="kn", notes=tag.notes(role=Role.KERNEL)).name

        weight = read(piece.kernel)
        (data,) = node.inputs
        conv = functional_conv(ir, data, weight, read(piece.bias), stride, piece, like=node,
                               origin="kn", notes=dataclasses.replace(node.notes, kn=True),
                               name=f"{name}_kn")
        ir.replace_all_uses(name, conv)
        ir.remove_node(name)
        requests.add(weight, [conv])
        return True
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, Ref) or _is_normalized(ir, weight.name):
        return False
    requests.add(weight.name, [name])
    ir.annotate(name, kn=True)
    return True


@dataclasses.dataclass(frozen=True)
class KernelNormalization(Pass):
    """``kn``: standardize the learnable kernels of linear candidates, before merge (Eq. 28)."""

    name = "kn"
    changes_function = True  # standardized kernels are other kernels

    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        if ctx.exact:
            return False
        requests = _Requests(ir)
        convs: dict[str, None] = {}  # find them all first: requesting replaces nodes
        for op in find_mixed_ops(ir):
            for i, cand in enumerate(op.candidates):
                lc = linear_candidate(ir, op, i, exact=False)
                if lc is not None and any(p.learnable for p in lc.pieces):
                    convs.update((n, None) for n in cand.branch
                                 if ir.node(n).kind is Kind.CONV)
        changed = sum(request_conv(ir, name, requests) for name in convs)
        kept = requests.kernel_bytes()
        count = requests.apply()
        if changed:
            ctx.decide(f"normalized the kernels of {changed} convolutions in linear candidates, "
                       f"before merge and fold (which kernels does not depend on their memory "
                       f"decisions)")
        if count:
            ctx.decide(f"{count} kernels normalized by one call per kernel shape; their "
                       f"normalized copies ({kept / 1024:.4g} KiB, independent of the batch) "
                       f"are kept for backward")
        return bool(changed)
