"""Imitation of AutoDL-Projects' GDAS supernet (D-X-Y/AutoDL-Projects).

Imitates ``lib/models/cell_searchs/search_model_gdas.py`` (TinyNetworkGDAS) and
``NAS201SearchCell.forward_gdas`` from ``lib/models/cell_searchs/search_cells.py``
(the cell, the ops and ResNetBasicblock are shared with :mod:`.nb201_autodl`,
as upstream shares ``search_cells.py`` / ``cell_operations.py``).

Two models:

(a) :func:`build` -- the real GDAS forward.  EXPECTED TO BE UNTRACEABLE by a
    symbolic tracer.  Idioms: gumbel sampling inside ``while True:`` with
    ``torch.empty_like(self.arch_parameters).exponential_().log()`` (in-place
    random op), ``probs.max(-1, keepdim=True)[1]``,
    ``torch.zeros_like(logits).scatter_(-1, index, 1.0)``, straight-through
    ``hardwts = one_h - probs.detach() + probs``, and Python control flow on
    tensor values: ``if (torch.isinf(gumbels).any()) or ... : continue``
    (first culprit, :data:`CULPRIT_SUBSTRING`); then ``cell.forward_gdas``
    uses ``index[...].item()`` and the conditional generator
    ``weights[_ie] * edge(nodes[j]) if _ie == argmaxs else weights[_ie]``
    (second culprit).  Output is random (new gumbel noise every call).

(b) :func:`build_hard_weights` -- a GDAS-style model whose forward takes the
    hard one-hot weights as a forward argument, ``forward(inputs, hardwts)``,
    and computes the plain weighted sum over *all* candidates of every edge
    (``sum( weights[_ie] * edge(nodes[j]) for _ie, edge in
    enumerate(self.edges[node_str]) )``), so it is traceable.  Idioms on top of
    nb201_autodl: architecture weights as a top-level forward argument,
    ``enumerate`` + ``weights[_ie]`` indexing, weight on the left of ``*``,
    and a cell *method other than forward* (``cell.forward_hard(...)``) called
    from the parent (no ``__call__``, so module-call hooks / leaf-module logic
    never see it).  :func:`example_inputs_hard_weights` gives one-hot rows
    (a leaf tensor with ``requires_grad=True``); the model's
    ``sample_hardwts()`` reproduces GDAS' straight-through sampling outside
    ``forward`` for callers that want real samples.

Size: C=8, N=1 (3 search cells + 2 ResNetBasicblocks), max_nodes=4 (6 edges),
5 NAS-Bench-201 ops, 16x16 input; hardwts shape (6, 5).

Mixed ops by construction (model b): 3 search cells x 6 edges = 18.
"""
from copy import deepcopy

import torch
import torch.nn as nn

from .nb201_autodl import NAS_BENCH_201, NAS201SearchCell, ResNetBasicblock

SearchCell = NAS201SearchCell

# The first line of (a) a symbolic tracer must refuse (bool() of a traced tensor).
CULPRIT_SUBSTRING = 'torch.isinf(gumbels).any()'
# The second one, reached only if the first were somehow handled.
CULPRIT_SUBSTRING_CELL = "index[ self.edge2index[node_str] ].item()"


# --------------------------------------------------------------------------
# (a) lib/models/cell_searchs/search_model_gdas.py
# --------------------------------------------------------------------------
class TinyNetworkGDAS(nn.Module):

  def __init__(self, C, N, max_nodes, num_classes, search_space, affine, track_running_stats):
    super(TinyNetworkGDAS, self).__init__()
    self._C        = C
    self._layerN   = N
    self.max_nodes = max_nodes
    self.stem = nn.Sequential(
                    nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(C))

    layer_channels   = [C    ] * N + [C*2 ] + [C*2  ] * N + [C*4 ] + [C*4  ] * N
    layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N

    C_prev, num_edge, edge2index = C, None, None
    self.cells = nn.ModuleList()
    for index, (C_curr, reduction) in enumerate(zip(layer_channels, layer_reductions)):
      if reduction:
        cell = ResNetBasicblock(C_prev, C_curr, 2)
      else:
        cell = self._make_search_cell(C_prev, C_curr, 1, max_nodes, search_space, affine, track_running_stats)
        if num_edge is None: num_edge, edge2index = cell.num_edges, cell.edge2index
        else: assert num_edge == cell.num_edges and edge2index == cell.edge2index, 'invalid {:} vs. {:}.'.format(num_edge, cell.num_edges)
      self.cells.append( cell )
      C_prev = cell.out_dim
    self.op_names   = deepcopy( search_space )
    self._Layer     = len(self.cells)
    self.edge2index = edge2index
    self.lastact    = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    self.arch_parameters = nn.Parameter( 1e-3*torch.randn(num_edge, len(search_space)) )
    self.tau        = 10

  def _make_search_cell(self, *args):
    return SearchCell(*args)

  def get_weights(self):
    xlist = list( self.stem.parameters() ) + list( self.cells.parameters() )
    xlist+= list( self.lastact.parameters() ) + list( self.global_pooling.parameters() )
    xlist+= list( self.classifier.parameters() )
    return xlist

  def set_tau(self, tau):
    self.tau = tau

  def get_tau(self):
    return self.tau

  def get_alphas(self):
    return [self.arch_parameters]

  def show_alphas(self):
    with torch.no_grad():
      return 'arch-parameters :\n{:}'.format( nn.functional.softmax(self.arch_parameters, dim=-1).cpu() )

  def extra_repr(self):
    return ('{name}(C={_C}, Max-Nodes={max_nodes}, N={_layerN}, L={_Layer})'.format(name=self.__class__.__name__, **self.__dict__))

  def genotype(self):
    genotypes = []
    for i in range(1, self.max_nodes):
      xlist = []
      for j in range(i):
        node_str = '{:}<-{:}'.format(i, j)
        with torch.no_grad():
          weights = self.arch_parameters[ self.edge2index[node_str] ]
          op_name = self.op_names[ weights.argmax().item() ]
        xlist.append((op_name, j))
      genotypes.append( tuple(xlist) )
    return tuple( genotypes )

  def forward(self, inputs):
    while True:
      gumbels = -torch.empty_like(self.arch_parameters).exponential_().log()
      logits  = (self.arch_parameters.log_softmax(dim=1) + gumbels) / self.tau
      probs   = nn.functional.softmax(logits, dim=1)
      index   = probs.max(-1, keepdim=True)[1]
      one_h   = torch.zeros_like(logits).scatter_(-1, index, 1.0)
      hardwts = one_h - probs.detach() + probs
      if (torch.isinf(gumbels).any()) or (torch.isinf(probs).any()) or (torch.isnan(probs).any()):
        continue
      else: break

    feature = self.stem(inputs)
    for i, cell in enumerate(self.cells):
      if isinstance(cell, SearchCell):
        feature = cell.forward_gdas(feature, hardwts, index)
      else:
        feature = cell(feature)
    out = self.lastact(feature)
    out = self.global_pooling( out )
    out = out.view(out.size(0), -1)
    logits = self.classifier(out)

    return out, logits


