"""One tiny supernet per tracer idiom seen in public one-shot NAS code.

Not a copy of any single codebase: each class isolates one way that DARTS-family
code (quark0/darts, PC-DARTS, P-DARTS, SDARTS / RobustDARTS, AutoDL-Projects,
NNI, NASLib) writes a mixed op, or passes / stores architecture weights, so a
compiler failure points at exactly one idiom.  Every model is a correct
supernet: each mixed op is a weighted sum of >= 2 candidate ops that all read
the same input tensor.

``IDIOMS = {name: Idiom(factory, example_inputs, num_mixed_ops, ...)}``; each
``example_inputs(batch_size=2)`` returns the tuple of forward args.  Models
whose architecture weights live in the model expose ``arch_parameters()``;
``Idiom.weight_args`` lists the positions of forward args that *are*
architecture weights (weights passed as forward arguments).

Idioms (key: what it exercises):

* ``op_times_w``: ``sum(op(x) * w for op, w in zip(self._ops, weights))``
  (candidate on the left of ``*``), two mixed ops in sequence;
* ``enumerate_loop``: ``for i, op in enumerate(self._ops): out = out +
  weights[i] * op(x)`` starting from ``out = 0``;
* ``range_len_weights``: ``for i in range(len(weights))`` with ``weights[i]`` /
  ``self._ops[i]`` (``len`` of a traced tensor);
* ``modulelist_loop``: ``for op in self._ops:`` with a manual counter and an
  ``acc is None`` first-iteration test;
* ``moduledict_loop``: candidates in an ``nn.ModuleDict`` iterated with
  ``.items()``, weight row looked up by name in a plain dict;
* ``stack_view_sum``: ``(torch.stack([op(x) for op in self._ops]) *
  w.view(-1, 1, 1, 1, 1)).sum(0)``;
* ``functional_candidates``: candidates that are not modules -- ``F.relu``,
  ``x.relu()``, ``torch.cat`` of channel halves, ``x.mul(0.)`` -- combined by
  an unrolled ``w[0] * a + w[1] * b + ...``;
* ``shape_arithmetic``: ``C = x.size(1)``, ``x[:, :C // 4]`` partial channels,
  ``torch.cat([y, x[:, C // 4:]], dim=1)``;
* ``shape_comparison``: ``if y.shape[2] == x.shape[2]:`` after a stride-1 and
  a stride-2 mixed op (both branches taken);
* ``isinstance_check``: ``if not isinstance(weights, torch.Tensor): raise
  TypeError`` inside the mixed op;
* ``assert_len``: ``assert len(self._ops) == len(weights)``;
* ``string_keyed_edges``: ModuleDict of MixedOps keyed ``'1<-0'``, keys parsed
  with ``key.split('<-')`` in forward, nodes kept in a dict;
* ``multi_input_cell``: DARTS-like ``cell(s0, s1, weights)`` with
  ``s0, s1 = s1, cell(s0, s1, weights)``;
* ``tuple_output``: ``return features, logits``;
* ``alphas_parameter``: alphas as ``nn.Parameter``;
* ``alphas_buffer``: alphas as a registered buffer (that requires grad);
* ``alphas_plain_tensor``: alphas as a plain requires-grad tensor attribute;
* ``weights_forward_arg``: top-level ``forward(x, weights)``;
* ``batch_reshape``: ``x.view(x.size(0), -1)`` into a Linear over C*H*W -- a
  compiled model must then run with a different batch size than the example.
"""
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Idiom:
    factory: Callable[[], nn.Module]
    example_inputs: Callable[..., tuple]
    num_mixed_ops: int
    # positions in example_inputs() that are architecture weights
    weight_args: Tuple[int, ...] = field(default=())
    description: str = ''


C = 8
HW = 8
NUM_CANDIDATES = 4


def _candidates(C, stride=1):
    """conv3x3 / conv1x1 / avg-pool / skip, shape preserving for stride 1."""
    return [
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride, 1, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 1, stride, 0, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
        nn.Identity() if stride == 1 else nn.MaxPool2d(3, stride=stride, padding=1),
    ]


def _x(batch_size=2, C=C, hw=HW):
    return torch.randn(batch_size, C, hw, hw)


def _x_only(batch_size=2):
    return (_x(batch_size),)


def _alphas(*shape):
    return nn.Parameter(1e-3 * torch.randn(*shape))


