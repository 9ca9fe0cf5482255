"""Supernets of three DARTS descendants, written the way their public code writes them.

All three forked quark0/darts and keep its ``operations.py`` (imported here from
:mod:`.darts_original`) and its 2-space ``model_search.py`` layout; what each changes is
written from the upstream layout in our own words, shrunk for tests (C=4, 3 cells, steps=2,
multiplier=2, 8x8 inputs: 3 cells x (2+3) edges = 15 mixed ops each).

* ``fair_darts`` -- FairDARTS (xiaomi-automl/FairDARTS, ``model_search.py`` and
  ``separate_loss.py``): ``torch.sigmoid(self.alphas_normal)`` instead of ``F.softmax`` (each
  candidate's weight is independent: they do not sum to one), ``none`` dropped from
  ``PRIMITIVES``, and the zero-one loss: the criterion takes the sigmoids as a third input and
  pushes them away from 0.5, ``loss1 + w * (-F.mse_loss(sig, 0.5))``, called by
  ``model._loss`` which concatenates ``torch.sigmoid`` of both alphas; it returns ``(loss,
  loss1.item(), loss2.item())``.
* ``darts_minus`` -- DARTS- (Meituan-AutoML/DARTS-): every ``MixedOp`` adds an auxiliary skip
  (``Identity``, or ``FactorizedReduce`` on stride-2 edges) scaled by a decaying ``beta``,
  ``res += self.auxiliary_op(x) * self.beta``; ``beta`` is a plain float attribute of each
  ``MixedOp``, set by ``model.set_auxiliary_beta(beta)`` once per epoch (linear decay to 0).
* ``sdarts_rs`` -- SDARTS-RS (xiangning-chen/SmoothDARTS): before each weight step the search
  loop calls ``model.softmax_arch_parameters()`` (saves the alphas, then
  ``p.data.copy_(F.softmax(p, dim=-1))`` in place), adds uniform noise in place
  (``p.data.add_(torch.zeros_like(p).uniform_(-eps, eps))``), ``model.clip()``s each row back
  onto the simplex, runs ``model(input, updateType='weight')`` -- a string argument under
  which the forward uses the alphas as they are instead of their softmax -- and finally
  ``model.restore_arch_parameters()``.

* ``pdarts`` -- P-DARTS (chenxin061/pdarts, ``model_search.py``, 4-space style): per-edge
  ``switches`` (lists of bools) keep a different subset of the primitives on each edge (the
  stage-2 search space: 5 of 8), a skip candidate becomes ``nn.Sequential(Identity(),
  nn.Dropout(p))``, and the search loop decays the dropout rate every epoch through
  ``model.p = ...; model.update_p()``, which walks Network -> Cell -> MixedOp and assigns
  ``op[1].p`` of each Dropout; the alphas are ``nn.Parameter(torch.FloatTensor(1e-3 *
  np.random.randn(k, num_ops)))`` and the forward branches on ``self.alphas_reduce.size(1)
  == 1``.

And one search loop the tests had no imitation of:

* :class:`Architect` -- quark0/darts ``cnn/architect.py``, the second-order (``--unrolled``)
  architecture step: ``model._loss`` and ``torch.autograd.grad`` over ``model.parameters()``,
  a virtual weight step into ``model.new()`` filled through ``model.named_parameters()`` and
  ``model.state_dict()``, and a finite-difference Hessian-vector product that moves the
  weights in place through ``p.data.add_`` between two ``model._loss`` calls.  Upstream's
  deprecated positional-alpha calls (``p.data.add_(R, v)``, ``theta.sub(eta, d)``) are written
  with ``alpha=``, and ``.cuda()`` is dropped.

``STYLES = {name: Style(build, example_inputs, num_mixed_ops, source)}``.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable

from .darts_original import OPS, FactorizedReduce, Identity, ReLUConvBN

C = 4
LAYERS = 3
STEPS = 2
MULTIPLIER = 2
NUM_CLASSES = 10
INPUT_HW = 8
NUM_MIXED_OPS = LAYERS * sum(2 + i for i in range(STEPS))  # 3 * 5 = 15


# --------------------------------------------------------------------------
# the DARTS skeleton all three keep (Cell and Network bodies as upstream)
# --------------------------------------------------------------------------
class _Cell(nn.Module):

  def __init__(self, mixed_op, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
    super(_Cell, self).__init__()
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
      for j in range(2+i):
        stride = 2 if reduction and j < 2 else 1
        self._ops.append(mixed_op(C, stride))

  def forward(self, s0, s1, weights):
    s0 = self.preprocess0(s0)
    s1 = self.preprocess1(s1)
    states = [s0, s1]
    offset = 0
    for i in range(self._steps):
      s = sum(self._ops[offset+j](h, weights[offset+j]) for j, h in enumerate(states))
      offset += len(states)
      states.append(s)
    return torch.cat(states[-self._multiplier:], dim=1)


class _Network(nn.Module):
  """quark0/darts ``Network`` with the mixed op and the primitives as parameters."""

  def __init__(self, C, num_classes, layers, criterion, primitives, mixed_op,
               steps=STEPS, multiplier=MULTIPLIER, stem_multiplier=3):
    super(_Network, self).__init__()
    self._C = C
    self._num_classes = num_classes
    self._layers = layers
    self._criterion = criterion
    self._steps = steps
    self._multiplier = multiplier
    self._primitives = primitives

    C_curr = stem_multiplier*C
    self.stem = nn.Sequential(
      nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
      nn.BatchNorm2d(C_curr)
    )
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    self.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
      if i in [layers//3, 2*layers//3]:
        C_curr *= 2
        reduction = True
      else:
        reduction = False
      cell = _Cell(mixed_op, steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
      reduction_prev = reduction
      self.cells += [cell]
      C_prev_prev, C_prev = C_prev, multiplier*C_curr

    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    self._initialize_alphas()

  def _initialize_alphas(self):
    k = sum(1 for i in range(self._steps) for n in range(2+i))
    num_ops = len(self._primitives)
    # upstream: Variable(1e-3*torch.randn(k, num_ops).cuda(), requires_grad=True)
    self.alphas_normal = Variable(1e-3*torch.randn(k, num_ops), requires_grad=True)
    self.alphas_reduce = Variable(1e-3*torch.randn(k, num_ops), requires_grad=True)
    self._arch_parameters = [
      self.alphas_normal,
      self.alphas_reduce,
    ]

  def arch_parameters(self):
    return self._arch_parameters

  def weights(self):
    return self.parameters()

  def _head(self, s1):
    out = self.global_pooling(s1)
    return self.classifier(out.view(out.size(0),-1))


# --------------------------------------------------------------------------
# FairDARTS
# --------------------------------------------------------------------------
FAIR_PRIMITIVES = [
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5'
]


class FairMixedOp(nn.Module):

  def __init__(self, C, stride):
    super(FairMixedOp, self).__init__()
    self._ops = nn.ModuleList()
    for primitive in FAIR_PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)

  def forward(self, x, weights):
    return sum(w * op(x) for w, op in zip(weights, self._ops))


class ConvSeparateLoss(nn.modules.loss._Loss):
  """Cross entropy plus the zero-one loss on the sigmoid weights (FairDARTS Eq. 5)."""

  def __init__(self, weight=0.1, size_average=None, ignore_index=-100, reduce=None, reduction='mean'):
    super(ConvSeparateLoss, self).__init__(size_average, reduce, reduction)
    self.ignore_index = ignore_index
    self.weight = weight

  def forward(self, input1, target1, input2):
    loss1 = F.cross_entropy(input1, target1)
    loss2 = -F.mse_loss(input2, torch.tensor(0.5, requires_grad=False))  # upstream: .cuda()
    return loss1 + self.weight*loss2, loss1.item(), loss2.item()


class FairNetwork(_Network):

  def __init__(self, C, num_classes, layers, criterion, steps=STEPS, multiplier=MULTIPLIER):
    super(FairNetwork, self).__init__(C, num_classes, layers, criterion, FAIR_PRIMITIVES,
                                      FairMixedOp, steps, multiplier)

  def forward(self, input):
    s0 = s1 = self.stem(input)
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        weights = torch.sigmoid(self.alphas_reduce)
      else:
        weights = torch.sigmoid(self.alphas_normal)
      s0, s1 = s1, cell(s0, s1, weights)
    return self._head(s1)

  def _loss(self, input, target):
    logits = self(input)
    aux_input = torch.cat([torch.sigmoid(self.alphas_normal), torch.sigmoid(self.alphas_reduce)], dim=0)
    return self._criterion(logits, target, aux_input)

  def genotype(self, threshold=0.85):
    """Every edge whose sigmoid passes ``threshold`` (FairDARTS's ``parse_method='threshold'``)."""
    def _parse(weights):
      gene = []
      start, n = 0, 2
      for i in range(self._steps):
        for j in range(n):
          for k, w in enumerate(weights[start + j]):
            if w > threshold:
              gene.append((FAIR_PRIMITIVES[k], j))
        start += n
        n += 1
      return gene
    return (_parse(torch.sigmoid(self.alphas_normal).data.cpu().numpy()),
            _parse(torch.sigmoid(self.alphas_reduce).data.cpu().numpy()))


# --------------------------------------------------------------------------
# DARTS-
# --------------------------------------------------------------------------
PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5'
]


