"""A DARTS supernet with edge normalization, each edge's output under its own BatchNorm.

PC-DARTS's edge normalization (yuhuixu1993/PC-DARTS ``model_search.py``) weights every edge
of a node by a second set of architecture weights (``betas``) and sums over the edges::

    node = b0 * bn0(mixed0(s0)) + b1 * bn1(mixed1(s1))

Each ``mixed_j`` is a DARTS mixed op (the candidate ops of :mod:`.darts_original`, full
channels, no partial-channel slicing), and each edge has its own
``BatchNorm2d(C, affine=False)`` (the normalized-edge variants that followed PC-DARTS).  The
sum over edges is a weighted sum, but a sum over *edges* -- each term is a whole mixed op
reading its own state -- not a choice among candidates: the betas stay soft in the final
network, so no rewrite may treat it as a mixed op.

With ``steps=1`` (the default) each state is read by one edge only, so every term's
exclusive branch reaches back to the cell's shared input: the layout where a finder that
only compares the inputs of exclusive branches takes the node sum for a mixed op.

Mixed ops by construction: ``layers`` cells x (2 + 3 + ... ) edges; default 2 x 2 = 4.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .darts_original import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN


class MixedOp(nn.Module):

  def __init__(self, C, stride):
    super(MixedOp, self).__init__()
    self._ops = nn.ModuleList()
    for primitive in PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)

  def forward(self, x, weights):
    return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):

  def __init__(self, steps, C_prev_prev, C_prev, C, reduction, reduction_prev):
    super(Cell, self).__init__()
    self.reduction = reduction
    if reduction_prev:
      self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
    else:
      self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
    self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
    self._steps = steps
    self._ops = nn.ModuleList()
    self._bns = nn.ModuleList()
    for i in range(self._steps):
      for j in range(2 + i):
        stride = 2 if reduction and j < 2 else 1
        self._ops.append(MixedOp(C, stride))
        self._bns.append(nn.BatchNorm2d(C, affine=False))

  def forward(self, s0, s1, weights, weights2):
    s0 = self.preprocess0(s0)
    s1 = self.preprocess1(s1)
    states = [s0, s1]
    offset = 0
    for i in range(self._steps):
      s = sum(weights2[offset + j] *
              self._bns[offset + j](self._ops[offset + j](h, weights[offset + j]))
              for j, h in enumerate(states))
      offset += len(states)
      states.append(s)
    return torch.cat(states[-self._steps:], dim=1)


class Network(nn.Module):

  def __init__(self, C, num_classes, layers, steps):
    super(Network, self).__init__()
    self._steps = steps
    C_curr = 3 * C
    self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                              nn.BatchNorm2d(C_curr))
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    self.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
      reduction = i in [layers // 3, 2 * layers // 3] and layers > 2
      if reduction:
        C_curr *= 2
      cell = Cell(steps, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
      reduction_prev = reduction
      self.cells.append(cell)
      C_prev_prev, C_prev = C_prev, steps * C_curr
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    k = sum(2 + i for i in range(steps))
    self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(PRIMITIVES)))
    self.betas_normal = nn.Parameter(1e-3 * torch.randn(k))

  def edge_weights(self):
    """PC-DARTS's ``weights2``: a softmax over the edges of each node, concatenated."""
    weights2 = F.softmax(self.betas_normal[0:2], dim=-1)
    n, start = 3, 2
    for i in range(self._steps - 1):
      end = start + n
      weights2 = torch.cat([weights2, F.softmax(self.betas_normal[start:end], dim=-1)], dim=0)
      start, n = end, n + 1
    return weights2

  def forward(self, input, weights=None):
    if weights is None:
      weights = F.softmax(self.alphas_normal, dim=-1)
    weights2 = self.edge_weights()
    s0 = s1 = self.stem(input)
    for cell in self.cells:
      s0, s1 = s1, cell(s0, s1, weights, weights2)
    out = self.global_pooling(s1)
    return self.classifier(out.view(out.size(0), -1))

  def arch_parameters(self):
    return [self.alphas_normal, self.betas_normal]


C = 4
LAYERS = 2
STEPS = 1
NUM_CLASSES = 10
INPUT_HW = 8
NUM_MIXED_OPS = LAYERS * sum(2 + i for i in range(STEPS))  # 2 * 2 = 4


def build(C=C, layers=LAYERS, steps=STEPS, num_classes=NUM_CLASSES):
  return Network(C, num_classes, layers, steps)


def example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


def get_alphas(model):
  return model.arch_parameters()