# --------------------------------------------------------------------------
# (b) GDAS-style, hard weights as a forward argument
# --------------------------------------------------------------------------
class GDASHardSearchCell(NAS201SearchCell):
  """NAS201SearchCell plus a dense GDAS forward (every candidate evaluated)."""

  def forward_hard(self, inputs, hardwts):
    nodes   = [inputs]
    for i in range(1, self.max_nodes):
      inter_nodes = []
      for j in range(i):
        node_str = '{:}<-{:}'.format(i, j)
        weights  = hardwts[ self.edge2index[node_str] ]
        weigsum  = sum( weights[_ie] * edge(nodes[j]) for _ie, edge in enumerate(self.edges[node_str]) )
        inter_nodes.append( weigsum )
      nodes.append( sum(inter_nodes) )
    return nodes[-1]


class TinyNetworkGDASHardWeights(TinyNetworkGDAS):

  def _make_search_cell(self, *args):
    return GDASHardSearchCell(*args)

  def sample_hardwts(self):
    """GDAS' straight-through gumbel sampling, moved out of ``forward``."""
    while True:
      gumbels = -torch.empty_like(self.arch_parameters).exponential_().log()
      logits  = (self.arch_parameters.log_softmax(dim=1) + gumbels) / self.tau
      probs   = nn.functional.softmax(logits, dim=1)
      index   = probs.max(-1, keepdim=True)[1]
      one_h   = torch.zeros_like(logits).scatter_(-1, index, 1.0)
      hardwts = one_h - probs.detach() + probs
      if (torch.isinf(gumbels).any()) or (torch.isinf(probs).any()) or (torch.isnan(probs).any()):
        continue
      else: break
    return hardwts, index

  def forward(self, inputs, hardwts):
    feature = self.stem(inputs)
    for i, cell in enumerate(self.cells):
      if isinstance(cell, SearchCell):
        feature = cell.forward_hard(feature, hardwts)
      else:
        feature = cell(feature)
    out = self.lastact(feature)
    out = self.global_pooling( out )
    out = out.view(out.size(0), -1)
    logits = self.classifier(out)

    return out, logits


# --------------------------------------------------------------------------
# test entry points
# --------------------------------------------------------------------------
C = 8
N = 1
MAX_NODES = 4
NUM_CLASSES = 10
INPUT_HW = 16
NUM_EDGES = MAX_NODES * (MAX_NODES - 1) // 2        # 6
NUM_OPS = len(NAS_BENCH_201)                        # 5

# model (b): 3 search cells x 6 edges
NUM_MIXED_OPS = 3 * N * NUM_EDGES                   # 18


def build(C=C, N=N, max_nodes=MAX_NODES, num_classes=NUM_CLASSES,
          search_space=NAS_BENCH_201, affine=False, track_running_stats=True):
  """(a) the real GDAS supernet (untraceable: value-dependent control flow)."""
  return TinyNetworkGDAS(C, N, max_nodes, num_classes, list(search_space), affine, track_running_stats)


def example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


def build_hard_weights(C=C, N=N, max_nodes=MAX_NODES, num_classes=NUM_CLASSES,
                       search_space=NAS_BENCH_201, affine=False, track_running_stats=True):
  """(b) GDAS-style ``forward(inputs, hardwts)`` (traceable weighted sum)."""
  return TinyNetworkGDASHardWeights(C, N, max_nodes, num_classes, list(search_space), affine, track_running_stats)


def example_inputs_hard_weights(batch_size=2):
  """``(x, hardwts)``; hardwts are one-hot rows (edge e picks op e % NUM_OPS)."""
  x = torch.randn(batch_size, 3, INPUT_HW, INPUT_HW)
  index = torch.arange(NUM_EDGES) % NUM_OPS
  hardwts = torch.zeros(NUM_EDGES, NUM_OPS).scatter_(-1, index.view(-1, 1), 1.0)
  return (x, hardwts.requires_grad_())


def get_alphas(model):
  return list(model.get_alphas())
