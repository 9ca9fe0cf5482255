"""Supernets a symbolic tracer must refuse (with the culprit source line).

Each case imitates a pattern from public one-shot NAS code whose forward depends
on *values* (of tensors or of Python RNGs), so no single traced graph is
equivalent to it:

* ``tensor_value_branch``: Python ``if`` on a tensor value
  (``if weights[0] > 0.5:``), as in thresholded / pruning DARTS variants;
* ``item_index``: ``.item()`` used to pick the op --
  ``self._ops[weights.argmax().item()](x)``, AutoDL-Projects'
  ``NAS201SearchCell.forward_select`` idiom;
* ``item_branch``: ``.item()`` compared in an ``if``;
* ``int_of_tensor``: ``int(torch.argmax(weights))`` used as an index;
* ``python_random``: SPOS-style uniform path sampling with
  ``random.randint(0, len(self._ops) - 1)`` (Single Path One-Shot /
  AutoDL ``forward_urs``);
* ``numpy_random``: the same with ``np.random.choice(len(self._ops))``
  (only registered when numpy is importable);
* ``gdas_autodl``: the real GDAS forward (``while True:`` gumbel resampling
  guarded by ``torch.isinf(gumbels).any()``, then ``index[...].item()``) from
  :mod:`.gdas_autodl`.

Note that plain ``torch.fx.symbolic_trace`` *succeeds silently* on the two
random cases (the sampled index is baked into the graph), so they test that a
tracer detects Python-level randomness rather than merely failing.

``UNTRACEABLE = {name: Case(factory, example_inputs, culprit_substring,
plain_fx)}``; ``culprit_substring`` is a piece of the source line to blame
(in this file, or in ``gdas_autodl.py`` for ``gdas_autodl``), so an error
message quoting that line contains it.  ``plain_fx`` records what plain
``torch.fx.symbolic_trace`` does: ``'error'`` (raises) or ``'silent'``
(traces, specializing on one sample).
"""
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gdas_autodl

try:
    import numpy as np
except ImportError:  # numpy is not a dependency of the project
    np = None


@dataclass(frozen=True)
class Case:
    factory: Callable[[], nn.Module]
    example_inputs: Callable[..., tuple]
    culprit_substring: str
    # 'error': plain torch.fx raises; 'silent': plain torch.fx specializes silently
    plain_fx: str = 'error'


C = 8
HW = 8


def _candidates(C):
    return [
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, padding=1, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 1, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Identity(),
    ]


def _x_only(batch_size=2):
    return (torch.randn(batch_size, C, HW, HW),)


class _Base(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self._ops)))

    def arch_parameters(self):
        return [self.alpha]


# --------------------------------------------------------------------------
class TensorValueBranch(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        if weights[0] > 0.5:
            return self._ops[0](x)
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class ItemIndex(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        return self._ops[weights.argmax().item()](x)


class ItemBranch(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        if weights.argmin().item() == 0:
            return weights[1] * self._ops[1](x) + weights[2] * self._ops[2](x)
        return weights[0] * self._ops[0](x) + weights[3] * self._ops[3](x)


class IntOfTensor(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        k = int(torch.argmax(weights))
        return weights[k] * self._ops[k](x)


class PythonRandom(nn.Module):
    """SPOS: each choice block runs one uniformly sampled candidate."""

    def __init__(self, C=C, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList(_candidates(C)) for _ in range(layers))

    def arch_parameters(self):
        return []

    def forward(self, x):
        for block in self.blocks:
            idx = random.randint(0, len(block) - 1)
            x = block[idx](x)
        return x


class NumpyRandom(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))

    def arch_parameters(self):
        return []

    def forward(self, x):
        idx = np.random.choice(len(self._ops))
        return self._ops[idx](x)


# --------------------------------------------------------------------------
UNTRACEABLE = {
    'tensor_value_branch': Case(TensorValueBranch, _x_only, 'if weights[0] > 0.5:'),
    'item_index': Case(ItemIndex, _x_only, 'self._ops[weights.argmax().item()](x)'),
    'item_branch': Case(ItemBranch, _x_only, 'if weights.argmin().item() == 0:'),
    'int_of_tensor': Case(IntOfTensor, _x_only, 'k = int(torch.argmax(weights))'),
    'python_random': Case(PythonRandom, _x_only, 'random.randint(0, len(block) - 1)', plain_fx='silent'),
    'gdas_autodl': Case(gdas_autodl.build, gdas_autodl.example_inputs, gdas_autodl.CULPRIT_SUBSTRING),
}
if np is not None:
    UNTRACEABLE['numpy_random'] = Case(NumpyRandom, _x_only, 'np.random.choice(len(self._ops))', plain_fx='silent')

# name -> culprit substring (module-level constant, as some tests may prefer it)
CULPRIT_SUBSTRING = {name: case.culprit_substring for name, case in UNTRACEABLE.items()}