class AuxMixedOp(nn.Module):

  def __init__(self, C, stride, auxiliary_skip=True):
    super(AuxMixedOp, self).__init__()
    self._ops = nn.ModuleList()
    for primitive in PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)
    self.auxiliary_op = None
    if auxiliary_skip:
      if stride == 2:
        self.auxiliary_op = FactorizedReduce(C, C, affine=False)
      else:
        self.auxiliary_op = Identity()
    self.beta = 1.0

  def forward(self, x, weights):
    res = sum(w * op(x) for w, op in zip(weights, self._ops))
    if self.auxiliary_op is not None:
      res += self.auxiliary_op(x) * self.beta
    return res


class AuxNetwork(_Network):

  def __init__(self, C, num_classes, layers, criterion, steps=STEPS, multiplier=MULTIPLIER):
    super(AuxNetwork, self).__init__(C, num_classes, layers, criterion, PRIMITIVES,
                                     AuxMixedOp, steps, multiplier)

  def set_auxiliary_beta(self, beta):
    for m in self.modules():
      if isinstance(m, AuxMixedOp):
        m.beta = beta

  def forward(self, input):
    s0 = s1 = self.stem(input)
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        weights = F.softmax(self.alphas_reduce, dim=-1)
      else:
        weights = F.softmax(self.alphas_normal, dim=-1)
      s0, s1 = s1, cell(s0, s1, weights)
    return self._head(s1)

  def _loss(self, input, target):
    logits = self(input)
    return self._criterion(logits, target)


