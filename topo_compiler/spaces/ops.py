"""Candidate operations shared by every built-in search space.

The building blocks follow DARTS (Liu et al., ICLR 2019), ``cnn/operations.py``
of https://github.com/quark0/darts: ``Zero``, ``FactorizedReduce``,
``ReLUConvBN``, ``SepConv`` and ``DilConv`` keep DARTS' layer order, ``bias=False``
convolutions and ``ReLU(inplace=False)``; ``skip_connect`` at stride 1 is
``nn.Identity``, equivalent to DARTS' own ``Identity`` module.  The NAS-Bench-201 ops of
AutoDL-Projects (``lib/models/cell_operations.py``) are the same modules at
stride 1 (``nor_conv_kxk`` is a ``ReLUConvBN``, pooling has no extra BN), so a
single op factory table, :data:`OPS`, serves all spaces.

Also defined here are the two base classes every built model derives from:
:class:`SearchModel` (the ``arch_parameters()`` / ``weights()`` /
``genotype()`` API) and :class:`SingleEdgeModel` (one searchable edge with its
own architecture parameter, for ``build(..., edge=True)``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn


class Zero(nn.Module):
    """The ``none`` operation: an all-zero output (DARTS ``Zero``).

    Computed as ``x.mul(0.)`` (subsampled first when ``stride > 1``) so the
    result keeps the input's dtype, device and autograd connection.
    """

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class FactorizedReduce(nn.Module):
    """DARTS ``FactorizedReduce``: ReLU, two 1x1 stride-2 convolutions on ``x``
    and on ``x`` shifted by one pixel, concatenated along channels, then BN.

    Used as ``skip_connect`` at stride 2 and as ``preprocess0`` of a cell that
    follows a reduction cell.  Requires an even ``C_out`` and even input
    height/width.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        assert C_out % 2 == 0, f"FactorizedReduce needs an even C_out, got {C_out}"
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


class ReLUConvBN(nn.Module):
    """ReLU - Conv(bias=False) - BN (DARTS ``ReLUConvBN``; AutoDL's
    ``nor_conv_kxk`` / ``ReLUConvBN`` with dilation 1)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int,
                 padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """DARTS ``DilConv``, a separable dilated convolution:
    ReLU - depthwise Conv(dilation) - pointwise 1x1 Conv - BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int,
                 padding: int, dilation: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """DARTS ``SepConv``, a double-stacked separable convolution:
    ReLU - dwConv(stride) - pwConv - BN - ReLU - dwConv(stride 1) - pwConv - BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int,
                 padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=1, padding=padding,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


OpFactory = Callable[[int, int, bool], nn.Module]

#: Op factory table ``name -> lambda C, stride, affine: module`` shared by all
#: spaces.  Every op maps ``C`` channels to ``C`` channels and divides the
#: spatial size by ``stride``.  Names state kernel size and dilation:
#: ``dil_conv_KxK`` has dilation 2 (the DARTS names), ``dil_conv_KxK_dD`` has
#: dilation ``D``; padding is ``dilation * (K - 1) // 2`` throughout.
OPS: Dict[str, OpFactory] = {
    # DARTS (quark0/darts cnn/operations.py) and NAS-Bench-201 parameterless ops.
    'none': lambda C, stride, affine: Zero(stride),
    'max_pool_3x3': lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    'avg_pool_3x3': lambda C, stride, affine: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False),
    'skip_connect': lambda C, stride, affine: (
        nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)),
    # Separable dilated convolutions (DARTS DilConv).
    'dil_conv_3x3': lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    'dil_conv_5x5': lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    'dil_conv_3x3_d3': lambda C, stride, affine: DilConv(C, C, 3, stride, 3, 3, affine=affine),
    'dil_conv_5x5_d3': lambda C, stride, affine: DilConv(C, C, 5, stride, 6, 3, affine=affine),
    'dil_conv_7x7_d2': lambda C, stride, affine: DilConv(C, C, 7, stride, 6, 2, affine=affine),
    # Double-stacked separable convolutions (DARTS SepConv).
    'sep_conv_3x3': lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    'sep_conv_5x5': lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    'sep_conv_7x7': lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    'sep_conv_9x9': lambda C, stride, affine: SepConv(C, C, 9, stride, 4, affine=affine),
    'sep_conv_11x11': lambda C, stride, affine: SepConv(C, C, 11, stride, 5, affine=affine),
    'sep_conv_13x13': lambda C, stride, affine: SepConv(C, C, 13, stride, 6, affine=affine),
    'sep_conv_15x15': lambda C, stride, affine: SepConv(C, C, 15, stride, 7, affine=affine),
    # NAS-Bench-201 convolutions (AutoDL-Projects lib/models/cell_operations.py).
    'nor_conv_1x1': lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine=affine),
    'nor_conv_3x3': lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine=affine),
}


def check_primitives(primitives: Sequence[str]) -> List[str]:
    """Validate a candidate-op list against :data:`OPS` and return it as a list.

    The list must be non-empty, free of duplicates, contain only names from
    :data:`OPS`, and contain at least one op other than ``'none'`` (a genotype
    never selects ``'none'`` in DARTS).
    """
    if isinstance(primitives, str):
        raise TypeError("primitives must be a sequence of op names, not a string")
    primitives = list(primitives)
    unknown = [p for p in primitives if p not in OPS]
    if unknown:
        raise ValueError(f"unknown primitives {unknown}; available ops: {sorted(OPS)}")
    if len(set(primitives)) != len(primitives):
        raise ValueError(f"duplicate primitives in {primitives}")
    if not any(p != 'none' for p in primitives):
        raise ValueError(f"primitives need at least one op other than 'none', got {primitives}")
    return primitives


class SearchModel(nn.Module):
    """Base class of the built supernets.

    Subclasses set ``primitives`` (candidate op names, in alpha-column order)
    and ``num_mixed_ops`` (searchable edges in the whole model), and implement
    :meth:`arch_parameters` and :meth:`genotype`.  :meth:`weights` returns
    every other parameter, so the two lists partition ``parameters()``.
    """

    primitives: List[str]
    num_mixed_ops: int

    def arch_parameters(self) -> List[nn.Parameter]:
        raise NotImplementedError

    def weights(self) -> List[nn.Parameter]:
        """All parameters that are not architecture parameters."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self):
        raise NotImplementedError


class SingleEdgeModel(SearchModel):
    """One searchable edge with its own architecture parameter ``alpha`` of
    shape ``(num_ops,)``; subclasses build the candidate ops and compute
    ``F.softmax(self.alpha, dim=-1)`` in ``forward``."""

    def __init__(self, primitives: Sequence[str]):
        super().__init__()
        self.primitives = list(primitives)
        self.num_mixed_ops = 1
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self.primitives)))

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.alpha]

    def genotype(self) -> str:
        """Name of the op with the largest alpha."""
        return self.primitives[int(self.alpha.argmax())]
