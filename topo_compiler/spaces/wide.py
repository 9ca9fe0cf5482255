"""The enlarged ("exaggerated") DARTS search space of the TopoNAS paper.

Section 4.5 / Table VI of TopoNAS ablates partial and floating module sharing
on the DARTS network with 16 candidates: the 4 parameterless DARTS ops,
5 separable dilated convolutions (DARTS ``DilConv``) and 7 double-stacked
separable convolutions (DARTS ``SepConv``).  The network, cells and mixed ops
are those of :mod:`topo_compiler.spaces.darts`; only the candidate list
differs.  The ops are registered in :data:`topo_compiler.spaces.ops.OPS`.

Fig. 8 scales the space from 4 to 16 candidates.  ``build(num_ops=k)`` keeps
the first ``k`` ops of :data:`SCALING_ORDER`: the three parameterless ops
(skip, max pooling, average pooling) first, then alternately one dilated and
one separable convolution, each series from small to large, the two largest
separable convolutions once the dilated ones run out, and ``'none'`` last.
The paper does not list its exact order; this one adds one operation at a
time from the basic space it names.  The chosen ops keep their
:data:`PRIMITIVES` order in the built model, so ``num_ops=16`` equals the
default model.
"""
from __future__ import annotations

from typing import List, Optional

from . import darts
from .ops import SearchModel

#: The 16 candidates, in alpha-column order.
PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    # separable dilated convolutions
    'dil_conv_3x3',     # dilation 2
    'dil_conv_5x5',     # dilation 2
    'dil_conv_3x3_d3',
    'dil_conv_5x5_d3',
    'dil_conv_7x7_d2',
    # double-stacked separable convolutions
    'sep_conv_3x3',
    'sep_conv_5x5',
    'sep_conv_7x7',
    'sep_conv_9x9',
    'sep_conv_11x11',
    'sep_conv_13x13',
    'sep_conv_15x15',
]

#: Order in which candidates are added when the space grows (Fig. 8).
SCALING_ORDER = [
    'skip_connect', 'max_pool_3x3', 'avg_pool_3x3',
    'dil_conv_3x3', 'sep_conv_3x3',
    'dil_conv_5x5', 'sep_conv_5x5',
    'dil_conv_3x3_d3', 'sep_conv_7x7',
    'dil_conv_5x5_d3', 'sep_conv_9x9',
    'dil_conv_7x7_d2', 'sep_conv_11x11',
    'sep_conv_13x13', 'sep_conv_15x15',
    'none',
]

DEFAULT_LAYERS = 5


def primitives_for(num_ops: Optional[int] = None) -> List[str]:
    """The candidate list with the first ``num_ops`` ops of
    :data:`SCALING_ORDER` (all 16 when ``None``), in :data:`PRIMITIVES` order."""
    if num_ops is None:
        return list(PRIMITIVES)
    if not 1 <= num_ops <= len(PRIMITIVES):
        raise ValueError(f"num_ops must be in [1, {len(PRIMITIVES)}], got {num_ops}")
    chosen = set(SCALING_ORDER[:num_ops])
    return [p for p in PRIMITIVES if p in chosen]


def build(C: int = 16, layers: Optional[int] = None, num_classes: int = 10, *,
          num_ops: Optional[int] = None, steps: int = 4, multiplier: int = 4,
          stem_multiplier: int = 3, pool_bn: bool = True, edge: bool = False) -> SearchModel:
    """Build the DARTS search network over the wide candidate list
    (``layers`` defaults to 5), or with ``edge=True`` a single normal-cell
    ``MixedOpEdge``; ``num_ops`` selects a sub-space as described above."""
    return darts.build(C, DEFAULT_LAYERS if layers is None else layers, num_classes,
                       steps=steps, multiplier=multiplier, stem_multiplier=stem_multiplier,
                       pool_bn=pool_bn, primitives=primitives_for(num_ops), edge=edge)