# --------------------------------------------------------------------------
# SDARTS-RS
# --------------------------------------------------------------------------
class SmoothMixedOp(nn.Module):

  def __init__(self, C, stride):
    super(SmoothMixedOp, self).__init__()
    self._ops = nn.ModuleList()
    for primitive in PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)

  def forward(self, x, weights):
    return sum(w * op(x) for w, op in zip(weights, self._ops))


class SmoothNetwork(_Network):

  def __init__(self, C, num_classes, layers, criterion, steps=STEPS, multiplier=MULTIPLIER):
    super(SmoothNetwork, self).__init__(C, num_classes, layers, criterion, PRIMITIVES,
                                        SmoothMixedOp, steps, multiplier)

  def forward(self, input, updateType='alpha'):
    s0 = s1 = self.stem(input)
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        weights = self.alphas_reduce if updateType == 'weight' else F.softmax(self.alphas_reduce, dim=-1)
      else:
        weights = self.alphas_normal if updateType == 'weight' else F.softmax(self.alphas_normal, dim=-1)
      s0, s1 = s1, cell(s0, s1, weights)
    return self._head(s1)

  def _loss(self, input, target, updateType='alpha'):
    logits = self(input, updateType)
    return self._criterion(logits, target)

  def _save_arch_parameters(self):
    self._saved_arch_parameters = [p.clone() for p in self._arch_parameters]

  def softmax_arch_parameters(self):
    self._save_arch_parameters()
    for p in self._arch_parameters:
      p.data.copy_(F.softmax(p, dim=-1))

  def restore_arch_parameters(self):
    for i, p in enumerate(self._arch_parameters):
      p.data.copy_(self._saved_arch_parameters[i])
    del self._saved_arch_parameters

  def clip(self):
    for p in self.arch_parameters():
      for line in p:
        max_index = line.argmax()
        line.data.clamp_(0, 1)
        if line.sum() == 0.0:
          line.data[max_index] = 1.0
        line.data.div_(line.sum())


def random_alpha(model, epsilon):
  """SDARTS-RS's ``Random_alpha``: uniform noise on the (softmaxed) alphas, in place."""
  for p in model.arch_parameters():
    p.data.add_(torch.zeros_like(p).uniform_(-epsilon, epsilon))
  model.clip()


# --------------------------------------------------------------------------
# P-DARTS
# --------------------------------------------------------------------------
class PMixedOp(nn.Module):

    def __init__(self, C, stride, switch, p):
        super(PMixedOp, self).__init__()
        self.m_ops = nn.ModuleList()
        self.p = p
        for i in range(len(switch)):
            if switch[i]:
                primitive = PRIMITIVES[i]
                op = OPS[primitive](C, stride, False)
                if 'pool' in primitive:
                    op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
                if isinstance(op, Identity) and p > 0:
                    op = nn.Sequential(op, nn.Dropout(self.p))
                self.m_ops.append(op)

    def update_p(self):
        for op in self.m_ops:
            if isinstance(op, nn.Sequential):
                if isinstance(op[0], Identity):
                    op[1].p = self.p

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.m_ops))


