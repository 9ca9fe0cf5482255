"""The DARTS CIFAR search space.

Follows DARTS (Liu et al., "DARTS: Differentiable Architecture Search",
ICLR 2019), https://github.com/quark0/darts ``cnn/model_search.py`` and
``cnn/genotypes.py``: ``MixedOp``, ``Cell`` and ``Network`` keep the original
structure and forward code.  Differences from the original, all needed for a
self-contained, configurable module:

* the candidate-op list is a constructor argument instead of the global
  ``PRIMITIVES`` (the "wide" space reuses this network with 16 candidates);
* ``pool_bn=False`` drops the ``BatchNorm2d(C, affine=False)`` DARTS appends to
  pooling candidates, giving the bare pooling ops of the TopoNAS paper's
  Table I;
* the alphas are registered ``nn.Parameter`` objects (not CUDA ``Variable``
  objects outside ``parameters()``) and the loss/criterion plumbing is left to
  the caller;
* ``genotype()`` returns the concat ranges as lists.
"""
from __future__ import annotations

from collections import namedtuple
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import OPS, FactorizedReduce, ReLUConvBN, SearchModel, SingleEdgeModel, check_primitives

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

#: DARTS candidate operations, in DARTS order (``cnn/genotypes.py``).
PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
]

DEFAULT_LAYERS = 8


class MixedOp(nn.Module):
    """One searchable edge: the alpha-weighted sum of all candidate ops.

    Ops are built with ``affine=False``; with ``pool_bn=True`` every pooling op
    is followed by ``BatchNorm2d(C, affine=False)`` exactly as in DARTS.
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES,
                 pool_bn: bool = True):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in primitives:
            op = OPS[primitive](C, stride, False)
            if pool_bn and 'pool' in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    """A DARTS search cell: two preprocessed inputs, ``steps`` intermediate
    nodes each summing a ``MixedOp`` over every earlier state, and the last
    ``multiplier`` states concatenated as output.  In a reduction cell the
    edges leaving the two inputs have stride 2."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool,
                 primitives: Sequence[str] = PRIMITIVES, pool_bn: bool = True):
        super().__init__()
        self.reduction = reduction

        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier

        self._ops = nn.ModuleList()
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, primitives, pool_bn))

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)

        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)

        return torch.cat(states[-self._multiplier:], dim=1)


class Network(SearchModel):
    """The DARTS CIFAR search network (``model_search.Network``).

    Stem conv3x3(3, ``stem_multiplier * C``) + BN, ``layers`` cells with
    reduction cells at positions ``layers // 3`` and ``2 * layers // 3``
    (channels double at each), global average pooling and a linear
    classifier.  Normal and reduction cells share ``alphas_normal`` and
    ``alphas_reduce`` respectively, each of shape ``(edges per cell, num ops)``.
    """

    def __init__(self, C: int, num_classes: int, layers: int, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] = PRIMITIVES, pool_bn: bool = True):
        super().__init__()
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier
        self.primitives = list(primitives)

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )

        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                        self.primitives, pool_bn)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr

        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self._initialize_alphas()

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            if cell.reduction:
                weights = F.softmax(self.alphas_reduce, dim=-1)
            else:
                weights = F.softmax(self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits

    def _initialize_alphas(self):
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        num_ops = len(self.primitives)

        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, num_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, num_ops))
        self.num_mixed_ops = self._layers * k

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def genotype(self) -> Genotype:
        """Discretize as DARTS does: for every intermediate node keep the two
        incoming edges with the strongest non-'none' op, and that op."""
        none = self.primitives.index('none') if 'none' in self.primitives else None

        def _parse(weights):
            gene = []
            n = 2
            start = 0
            for i in range(self._steps):
                end = start + n
                W = weights[start:end]
                edges = sorted(range(i + 2), key=lambda x: -max(
                    W[x][k] for k in range(len(W[x])) if k != none))[:2]
                for j in edges:
                    k_best = None
                    for k in range(len(W[j])):
                        if k != none:
                            if k_best is None or W[j][k] > W[j][k_best]:
                                k_best = k
                    gene.append((self.primitives[k_best], j))
                start = end
                n += 1
            return gene

        with torch.no_grad():
            gene_normal = _parse(F.softmax(self.alphas_normal, dim=-1).tolist())
            gene_reduce = _parse(F.softmax(self.alphas_reduce, dim=-1).tolist())

        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=gene_normal, normal_concat=concat,
                        reduce=gene_reduce, reduce_concat=concat)


class MixedOpEdge(SingleEdgeModel):
    """A single normal-cell edge (``MixedOp(C, stride=1)``) with its own
    ``alpha`` of shape ``(num_ops,)``; input and output are ``(N, C, H, W)``."""

    def __init__(self, C: int, primitives: Sequence[str] = PRIMITIVES, pool_bn: bool = True):
        super().__init__(primitives)
        self.op = MixedOp(C, 1, self.primitives, pool_bn)

    def forward(self, x):
        return self.op(x, F.softmax(self.alpha, dim=-1))


def build(C: int = 16, layers: Optional[int] = None, num_classes: int = 10, *,
          steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
          pool_bn: bool = True, primitives: Optional[Sequence[str]] = None,
          edge: bool = False) -> SearchModel:
    """Build the DARTS search network (``layers`` defaults to 8), or with
    ``edge=True`` a single ``MixedOpEdge`` of ``C`` channels (``layers``,
    ``num_classes``, ``steps``, ``multiplier`` and ``stem_multiplier`` are then
    unused).  ``primitives`` replaces the DARTS candidate list by any names
    from :data:`~topo_compiler.spaces.ops.OPS`."""
    primitives = check_primitives(PRIMITIVES if primitives is None else primitives)
    if edge:
        return MixedOpEdge(C, primitives, pool_bn)
    layers = DEFAULT_LAYERS if layers is None else layers
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return Network(C, num_classes, layers, steps=steps, multiplier=multiplier,
                   stem_multiplier=stem_multiplier, primitives=primitives, pool_bn=pool_bn)