# --------------------------------------------------------------------------
class OpTimesW(nn.Module):
    """``op(x) * w`` order, two mixed ops in sequence."""

    class MixedOp(nn.Module):
        def __init__(self, C):
            super().__init__()
            self._ops = nn.ModuleList(_candidates(C))

        def forward(self, x, weights):
            return sum(op(x) * w for op, w in zip(self._ops, weights))

    def __init__(self, C=C):
        super().__init__()
        self.mixed = nn.ModuleList([self.MixedOp(C), self.MixedOp(C)])
        self.alphas = _alphas(2, NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        weights = F.softmax(self.alphas, dim=-1)
        for i, m in enumerate(self.mixed):
            x = m(x, weights[i])
        return x


# --------------------------------------------------------------------------
class EnumerateLoop(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        out = 0
        for i, op in enumerate(self._ops):
            out = out + weights[i] * op(x)
        return out


# --------------------------------------------------------------------------
class RangeLenWeights(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        out = 0
        for i in range(len(weights)):
            out = out + weights[i] * self._ops[i](x)
        return out


# --------------------------------------------------------------------------
class ModuleListLoop(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        acc = None
        i = 0
        for op in self._ops:
            y = weights[i] * op(x)
            acc = y if acc is None else acc + y
            i += 1
        return acc


# --------------------------------------------------------------------------
class ModuleDictLoop(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        names = ['conv_3x3', 'conv_1x1', 'avg_pool_3x3', 'skip_connect']
        self._ops = nn.ModuleDict(zip(names, _candidates(C)))
        self._index = {name: i for i, name in enumerate(names)}
        self.alpha = _alphas(len(names))

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        out = 0
        for name, op in self._ops.items():
            out = out + weights[self._index[name]] * op(x)
        return out


# --------------------------------------------------------------------------
class StackViewSum(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C))
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        return (torch.stack([op(x) for op in self._ops]) * w.view(-1, 1, 1, 1, 1)).sum(0)


# --------------------------------------------------------------------------
class FunctionalCandidates(nn.Module):
    """Candidates written as functional calls / tensor methods, unrolled sum."""

    def __init__(self, C=C):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.alpha = _alphas(4)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        c = x.size(1)
        a = self.conv(F.relu(x))
        b = x.relu()
        d = torch.cat([x[:, c // 2:], x[:, :c // 2]], dim=1)
        z = x.mul(0.)
        return w[0] * a + w[1] * b + w[2] * d + w[3] * z


# --------------------------------------------------------------------------
class ShapeArithmetic(nn.Module):
    """PC-DARTS-like partial channels: ``x.size(1) // 4`` and ``x[:, :C//4]``."""

    def __init__(self, C=C, k=4):
        super().__init__()
        self.k = k
        self._ops = nn.ModuleList(_candidates(C // k))
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        C = x.size(1)
        xa = x[:, :C // self.k]
        xb = x[:, C // self.k:]
        y = sum(w * op(xa) for w, op in zip(weights, self._ops))
        return torch.cat([y, xb], dim=1)


# --------------------------------------------------------------------------
class ShapeComparison(nn.Module):
    """``if y.shape[2] == x.shape[2]:`` -- true for the stride-1 op, false for stride-2."""

    class MixedOp(nn.Module):
        def __init__(self, C, stride):
            super().__init__()
            self._ops = nn.ModuleList(_candidates(C, stride))
            self.pool = nn.AvgPool2d(2, 2)

        def forward(self, x, weights):
            y = sum(w * op(x) for w, op in zip(weights, self._ops))
            if y.shape[2] == x.shape[2]:
                return y + x
            else:
                return y + self.pool(x)

    def __init__(self, C=C):
        super().__init__()
        self.normal = self.MixedOp(C, 1)
        self.reduce = self.MixedOp(C, 2)
        self.alphas = _alphas(2, NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        weights = F.softmax(self.alphas, dim=-1)
        x = self.normal(x, weights[0])
        return self.reduce(x, weights[1])


# --------------------------------------------------------------------------
class IsinstanceCheck(nn.Module):
    class MixedOp(nn.Module):
        def __init__(self, C):
            super().__init__()
            self._ops = nn.ModuleList(_candidates(C))

        def forward(self, x, weights):
            if not isinstance(weights, torch.Tensor):
                raise TypeError('weights must be a torch.Tensor, got {}'.format(type(weights)))
            return sum(w * op(x) for w, op in zip(weights, self._ops))

    def __init__(self, C=C):
        super().__init__()
        self.mixed = self.MixedOp(C)
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        return self.mixed(x, F.softmax(self.alpha, dim=-1))


# --------------------------------------------------------------------------
class AssertLen(nn.Module):
    class MixedOp(nn.Module):
        def __init__(self, C):
            super().__init__()
            self._ops = nn.ModuleList(_candidates(C))

        def forward(self, x, weights):
            assert len(self._ops) == len(weights), 'need one weight per candidate'
            return sum(w * op(x) for w, op in zip(weights, self._ops))

    def __init__(self, C=C):
        super().__init__()
        self.mixed = self.MixedOp(C)
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        return self.mixed(x, F.softmax(self.alpha, dim=-1))


# --------------------------------------------------------------------------
class _WSumMixedOp(nn.Module):
    """Plain DARTS mixed op used by the cell-level idioms."""

    def __init__(self, C, stride=1):
        super().__init__()
        self._ops = nn.ModuleList(_candidates(C, stride))

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class StringKeyedEdges(nn.Module):
    """Edges in a ModuleDict keyed '1<-0', keys parsed in forward."""

    NUM_NODES = 3  # node 0 = input; edges 1<-0, 2<-0, 2<-1

    def __init__(self, C=C):
        super().__init__()
        self.edges = nn.ModuleDict()
        for i in range(1, self.NUM_NODES):
            for j in range(i):
                self.edges['{}<-{}'.format(i, j)] = _WSumMixedOp(C)
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.alphas = _alphas(len(self.edge_keys), NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        weights = F.softmax(self.alphas, dim=-1)
        nodes = {0: x}
        for key in self.edge_keys:
            dst, src = (int(t) for t in key.split('<-'))
            out = self.edges[key](nodes[src], weights[self.edge2index[key]])
            nodes[dst] = out if dst not in nodes else nodes[dst] + out
        return nodes[self.NUM_NODES - 1]


# --------------------------------------------------------------------------
class MultiInputCell(nn.Module):
    """``s0, s1 = s1, cell(s0, s1, weights)`` over two DARTS-like cells."""

    class Cell(nn.Module):
        def __init__(self, C, steps=2):
            super().__init__()
            self.pre0 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False))
            self.pre1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False))
            self._steps = steps
            self._ops = nn.ModuleList(_WSumMixedOp(C) for i in range(steps) for j in range(2 + i))
            self.post = nn.Conv2d(steps * C, C, 1, bias=False)

        def forward(self, s0, s1, weights):
            states = [self.pre0(s0), self.pre1(s1)]
            offset = 0
            for i in range(self._steps):
                s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
                offset += len(states)
                states.append(s)
            return self.post(torch.cat(states[2:], dim=1))

    STEPS = 2
    EDGES = 2 + 3

    def __init__(self, C=C):
        super().__init__()
        self.cells = nn.ModuleList([self.Cell(C, self.STEPS), self.Cell(C, self.STEPS)])
        self.alphas = _alphas(self.EDGES, NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        weights = F.softmax(self.alphas, dim=-1)
        s0 = s1 = x
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights)
        return s1


# --------------------------------------------------------------------------
class TupleOutput(nn.Module):
    def __init__(self, C=C, num_classes=10):
        super().__init__()
        self.mixed = _WSumMixedOp(C)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C, num_classes)
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        feature = self.mixed(x, F.softmax(self.alpha, dim=-1))
        out = self.gap(feature).flatten(1)
        logits = self.classifier(out)
        return out, logits


# --------------------------------------------------------------------------
class AlphasParameter(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self.cells = nn.ModuleList([_WSumMixedOp(C), _WSumMixedOp(C)])
        self.arch_alphas = nn.Parameter(1e-3 * torch.randn(2, NUM_CANDIDATES))

    def arch_parameters(self):
        return [self.arch_alphas]

    def forward(self, x):
        weights = F.softmax(self.arch_alphas, dim=-1)
        for i, cell in enumerate(self.cells):
            x = cell(x, weights[i])
        return x


class AlphasBuffer(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self.cells = nn.ModuleList([_WSumMixedOp(C), _WSumMixedOp(C)])
        self.register_buffer('arch_alphas', (1e-3 * torch.randn(2, NUM_CANDIDATES)).requires_grad_())

    def arch_parameters(self):
        return [self.arch_alphas]

    def forward(self, x):
        weights = F.softmax(self.arch_alphas, dim=-1)
        for i, cell in enumerate(self.cells):
            x = cell(x, weights[i])
        return x


class AlphasPlainTensor(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self.cells = nn.ModuleList([_WSumMixedOp(C), _WSumMixedOp(C)])
        self.arch_alphas = (1e-3 * torch.randn(2, NUM_CANDIDATES)).requires_grad_()

    def arch_parameters(self):
        return [self.arch_alphas]

    def forward(self, x):
        weights = F.softmax(self.arch_alphas, dim=-1)
        for i, cell in enumerate(self.cells):
            x = cell(x, weights[i])
        return x


class WeightsForwardArg(nn.Module):
    def __init__(self, C=C):
        super().__init__()
        self.cells = nn.ModuleList([_WSumMixedOp(C), _WSumMixedOp(C)])

    def arch_parameters(self):
        return []

    def forward(self, x, weights):
        for i, cell in enumerate(self.cells):
            x = cell(x, weights[i])
        return x


def _weights_forward_arg_inputs(batch_size=2):
    w = F.softmax(torch.randn(2, NUM_CANDIDATES), dim=-1).requires_grad_()
    return (_x(batch_size), w)


# --------------------------------------------------------------------------
class BatchReshape(nn.Module):
    """``x.view(x.size(0), -1)`` into a Linear over C*H*W."""

    def __init__(self, C=C, hw=HW, num_classes=10):
        super().__init__()
        self.mixed = _WSumMixedOp(C)
        self.classifier = nn.Linear(C * hw * hw, num_classes)
        self.alpha = _alphas(NUM_CANDIDATES)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        x = self.mixed(x, F.softmax(self.alpha, dim=-1))
        return self.classifier(x.view(x.size(0), -1))


# --------------------------------------------------------------------------
IDIOMS = {
    'op_times_w': Idiom(OpTimesW, _x_only, 2, description='sum(op(x) * w for op, w in zip(...))'),
    'enumerate_loop': Idiom(EnumerateLoop, _x_only, 1, description='for i, op in enumerate(ops): out = out + w[i]*op(x)'),
    'range_len_weights': Idiom(RangeLenWeights, _x_only, 1, description='for i in range(len(weights))'),
    'modulelist_loop': Idiom(ModuleListLoop, _x_only, 1, description='for op in self._ops with manual counter'),
    'moduledict_loop': Idiom(ModuleDictLoop, _x_only, 1, description='for name, op in self._ops.items()'),
    'stack_view_sum': Idiom(StackViewSum, _x_only, 1, description='(torch.stack([...]) * w.view(-1,1,1,1,1)).sum(0)'),
    'functional_candidates': Idiom(FunctionalCandidates, _x_only, 1, description='F.relu / x.relu() / torch.cat / x.mul(0.) candidates'),
    'shape_arithmetic': Idiom(ShapeArithmetic, _x_only, 1, description='x.size(1) // 4, x[:, :C//4]'),
    'shape_comparison': Idiom(ShapeComparison, _x_only, 2, description='if y.shape[2] == x.shape[2]: (both branches)'),
    'isinstance_check': Idiom(IsinstanceCheck, _x_only, 1, description='isinstance(weights, torch.Tensor) else raise'),
    'assert_len': Idiom(AssertLen, _x_only, 1, description='assert len(self._ops) == len(weights)'),
    'string_keyed_edges': Idiom(StringKeyedEdges, _x_only, 3, description="ModuleDict keyed '1<-0', key.split('<-')"),
    'multi_input_cell': Idiom(MultiInputCell, _x_only, 2 * MultiInputCell.EDGES, description='cell(s0, s1, weights), 2 cells x 5 edges'),
    'tuple_output': Idiom(TupleOutput, _x_only, 1, description='return (features, logits)'),
    'alphas_parameter': Idiom(AlphasParameter, _x_only, 2, description='alphas as nn.Parameter'),
    'alphas_buffer': Idiom(AlphasBuffer, _x_only, 2, description='alphas as a registered buffer (requires_grad)'),
    'alphas_plain_tensor': Idiom(AlphasPlainTensor, _x_only, 2, description='alphas as a plain requires-grad tensor attribute'),
    'weights_forward_arg': Idiom(WeightsForwardArg, _weights_forward_arg_inputs, 2, weight_args=(1,), description='forward(x, weights)'),
    'batch_reshape': Idiom(BatchReshape, _x_only, 1, description='x.view(x.size(0), -1); run with another batch size'),
}
