"""The NAS-Bench-201 search space with DARTS-style continuous relaxation.

Follows AutoDL-Projects (Dong & Yang, "NAS-Bench-201: Extending the Scope of
Reproducible Neural Architecture Search", ICLR 2020),
https://github.com/D-X-Y/AutoDL-Projects: ``SearchCell`` is
``lib/models/cell_searchs/search_cells.py`` (its DARTS ``forward`` only),
``TinyNetworkDarts`` is ``lib/models/cell_searchs/search_model_darts.py``,
``ResNetBasicblock`` and the ops come from ``lib/models/cell_operations.py``,
and ``genotype()`` returns the string of ``genotypes.Structure.tostr()``.
Differences from the original: cells are always stride 1 with equal
input/output channels (the only configuration ``TinyNetworkDarts`` uses), the
candidate ops come from the shared :data:`~topo_compiler.spaces.ops.OPS`
table (identical modules at stride 1), and the alphas attribute is named
``arch_alphas`` so that ``arch_parameters()`` can be a method.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import OPS, ReLUConvBN, SearchModel, SingleEdgeModel, check_primitives

#: NAS-Bench-201 candidate operations, in AutoDL order (``NAS_BENCH_201``).
PRIMITIVES = ['none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3']

DEFAULT_LAYERS = 5


class ResNetBasicblock(nn.Module):
    """AutoDL ``ResNetBasicblock``: two ReLU-Conv3x3-BN layers plus a shortcut
    (AvgPool2x2 + Conv1x1 at stride 2); the reduction block between stages."""

    def __init__(self, inplanes: int, planes: int, stride: int, affine: bool = True):
        super().__init__()
        assert stride == 1 or stride == 2, f"invalid stride {stride}"
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1, affine=affine)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1, affine=affine)
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False))
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0, affine=affine)
        else:
            self.downsample = None

    def forward(self, inputs):
        basicblock = self.conv_a(inputs)
        basicblock = self.conv_b(basicblock)

        if self.downsample is not None:
            residual = self.downsample(inputs)
        else:
            residual = inputs
        return residual + basicblock


class SearchCell(nn.Module):
    """AutoDL ``SearchCell``: a DAG of ``max_nodes`` nodes where node ``i``
    sums, over every ``j < i``, the alpha-weighted candidate ops of edge
    ``'{i}<-{j}'``; the cell outputs the last node.  ``edges`` is an
    ``nn.ModuleDict`` of per-edge ``nn.ModuleList``\\ s and ``edge2index`` maps
    each key to its alpha row (keys in sorted order)."""

    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str] = PRIMITIVES,
                 affine: bool = False):
        super().__init__()
        self.edges = nn.ModuleDict()
        self.max_nodes = max_nodes
        for i in range(1, max_nodes):
            for j in range(i):
                node_str = '{:}<-{:}'.format(i, j)
                self.edges[node_str] = nn.ModuleList(
                    [OPS[op_name](C, 1, affine) for op_name in op_names])
        self.edge_keys = sorted(list(self.edges.keys()))
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = '{:}<-{:}'.format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(layer(nodes[j]) * w
                                       for layer, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyNetworkDarts(SearchModel):
    """AutoDL ``TinyNetworkDarts``: stem conv3x3(3, C) + BN, three stages of
    ``N`` search cells (C, 2C, 4C channels) separated by stride-2
    ``ResNetBasicblock``\\ s, then BN-ReLU, global average pooling and a linear
    classifier.  All search cells share one alpha tensor ``arch_alphas`` of
    shape ``(edges per cell, num ops)``.  ``forward`` returns
    ``(features, logits)`` like AutoDL."""

    def __init__(self, C: int, N: int, max_nodes: int, num_classes: int,
                 search_space: Sequence[str] = PRIMITIVES, affine: bool = False):
        super().__init__()
        self.max_nodes = max_nodes
        self.stem = nn.Sequential(
            nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(C))

        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N

        C_prev, num_edge, edge2index = C, None, None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResNetBasicblock(C_prev, C_curr, 2)
            else:
                cell = SearchCell(C_curr, max_nodes, search_space, affine)
                num_edge, edge2index = cell.num_edges, cell.edge2index
            self.cells.append(cell)
            C_prev = C_curr
        self.primitives = list(search_space)
        self.edge2index = edge2index
        self.num_mixed_ops = 3 * N * num_edge
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch_alphas = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.arch_alphas]

    def genotype(self) -> str:
        """AutoDL's architecture string, the argmax op (``'none'`` included) of
        every edge: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
        genotypes = []
        for i in range(1, self.max_nodes):
            xlist = []
            for j in range(i):
                node_str = '{:}<-{:}'.format(i, j)
                with torch.no_grad():
                    weights = self.arch_alphas[self.edge2index[node_str]]
                    op_name = self.primitives[weights.argmax().item()]
                xlist.append((op_name, j))
            genotypes.append(xlist)
        return '+'.join('|{:}|'.format('|'.join('{:}~{:}'.format(op, j) for op, j in node))
                        for node in genotypes)

    def forward(self, inputs):
        alphas = F.softmax(self.arch_alphas, dim=-1)

        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, SearchCell):
                feature = cell(feature, alphas)
            else:
                feature = cell(feature)

        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        logits = self.classifier(out)

        return out, logits


class SearchEdge(SingleEdgeModel):
    """A single NAS-Bench-201 search-cell edge (the ops of one
    ``SearchCell.edges[...]`` entry) with its own ``alpha`` of shape
    ``(num_ops,)``; input and output are ``(N, C, H, W)``."""

    def __init__(self, C: int, primitives: Sequence[str] = PRIMITIVES, affine: bool = False):
        super().__init__(primitives)
        self.edge = nn.ModuleList([OPS[op_name](C, 1, affine) for op_name in self.primitives])

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        return sum(layer(x) * w for layer, w in zip(self.edge, weights))


def build(C: int = 16, layers: Optional[int] = None, num_classes: int = 10, *,
          max_nodes: int = 4, primitives: Optional[Sequence[str]] = None,
          edge: bool = False) -> SearchModel:
    """Build ``TinyNetworkDarts`` with ``N = layers`` search cells per stage
    (default 5), or with ``edge=True`` a single ``SearchEdge`` of ``C``
    channels (``layers``, ``num_classes`` and ``max_nodes`` are then unused).
    Search cells use ``affine=False`` and ``track_running_stats=True``.
    ``primitives`` replaces the NAS-Bench-201 candidate list by any names from
    :data:`~topo_compiler.spaces.ops.OPS`."""
    primitives = check_primitives(PRIMITIVES if primitives is None else primitives)
    if edge:
        return SearchEdge(C, primitives)
    layers = DEFAULT_LAYERS if layers is None else layers
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if max_nodes < 2:
        raise ValueError(f"max_nodes must be >= 2, got {max_nodes}")
    return TinyNetworkDarts(C, layers, max_nodes, num_classes, primitives)
