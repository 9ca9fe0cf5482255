"""Linear candidates and the kernels built from them (not a pass; paper 3.4, Eq. 14-16).

Recognition: :func:`linear_candidate` sees a candidate of a mixed op as linear
:class:`Piece`\\ s -- convolutions of any kernel size, dilation or grouping (with or without
bias), depthwise-then-pointwise pairs, identity, zero, average pooling, the linear core of
DARTS's FactorizedReduce -- or returns None; it never edits the IR.

Building: :class:`KernelBuilder` adds the kernel arithmetic of a merge or a fold to the IR
(calls to :mod:`topo_compiler.runtime`), :func:`functional_conv` and :func:`scaled_conv` the
convolutions that read those kernels.  ``merge``, ``fold`` and ``kn`` share these pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F

from topo_compiler import runtime
from topo_compiler.analysis import MixedOp
from topo_compiler.descriptors import Kind, Ref
from topo_compiler.ir import IRNode, Role, SupernetIR
from topo_compiler.passes.mixed_op_driver import Tag
from topo_compiler.passes.selection import data_inputs, is_data

__all__ = ["ModuleTensor", "NodeTensor", "TensorSource", "Piece", "LinearCandidate",
           "conv_piece", "linear_candidate", "KernelBuilder", "CONV", "functional_conv",
           "scaled_conv"]


@dataclasses.dataclass(frozen=True)
class ModuleTensor:
    """A tensor of a module the graph calls: ``<target>.<attr>`` (its weight or bias)."""

    target: str
    attr: str

    @property
    def path(self) -> str:
        return f"{self.target}.{self.attr}"


@dataclasses.dataclass(frozen=True)
class NodeTensor:
    """A tensor an IR node computes (the weight argument of a functional convolution)."""

    name: str


TensorSource = Union[ModuleTensor, NodeTensor]
"""Where a piece's kernel, pointwise kernel or bias comes from."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One linear map inside a candidate: a kernel applied to the selection's input."""

    structure: str
    """'dense' (C_out x C_in / groups), 'depthwise' (C x 1) or 'separable' (depthwise then
    pointwise)."""
    kernel: TensorSource | None
    """Where the (depthwise) kernel comes from; None for a fixed kernel."""
    fixed: str | None
    """'identity' or 'avg_pool' for the kernels that have no parameters."""
    pointwise: TensorSource | None
    bias: TensorSource | None
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
    merges_exactly: bool
    """Merging it keeps the function (average pooling with ``count_include_pad=False`` and
    padding does not: its divisor shrinks at the borders)."""
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
        kernel = ModuleTensor(node.target, "weight")
        bias = ModuleTensor(node.target, "bias") if module.bias is not None else None
        ksize, c_in, c_out = tuple(module.kernel_size), module.in_channels, module.out_channels
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight, Ref):
            return None
        w = ir.node(weight.name).val
        kernel = NodeTensor(weight.name)
        bias = NodeTensor(bias_arg.name) if isinstance(bias_arg, Ref) else None
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


def _conv_label(ir: SupernetIR, name: str, piece: Piece) -> str:
    """``conv2d 3x3 s2x2 g8``: a functional convolution (``kn`` turns module calls into
    ones reading the normalized kernel) has no ``kernel_size`` hyperparameter, so it is
    taken from the kernel, as a module's label shows it."""
    label = ir.node(name).desc.label()
    if ir.node(name).desc.hparam("kernel_size") is not None:
        return label
    op, _, rest = label.partition(" ")
    return " ".join(filter(None, (op, "x".join(map(str, piece.kernel_size)), rest)))


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
    """The candidate as linear pieces, or None when it is not linear (never edits).

    ``exact``: only candidates whose merge keeps the function for every input and weight.
    """
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
        return LinearCandidate(index, (got[0],), got[1], True, _conv_label(ir, data[0], got[0]))
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
    label = f"{_conv_label(ir, data[0], dw)} + {_conv_label(ir, data[1], pw)}"
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


class KernelBuilder:
    """Adds the kernel arithmetic of one merge (or fold) to the IR.

    ``z`` is the input the kernels are applied to; ``frame`` and ``frame_dilation`` the
    common frame kernels are placed in (a merge's; a fold places nothing).  ``learnable``
    lists, in order, the learnable kernels read so far (kernel normalization's inputs).
    """

    def __init__(self, ir: SupernetIR, z: str, tag: Tag, frame: Sequence[int] = (),
                 frame_dilation: Sequence[int] = ()):
        self.ir, self.z, self.tag = ir, z, tag
        self.frame, self.frame_dilation = tuple(frame), tuple(frame_dilation)
        self.learnable: list[str] = []

    def call(self, fn, *args, name: str, **kwargs) -> str:
        return self.ir.add_node("call_function", fn, args, kwargs, origin=self.tag.origin,
                                notes=self.tag.notes(role=Role.KERNEL), name=name).name

    def tensor(self, ref: TensorSource, learnable: bool = True) -> str:
        if isinstance(ref, NodeTensor):
            name = ref.name
        else:
            name = self.ir.add_node("get_attr", ref.path, origin=self.tag.origin,
                                    notes=self.tag.notes(role=Role.KERNEL)).name
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
                         self.frame, self.frame_dilation, name="placed")

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


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
"""The functional convolution of each number of spatial dimensions."""


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
    return ir.add_node("call_function", CONV[len(kwargs["stride"])], (Ref(data), Ref(kernel)),
                       kwargs, **node).name


def scaled_conv(b: KernelBuilder, data: str, weight: str, kernel: TensorSource,
                bias: TensorSource | None, stride: Sequence[int], piece: Piece,
                **node: Any) -> str:
    """``w * conv(data, K, b)`` computed as ``conv(data, w K, w b)``."""
    scaled = b.call(runtime.weighted_kernel_sum, [Ref(weight)], [Ref(b.tensor(kernel))],
                    name="folded_kernel")
    scaled_bias = None
    if bias is not None:
        scaled_bias = b.call(runtime.weighted_bias_sum, [Ref(weight)],
                             [Ref(b.tensor(bias, learnable=False))], name="folded_bias")
    return functional_conv(b.ir, data, scaled, scaled_bias, stride, piece, origin=b.tag.origin,
                           **node)