class PCell(nn.Module):

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, switches, p):
        super(PCell, self).__init__()
        self.reduction = reduction
        self.p = p
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier

        self.cell_ops = nn.ModuleList()
        switch_count = 0
        for i in range(self._steps):
            for j in range(2+i):
                stride = 2 if reduction and j < 2 else 1
                op = PMixedOp(C, stride, switch=switches[switch_count], p=self.p)
                self.cell_ops.append(op)
                switch_count = switch_count + 1

    def update_p(self):
        for op in self.cell_ops:
            op.p = self.p
            op.update_p()

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)

        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(self.cell_ops[offset+j](h, weights[offset+j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)

        return torch.cat(states[-self._multiplier:], dim=1)


class PNetwork(nn.Module):

    def __init__(self, C, num_classes, layers, criterion, steps=STEPS, multiplier=MULTIPLIER, stem_multiplier=3, switches_normal=[], switches_reduce=[], p=0.0):
        super(PNetwork, self).__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion
        self._steps = steps
        self._multiplier = multiplier
        self.p = p
        self.switches_normal = switches_normal
        switch_ons = []
        for i in range(len(switches_normal)):
            ons = 0
            for j in range(len(switches_normal[i])):
                if switches_normal[i][j]:
                    ons = ons + 1
            switch_ons.append(ons)
            ons = 0
        self.switch_on = switch_ons[0]

        C_curr = stem_multiplier*C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr)
        )

        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers//3, 2*layers//3]:
                C_curr *= 2
                reduction = True
                cell = PCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, switches_reduce, self.p)
            else:
                reduction = False
                cell = PCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, switches_normal, self.p)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier*C_curr

        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self._initialize_alphas()

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                if self.alphas_reduce.size(1) == 1:
                    weights = F.softmax(self.alphas_reduce, dim=0)
                else:
                    weights = F.softmax(self.alphas_reduce, dim=-1)
            else:
                if self.alphas_normal.size(1) == 1:
                    weights = F.softmax(self.alphas_normal, dim=0)
                else:
                    weights = F.softmax(self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits

    def update_p(self):
        for cell in self.cells:
            cell.p = self.p
            cell.update_p()

    def _loss(self, input, target):
        logits = self(input)
        return self._criterion(logits, target)

    def _initialize_alphas(self):
        k = sum(1 for i in range(self._steps) for n in range(2+i))
        num_ops = self.switch_on
        self.alphas_normal = nn.Parameter(torch.FloatTensor(1e-3*np.random.randn(k, num_ops)))
        self.alphas_reduce = nn.Parameter(torch.FloatTensor(1e-3*np.random.randn(k, num_ops)))
        self._arch_parameters = [
            self.alphas_normal,
            self.alphas_reduce,
        ]

    def arch_parameters(self):
        return self._arch_parameters


# --------------------------------------------------------------------------
# quark0/darts cnn/architect.py
# --------------------------------------------------------------------------
def _concat(xs):
  return torch.cat([x.view(-1) for x in xs])


class Architect(object):

  def __init__(self, model, args):
    self.network_momentum = args.momentum
    self.network_weight_decay = args.weight_decay
    self.model = model
    self.optimizer = torch.optim.Adam(self.model.arch_parameters(),
        lr=args.arch_learning_rate, betas=(0.5, 0.999), weight_decay=args.arch_weight_decay)

  def _compute_unrolled_model(self, input, target, eta, network_optimizer):
    loss = self.model._loss(input, target)
    theta = _concat(self.model.parameters()).data
    try:
      moment = _concat(network_optimizer.state[v]['momentum_buffer'] for v in self.model.parameters()).mul_(self.network_momentum)
    except KeyError:  # upstream: a bare except (no momentum buffer before the first step)
      moment = torch.zeros_like(theta)
    dtheta = _concat(torch.autograd.grad(loss, self.model.parameters())).data + self.network_weight_decay*theta
    unrolled_model = self._construct_model_from_theta(theta.sub(moment+dtheta, alpha=eta))
    return unrolled_model

  def step(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled):
    self.optimizer.zero_grad()
    if unrolled:
        self._backward_step_unrolled(input_train, target_train, input_valid, target_valid, eta, network_optimizer)
    else:
        self._backward_step(input_valid, target_valid)
    self.optimizer.step()

  def _backward_step(self, input_valid, target_valid):
    loss = self.model._loss(input_valid, target_valid)
    loss.backward()

  def _backward_step_unrolled(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer):
    unrolled_model = self._compute_unrolled_model(input_train, target_train, eta, network_optimizer)
    unrolled_loss = unrolled_model._loss(input_valid, target_valid)

    unrolled_loss.backward()
    dalpha = [v.grad for v in unrolled_model.arch_parameters()]
    vector = [v.grad.data for v in unrolled_model.parameters()]
    implicit_grads = self._hessian_vector_product(vector, input_train, target_train)

    for g, ig in zip(dalpha, implicit_grads):
      g.data.sub_(ig.data, alpha=eta)

    for v, g in zip(self.model.arch_parameters(), dalpha):
      if v.grad is None:
        v.grad = Variable(g.data)
      else:
        v.grad.data.copy_(g.data)

  def _construct_model_from_theta(self, theta):
    model_new = self.model.new()
    model_dict = self.model.state_dict()

    params, offset = {}, 0
    for k, v in self.model.named_parameters():
      v_length = np.prod(v.size())
      params[k] = theta[offset: offset+v_length].view(v.size())
      offset += v_length

    assert offset == len(theta)
    model_dict.update(params)
    model_new.load_state_dict(model_dict)
    return model_new

  def _hessian_vector_product(self, vector, input, target, r=1e-2):
    R = r / _concat(vector).norm()
    for p, v in zip(self.model.parameters(), vector):
      p.data.add_(v, alpha=R)
    loss = self.model._loss(input, target)
    grads_p = torch.autograd.grad(loss, self.model.arch_parameters())

    for p, v in zip(self.model.parameters(), vector):
      p.data.sub_(v, alpha=2*R)
    loss = self.model._loss(input, target)
    grads_n = torch.autograd.grad(loss, self.model.arch_parameters())

    for p, v in zip(self.model.parameters(), vector):
      p.data.add_(v, alpha=R)

    return [(x-y).div_(2*R) for x, y in zip(grads_p, grads_n)]


# --------------------------------------------------------------------------
# test entry points
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
  build: Callable[[], nn.Module]
  example_inputs: Callable[..., tuple]
  num_mixed_ops: int
  source: str


def build_fair_darts():
  return FairNetwork(C, NUM_CLASSES, LAYERS, ConvSeparateLoss(weight=10.0))


def build_darts_minus():
  return AuxNetwork(C, NUM_CLASSES, LAYERS, nn.CrossEntropyLoss())


def build_sdarts_rs():
  return SmoothNetwork(C, NUM_CLASSES, LAYERS, nn.CrossEntropyLoss())


def pdarts_switches(seed=0, keep=5):
  """Stage-2 switches: on every edge ``keep`` of the 8 primitives, a different subset per
  edge, skip_connect kept everywhere (so every edge has its Dropout)."""
  rng = np.random.RandomState(seed)
  k = sum(2 + i for i in range(STEPS))
  out = []
  for _ in range(k):
    others = [i for i in range(len(PRIMITIVES)) if PRIMITIVES[i] != 'skip_connect']
    on = set(rng.choice(others, keep - 1, replace=False).tolist()) | {PRIMITIVES.index('skip_connect')}
    out.append([i in on for i in range(len(PRIMITIVES))])
  return out


def build_pdarts(p=0.2):
  np.random.seed(torch.randint(0, 2**31 - 1, ()).item())  # the alphas come from numpy
  return PNetwork(C, NUM_CLASSES, LAYERS, nn.CrossEntropyLoss(),
                  switches_normal=pdarts_switches(0), switches_reduce=pdarts_switches(1), p=p)


def example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


STYLES = {
  'fair_darts': Style(build_fair_darts, example_inputs, NUM_MIXED_OPS,
                      'xiaomi-automl/FairDARTS fairdarts/model_search.py, separate_loss.py'),
  'darts_minus': Style(build_darts_minus, example_inputs, NUM_MIXED_OPS,
                       'Meituan-AutoML/DARTS- model_search.py (auxiliary skip, decaying beta)'),
  'sdarts_rs': Style(build_sdarts_rs, example_inputs, NUM_MIXED_OPS,
                     'xiangning-chen/SmoothDARTS sota/cnn/model_search.py (Random_alpha)'),
  'pdarts': Style(build_pdarts, example_inputs, NUM_MIXED_OPS,
                  'chenxin061/pdarts model_search.py (switches, Dropout after skip, update_p)'),
}
