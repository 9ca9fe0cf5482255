"""Test supernets written in the code styles of public one-shot NAS codebases.

Plain PyTorch (no dependency on ``topo_compiler``), tiny sizes, CPU friendly.

* :data:`FOREIGN` -- traceable whole-network supernets, one per codebase style:
  ``Supernet(build, example_inputs, num_mixed_ops, output_kind, ...)``;
* :data:`IDIOMS` -- one tiny model per tracer idiom (see :mod:`.idioms`);
* :data:`UNTRACEABLE` -- models a symbolic tracer must refuse, with the culprit
  source substring (see :mod:`.untraceable`).

``example_inputs(batch_size=2)`` returns the tuple of forward args everywhere;
pass another ``batch_size`` to check batch-size generality.

``num_mixed_ops`` counts mixed-op *sites* (one weighted sum of >= 2 candidate
ops reading one input).  Weighted sums over *different* inputs (PC-DARTS edge
normalisation ``weights2``, NNI ``DartsInputChoice``, node sums ``sum(states)``)
are not mixed ops and are not counted.  Counts are by construction:

* darts_original: 3 cells x 14 edges (steps=4: 2+3+4+5)         = 42
* pc_darts:       3 cells x 9 edges  (steps=3: 2+3+4)           = 27
* nb201_autodl:   3 search cells x 6 edges (max_nodes=4)        = 18
  (the 2 ResNetBasicblock reduction blocks are not searchable)
* gdas_hard_weights: same topology as nb201_autodl               = 18
* nni_darts:      2 cells x (2+3) LayerChoices (n_nodes=2)      = 10
  (plus 4 DartsInputChoices, not counted)
* nni_darts_none_slot: the same, each LayerChoice stacking its candidates with a zero
  slot for ``none`` appended                                   = 10
* edge_norm:      2 cells x 2 edges (steps=1), each edge's output under its own
  BatchNorm, weighted by edge-normalization betas (not counted) = 4
* mbconv:         3 blocks of MBConv candidates (expand 3 and 6) = 3
"""
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch.nn as nn

from . import (darts_original, edge_norm, gdas_autodl, mbconv, nb201_autodl, nni_layerchoice,
               pc_darts)
from .idioms import IDIOMS, Idiom
from .untraceable import UNTRACEABLE, Case

OUTPUT_TENSOR = 'tensor'   # forward returns logits
OUTPUT_TUPLE = 'tuple'     # forward returns (features, logits)


@dataclass(frozen=True)
class Supernet:
    build: Callable[[], nn.Module]
    example_inputs: Callable[..., tuple]
    num_mixed_ops: int
    output_kind: str
    # model -> the architecture tensors held by the model (leaf, requires_grad)
    get_alphas: Optional[Callable[[nn.Module], List]] = None
    # positions in example_inputs() that are architecture weights
    weight_args: Tuple[int, ...] = field(default=())
    source: str = ''


FOREIGN = {
    'darts_original': Supernet(
        darts_original.build, darts_original.example_inputs,
        darts_original.NUM_MIXED_OPS,            # 3 cells x 14 edges = 42
        OUTPUT_TENSOR, darts_original.get_alphas,
        source='quark0/darts cnn/model_search.py'),
    'pc_darts': Supernet(
        pc_darts.build, pc_darts.example_inputs,
        pc_darts.NUM_MIXED_OPS,                  # 3 cells x 9 edges = 27
        OUTPUT_TENSOR, pc_darts.get_alphas,
        source='yuhuixu1993/PC-DARTS model_search.py'),
    'nb201_autodl': Supernet(
        nb201_autodl.build, nb201_autodl.example_inputs,
        nb201_autodl.NUM_MIXED_OPS,              # 3 search cells x 6 edges = 18
        OUTPUT_TUPLE, nb201_autodl.get_alphas,
        source='D-X-Y/AutoDL-Projects lib/models/cell_searchs/search_model_darts.py'),
    'gdas_hard_weights': Supernet(
        gdas_autodl.build_hard_weights, gdas_autodl.example_inputs_hard_weights,
        gdas_autodl.NUM_MIXED_OPS,               # 3 search cells x 6 edges = 18
        OUTPUT_TUPLE, lambda model: [], weight_args=(1,),
        source='D-X-Y/AutoDL-Projects lib/models/cell_searchs/search_model_gdas.py (hardwts as forward arg)'),
    'nni_darts': Supernet(
        nni_layerchoice.build, nni_layerchoice.example_inputs,
        nni_layerchoice.NUM_MIXED_OPS,           # 2 cells x (2+3) LayerChoices = 10
        OUTPUT_TENSOR, nni_layerchoice.get_alphas,
        source='microsoft/nni DartsLayerChoice / DartsInputChoice'),
    'nni_darts_none_slot': Supernet(
        nni_layerchoice.build_none_slot, nni_layerchoice.example_inputs,
        nni_layerchoice.NUM_MIXED_OPS,           # 2 cells x (2+3) LayerChoices = 10
        OUTPUT_TENSOR, nni_layerchoice.get_alphas,
        source='microsoft/nni differentiable layer: stack + zeros_like slot for none'),
    'edge_norm': Supernet(
        edge_norm.build, edge_norm.example_inputs,
        edge_norm.NUM_MIXED_OPS,                 # 2 cells x 2 edges = 4
        OUTPUT_TENSOR, edge_norm.get_alphas,
        source='yuhuixu1993/PC-DARTS edge normalization, one BatchNorm per edge'),
    'mbconv': Supernet(
        mbconv.build, mbconv.example_inputs,
        mbconv.NUM_MIXED_OPS,                    # 3 blocks
        OUTPUT_TENSOR, mbconv.get_alphas,
        source='ProxylessNAS / FBNet-style MixedEdge over MBConv candidates'),
}

assert FOREIGN['darts_original'].num_mixed_ops == 42
assert FOREIGN['pc_darts'].num_mixed_ops == 27
assert FOREIGN['nb201_autodl'].num_mixed_ops == 18
assert FOREIGN['gdas_hard_weights'].num_mixed_ops == 18
assert FOREIGN['nni_darts'].num_mixed_ops == 10
assert FOREIGN['nni_darts_none_slot'].num_mixed_ops == 10
assert FOREIGN['edge_norm'].num_mixed_ops == 4
assert FOREIGN['mbconv'].num_mixed_ops == 3

__all__ = [
    'FOREIGN', 'IDIOMS', 'UNTRACEABLE', 'Supernet', 'Idiom', 'Case',
    'OUTPUT_TENSOR', 'OUTPUT_TUPLE',
]
