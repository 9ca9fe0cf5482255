"""Supernets of five more search codebases, each with the search-loop idioms it is trained
with, written from the upstream layouts in our own words and shrunk for tests.

* ``snas`` -- SNAS (Xie et al. 2019; the public PyTorch re-implementations of
  ``model_search.py``): the architecture weights ``Z`` of every cell are a relaxed one-hot
  sample, ``RelaxedOneHotCategorical(torch.tensor([temperature]), logits=alpha).rsample()``,
  drawn in ``forward(input, temperature)``; the loop anneals the temperature every epoch as
  ``initial_temp * np.exp(-anneal_rate * epoch)`` (a ``numpy.float64``, passed positionally);
  every ``MixedOp`` holds a Python list ``COSTS`` (FLOPs + MACs of each candidate) and returns
  ``(sum(z * op(x)), sum(z * c for z, c in zip(Z, self.COSTS)))``; the forward returns
  ``(logits, cost)`` and the loss adds ``resource_lambda * cost``.  Weights and alphas take one
  joint step on the same batch (SNAS has no bi-level alternation).
* ``drnas`` -- DrNAS (xiangning-chen/DrNAS, DARTS space, progressive learning): the weights are
  ``Dirichlet(F.elu(alpha) + 1).rsample()`` drawn in ``forward``; each ``MixedOp`` runs its
  candidates on the first ``C // self.k`` channels only (partial channels), concatenates the
  rest (max-pooled on a reduction edge, chosen by ``if temp1.shape[2] == x.shape[2]``) and
  channel-shuffles by ``self.k``; between stages ``model.wider(k)`` sets a smaller ``k`` on every
  MixedOp and replaces each candidate's convolutions and BatchNorms by wider ones (new
  parameters, old weights copied in; a new optimizer follows); ``_loss`` adds the KL
  regularizer ``reg_scale * kl_divergence(Dirichlet(elu(alpha) + 1), Dirichlet(anchor)).sum()``.
* ``proxyless`` -- ProxylessNAS (mit-han-lab/proxylessnas ``search/modules/mix_op.py`` and
  ``nas_manager.py``): ``MixedEdge`` with ``AP_path_alpha`` (alphas) and ``AP_path_wb`` (binary
  gates) as parameters; ``MixedEdge.MODE`` a *class* attribute switched by the loop (``None``
  for a weight step, ``'full_v2'`` for an architecture step); every step ``binarize()``
  samples the active path with ``torch.multinomial(...).item()`` and stores it as Python ints
  (``self.active_index = [sample]``, ``self.inactive_index = [...]``); the forward runs
  ``self.active_op`` (MODE ``None``) or ``ArchGradientFunction.apply(x, AP_path_wb,
  run_function, backward_function)`` (``'full_v2'``: forward through the active path only,
  backward gives every gate ``sum(out_k * grad_output)``); ``unused_modules_off()`` sets the
  unused candidates of the ``ModuleList`` to ``None`` around the step; after
  ``loss.backward()`` the loop calls ``set_arch_param_grad()``, which builds the alphas'
  gradients from the gates' (``binary_grads[j] * probs[j] * (delta_ij - probs[i])``).

* ``naslib`` -- NASLib (automl/NASLib ``search_spaces/core/graph.py``, ``DARTSOptimizer``): a
  cell is ``Graph(nn.Module, nx.DiGraph)``; each edge holds ``op`` (registered with
  ``add_module``) and ``alpha`` in its networkx edge data (one Parameter per edge position,
  shared between cells, owned by a ``ParameterList``); the forward walks
  ``nx.lexicographical_topological_sort``, writes edge outputs into
  ``self.nodes[v]['input']`` and clears them at the end.
* ``nni3`` -- NNI 3.x one-shot (``nas/oneshot/pytorch/supermodule/differentiable.py``, the
  GumbelDARTS strategy): ``DifferentiableMixedLayer`` with the candidates as named children,
  ``_arch_alpha`` shared by every layer with the same label and ONE ``GumbelSoftmax`` module
  (``tau = 1``, an int, at first) shared by all layers; ``on_train_epoch_start`` anneals the
  temperature and sets ``m._softmax.tau`` on every module of the trained model that has one.

``STYLES = {name: Style(build, example_inputs, num_mixed_ops, source)}``; the search loops
live next to the models (``snas_search``, ``drnas_search``, ``proxyless_search``,
``naslib_search``, ``nni3_search``), written the
way the codebases' ``train_search.py`` / ``nas_manager.py`` write them, each taking the module
to train (the model or its compilation) and the model (for its parameter lists).
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Dirichlet, RelaxedOneHotCategorical, kl_divergence

from .darts_original import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN

NUM_CLASSES = 10
INPUT_HW = 8


@dataclass(frozen=True)
class Style:
  build: Callable[[], nn.Module]
  example_inputs: Callable[..., tuple]
  num_mixed_ops: int
  source: str


# ==========================================================================
# SNAS
# ==========================================================================
SNAS_C, SNAS_LAYERS, SNAS_STEPS, SNAS_MULTIPLIER = 4, 3, 2, 2
SNAS_NUM_MIXED_OPS = SNAS_LAYERS * sum(2 + i for i in range(SNAS_STEPS))  # 15


class SnasMixedOp(nn.Module):

  def __init__(self, C, stride, height=INPUT_HW, width=INPUT_HW):
    super(SnasMixedOp, self).__init__()
    self._ops = nn.ModuleList()
    self.COSTS = []
    for primitive in PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      flop = mac = 0.0
      for m in op.modules():
        if isinstance(m, nn.Conv2d):
          flop += height * width * m.kernel_size[0] ** 2 * m.in_channels * m.out_channels / m.groups
          mac += height * width * (m.in_channels + m.out_channels)
      if 'skip' in primitive and stride == 1:
        mac = 2.0 * C * height * width
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)
      self.COSTS.append((flop + mac) / 1e4)

  def forward(self, x, Z):
    return sum(z * op(x) for z, op in zip(Z, self._ops)), sum(z * c for z, c in zip(Z, self.COSTS))


class SnasCell(nn.Module):

  def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
    super(SnasCell, self).__init__()
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
        self._ops.append(SnasMixedOp(C, stride))

  def forward(self, s0, s1, Z):
    s0 = self.preprocess0(s0)
    s1 = self.preprocess1(s1)
    states = [s0, s1]
    cost = 0
    offset = 0
    for i in range(self._steps):
      s = 0
      for j, h in enumerate(states):
        out, c = self._ops[offset+j](h, Z[offset+j])
        s = s + out
        cost = cost + c
      offset += len(states)
      states.append(s)
    return torch.cat(states[-self._multiplier:], dim=1), cost


class SnasNetwork(nn.Module):

  def __init__(self, C, num_classes, layers, criterion, steps=SNAS_STEPS,
               multiplier=SNAS_MULTIPLIER, stem_multiplier=3, resource_lambda=1e-2):
    super(SnasNetwork, self).__init__()
    self._C = C
    self._num_classes = num_classes
    self._layers = layers
    self._criterion = criterion
    self._steps = steps
    self._multiplier = multiplier
    self._resource_lambda = resource_lambda
    C_curr = stem_multiplier*C
    self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                              nn.BatchNorm2d(C_curr))
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    self.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
      if i in [layers//3, 2*layers//3]:
        C_curr *= 2
        reduction = True
      else:
        reduction = False
      cell = SnasCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
      reduction_prev = reduction
      self.cells += [cell]
      C_prev_prev, C_prev = C_prev, multiplier*C_curr
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    self._initialize_alphas()

  def _initialize_alphas(self):
    k = sum(1 for i in range(self._steps) for n in range(2+i))
    num_ops = len(PRIMITIVES)
    self.alphas_normal = nn.Parameter(1e-3*torch.randn(k, num_ops))
    self.alphas_reduce = nn.Parameter(1e-3*torch.randn(k, num_ops))
    self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

  def arch_parameters(self):
    return self._arch_parameters

  def weights(self):
    return [p for n, p in self.named_parameters() if 'alphas' not in n]

  def ArchitectDist(self, alpha, temperature):
    m = RelaxedOneHotCategorical(torch.tensor([temperature], dtype=alpha.dtype), logits=alpha)
    return m.rsample()

  def forward(self, input, temperature):
    s0 = s1 = self.stem(input)
    costs = 0
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        Z = self.ArchitectDist(self.alphas_reduce, temperature)
      else:
        Z = self.ArchitectDist(self.alphas_normal, temperature)
      s2, cost = cell(s0, s1, Z)
      s0, s1 = s1, s2
      costs = costs + cost
    out = self.global_pooling(s1)
    logits = self.classifier(out.view(out.size(0), -1))
    return logits, costs

  def _loss(self, input, target, temperature):
    logits, cost = self(input, temperature)
    return self._criterion(logits, target) + self._resource_lambda * cost


def build_snas():
  return SnasNetwork(SNAS_C, NUM_CLASSES, SNAS_LAYERS, nn.CrossEntropyLoss())


def snas_search(module, model, data, initial_temp=1.0, anneal_rate=0.3, as_float=False):
  """SNAS's loop: one epoch per batch here; the temperature annealed every epoch (a
  ``numpy.float64``; ``as_float`` converts it to a Python float); weights and alphas stepped
  together from one loss (cross entropy + resource penalty).  Records the loss, the alphas
  and the BatchNorm statistics after every step."""
  optimizer_model = torch.optim.SGD(model.weights(), lr=0.05, momentum=0.9, weight_decay=3e-4)
  optimizer_arch = torch.optim.Adam(model.arch_parameters(), lr=0.1, betas=(0.5, 0.999),
                                    weight_decay=1e-3)
  record = []
  for epoch, (input, target) in enumerate(data):
    temperature = initial_temp * np.exp(-anneal_rate * epoch)
    if as_float:
      temperature = float(temperature)
    module.train()
    optimizer_arch.zero_grad()
    optimizer_model.zero_grad()
    loss = module._loss(input, target, temperature)
    loss.backward()
    nn.utils.clip_grad_norm_(model.weights(), 5.0)
    optimizer_arch.step()
    optimizer_model.step()
    record.append((loss.detach(), [a.detach().clone() for a in model.arch_parameters()]
                   + [b.detach().clone() for b in model.buffers()]))
  return record


# ==========================================================================
# DrNAS (progressive partial channels)
# ==========================================================================
DRNAS_C, DRNAS_LAYERS, DRNAS_STEPS, DRNAS_MULTIPLIER, DRNAS_K = 8, 3, 2, 2, 4
DRNAS_PRIMITIVES = ['max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'dil_conv_3x3']
DRNAS_NUM_MIXED_OPS = DRNAS_LAYERS * sum(2 + i for i in range(DRNAS_STEPS))  # 15


def channel_shuffle(x, groups):
  batchsize, num_channels, height, width = x.data.size()
  channels_per_group = num_channels // groups
  x = x.view(batchsize, groups, channels_per_group, height, width)
  x = torch.transpose(x, 1, 2).contiguous()
  x = x.view(batchsize, -1, height, width)
  return x


def _wider(module, ratio):
  """Replace every Conv2d / BatchNorm2d under ``module`` by one ``ratio`` times as wide, the
  old weights copied into the leading block and repeated into the new channels (DrNAS's
  ``InChannelWider`` / ``OutChannelWider`` and ``BNWider``, with a fixed index)."""
  for name, child in module.named_children():
    if isinstance(child, nn.Conv2d):
      depthwise = child.groups == child.in_channels and child.groups > 1
      new = nn.Conv2d(child.in_channels * ratio, child.out_channels * ratio, child.kernel_size,
                      child.stride, child.padding, child.dilation,
                      groups=child.groups * ratio if depthwise else child.groups,
                      bias=child.bias is not None).to(child.weight.dtype)
      out_idx = torch.arange(new.out_channels) % child.out_channels
      in_idx = torch.arange(new.weight.shape[1]) % child.weight.shape[1]
      with torch.no_grad():
        new.weight.copy_(child.weight[out_idx][:, in_idx])
      setattr(module, name, new)
    elif isinstance(child, nn.BatchNorm2d):
      new = nn.BatchNorm2d(child.num_features * ratio, affine=child.affine)
      new = new.to(child.running_mean.dtype)
      idx = torch.arange(new.num_features) % child.num_features
      new.running_mean.copy_(child.running_mean[idx])
      new.running_var.copy_(child.running_var[idx])
      setattr(module, name, new)
    else:
      _wider(child, ratio)


class DrMixedOp(nn.Module):

  def __init__(self, C, stride, k):
    super(DrMixedOp, self).__init__()
    self._ops = nn.ModuleList()
    self.k = k
    self.C = C
    self.mp = nn.MaxPool2d(2, 2)
    for primitive in DRNAS_PRIMITIVES:
      op = OPS[primitive](C // k, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
      self._ops.append(op)

  def wider(self, k):
    ratio = self.k // k
    self.k = k
    for op in self._ops:
      _wider(op, ratio)

  def forward(self, x, weights):
    # channel proportion k
    dim_2 = x.shape[1]
    xtemp = x[:, :dim_2 // self.k, :, :]
    xtemp2 = x[:, dim_2 // self.k:, :, :]
    temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
    # reduction cell needs pooling before concat
    if temp1.shape[2] == x.shape[2]:
      ans = torch.cat([temp1, xtemp2], dim=1)
    else:
      ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
    ans = channel_shuffle(ans, self.k)
    return ans


class DrCell(nn.Module):

  def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, k):
    super(DrCell, self).__init__()
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
        self._ops.append(DrMixedOp(C, stride, k))

  def wider(self, k):
    for op in self._ops:
      op.wider(k)

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


class DrNetwork(nn.Module):

  def __init__(self, C, num_classes, layers, criterion, steps=DRNAS_STEPS,
               multiplier=DRNAS_MULTIPLIER, stem_multiplier=3, k=DRNAS_K,
               reg_type='kl', reg_scale=1e-3):
    super(DrNetwork, self).__init__()
    self._C = C
    self._num_classes = num_classes
    self._layers = layers
    self._criterion = criterion
    self._steps = steps
    self._multiplier = multiplier
    self.k = k
    self.reg_type = reg_type
    self.reg_scale = reg_scale
    C_curr = stem_multiplier*C
    self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                              nn.BatchNorm2d(C_curr))
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    self.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
      if i in [layers//3, 2*layers//3]:
        C_curr *= 2
        reduction = True
      else:
        reduction = False
      cell = DrCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, k)
      reduction_prev = reduction
      self.cells += [cell]
      C_prev_prev, C_prev = C_prev, multiplier*C_curr
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    self._initialize_alphas()

  def _initialize_alphas(self):
    k = sum(1 for i in range(self._steps) for n in range(2+i))
    num_ops = len(DRNAS_PRIMITIVES)
    self.alphas_normal = nn.Parameter(1e-3*torch.randn(k, num_ops))
    self.alphas_reduce = nn.Parameter(1e-3*torch.randn(k, num_ops))
    self._arch_parameters = [self.alphas_normal, self.alphas_reduce]
    self.anchor_normal = Dirichlet(torch.ones_like(self.alphas_normal).detach())
    self.anchor_reduce = Dirichlet(torch.ones_like(self.alphas_reduce).detach())

  def arch_parameters(self):
    return self._arch_parameters

  def weights(self):
    return [p for n, p in self.named_parameters() if 'alphas' not in n]

  def wider(self, k):
    self.k = k
    for cell in self.cells:
      cell.wider(k)

  def forward(self, input):
    s0 = s1 = self.stem(input)
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        weights = Dirichlet(F.elu(self.alphas_reduce) + 1).rsample()
      else:
        weights = Dirichlet(F.elu(self.alphas_normal) + 1).rsample()
      s0, s1 = s1, cell(s0, s1, weights)
    out = self.global_pooling(s1)
    logits = self.classifier(out.view(out.size(0), -1))
    return logits

  def _loss(self, input, target):
    logits = self(input)
    loss = self._criterion(logits, target)
    if self.reg_type == 'kl':
      loss = loss + self._get_kl_reg()
    return loss

  def _get_kl_reg(self):
    cons_normal = F.elu(self.alphas_normal) + 1
    cons_reduce = F.elu(self.alphas_reduce) + 1
    q_normal = Dirichlet(cons_normal)
    q_reduce = Dirichlet(cons_reduce)
    kl_reg = self.reg_scale * (torch.sum(kl_divergence(q_reduce, self.anchor_reduce))
                               + torch.sum(kl_divergence(q_normal, self.anchor_normal)))
    return kl_reg


def build_drnas():
  return DrNetwork(DRNAS_C, NUM_CLASSES, DRNAS_LAYERS, nn.CrossEntropyLoss())


def drnas_search(module, model, data, ks=(4, 2), epochs_per_stage=2):
  """DrNAS's progressive search: per stage a fresh weight optimizer (the wider model has new
  parameters) and ``epochs_per_stage`` epochs of first-order alternation (architecture step
  through ``_loss`` with its KL term on a validation batch, weight step on a training batch);
  between stages ``model.wider(k)``.  Records the losses, alphas and BatchNorm statistics."""
  architect = torch.optim.Adam(model.arch_parameters(), lr=0.1, betas=(0.5, 0.999),
                               weight_decay=1e-3)
  record, it = [], iter(data)
  for stage, k in enumerate(ks):
    if stage > 0:
      module.wider(k)
    optimizer = torch.optim.SGD(model.weights(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    for epoch in range(epochs_per_stage):
      (input_search, target_search), (input, target) = next(it), next(it)
      architect.zero_grad()
      loss_a = module._loss(input_search, target_search)
      loss_a.backward()
      architect.step()
      optimizer.zero_grad()
      logits = module(input)
      loss = model._criterion(logits, target)
      loss.backward()
      nn.utils.clip_grad_norm_(model.weights(), 5.0)
      optimizer.step()
      record.append((torch.stack([loss_a.detach(), loss.detach()]),
                     [a.detach().clone() for a in model.arch_parameters()]
                     + [b.detach().clone() for b in model.buffers()]))
  return record


# ==========================================================================
# ProxylessNAS
# ==========================================================================
PROXYLESS_C, PROXYLESS_STRIDES = 4, (1, 2, 1)
PROXYLESS_NUM_MIXED_OPS = len(PROXYLESS_STRIDES)


def delta_ij(i, j):
  if i == j:
    return 1
  else:
    return 0


class MBInvertedConvLayer(nn.Module):

  def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, expand_ratio=6):
    super(MBInvertedConvLayer, self).__init__()
    feature_dim = round(in_channels * expand_ratio)
    self.inverted_bottleneck = nn.Sequential(
      nn.Conv2d(in_channels, feature_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(feature_dim),
      nn.ReLU6(inplace=True))
    self.depth_conv = nn.Sequential(
      nn.Conv2d(feature_dim, feature_dim, kernel_size, stride, kernel_size // 2,
                groups=feature_dim, bias=False),
      nn.BatchNorm2d(feature_dim), nn.ReLU6(inplace=True))
    self.point_linear = nn.Sequential(
      nn.Conv2d(feature_dim, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))

  def forward(self, x):
    x = self.inverted_bottleneck(x)
    x = self.depth_conv(x)
    x = self.point_linear(x)
    return x

  @staticmethod
  def is_zero_layer():
    return False


class ZeroLayer(nn.Module):

  def __init__(self, stride):
    super(ZeroLayer, self).__init__()
    self.stride = stride

  def forward(self, x):
    return x[:, :, ::self.stride, ::self.stride].mul(0.)

  @staticmethod
  def is_zero_layer():
    return True


class ArchGradientFunction(torch.autograd.Function):

  @staticmethod
  def forward(ctx, x, binary_gates, run_func, backward_func):
    ctx.run_func = run_func
    ctx.backward_func = backward_func
    detached_x = x.detach()
    detached_x.requires_grad = x.requires_grad
    with torch.enable_grad():
      output = run_func(detached_x)
    ctx.save_for_backward(detached_x, output)
    return output.data

  @staticmethod
  def backward(ctx, grad_output):
    detached_x, output = ctx.saved_tensors
    grad_x = torch.autograd.grad(output, detached_x, grad_output, only_inputs=True)
    # compute gradients w.r.t. binary_gates
    binary_grads = ctx.backward_func(detached_x.data, output.data, grad_output.data)
    return grad_x[0], binary_grads, None, None


class MixedEdge(nn.Module):
  MODE = None  # full, two, None, full_v2

  def __init__(self, candidate_ops):
    super(MixedEdge, self).__init__()
    self.candidate_ops = nn.ModuleList(candidate_ops)
    self.AP_path_alpha = nn.Parameter(torch.Tensor(self.n_choices))  # architecture parameters
    self.AP_path_wb = nn.Parameter(torch.Tensor(self.n_choices))  # binary gates
    self.active_index = [0]
    self.inactive_index = None
    self.log_prob = None
    self.current_prob_over_ops = None

  @property
  def n_choices(self):
    return len(self.candidate_ops)

  @property
  def probs_over_ops(self):
    probs = F.softmax(self.AP_path_alpha, dim=0)  # softmax to probability
    return probs

  @property
  def active_op(self):
    """ assume only one path is active """
    return self.candidate_ops[self.active_index[0]]

  def is_zero_layer(self):
    return self.active_op.is_zero_layer()

  def forward(self, x):
    if MixedEdge.MODE == 'full_v2':
      def run_function(candidate_ops, active_id):
        def forward(_x):
          return candidate_ops[active_id](_x)
        return forward

      def backward_function(candidate_ops, active_id, binary_gates):
        def backward(_x, _output, grad_output):
          binary_grads = torch.zeros_like(binary_gates.data)
          with torch.no_grad():
            for k in range(len(candidate_ops)):
              if k != active_id:
                out_k = candidate_ops[k](_x.data)
              else:
                out_k = _output.data
              grad_k = torch.sum(out_k * grad_output)
              binary_grads[k] = grad_k
          return binary_grads
        return backward
      output = ArchGradientFunction.apply(
        x, self.AP_path_wb, run_function(self.candidate_ops, self.active_index[0]),
        backward_function(self.candidate_ops, self.active_index[0], self.AP_path_wb)
      )
    else:
      output = self.active_op(x)
    return output

  def binarize(self):
    """ prepare: active_index, inactive_index, AP_path_wb, log_prob (optional),
    current_prob_over_ops (optional) """
    self.log_prob = None
    # reset binary gates
    self.AP_path_wb.data.zero_()
    # binarize according to probs
    probs = self.probs_over_ops
    sample = torch.multinomial(probs.data, 1)[0].item()
    self.active_index = [sample]
    self.inactive_index = [_i for _i in range(0, sample)] + \
                          [_i for _i in range(sample + 1, self.n_choices)]
    self.log_prob = torch.log(probs[sample])
    self.current_prob_over_ops = probs
    # set binary gate
    self.AP_path_wb.data[sample] = 1.0
    # avoid over-regularization
    for _i in range(self.n_choices):
      for name, param in self.candidate_ops[_i].named_parameters():
        param.grad = None

  def set_arch_param_grad(self):
    # upstream reads the gates' gradient first (old PyTorch's zero_grad() kept zero tensors);
    # a zero path skips the edge, so its gates have no gradient under set_to_none
    if self.active_op.is_zero_layer():
      self.AP_path_alpha.grad = None
      return
    binary_grads = self.AP_path_wb.grad.data
    if self.AP_path_alpha.grad is None:
      self.AP_path_alpha.grad = torch.zeros_like(self.AP_path_alpha.data)
    probs = self.probs_over_ops.data
    for i in range(self.n_choices):
      for j in range(self.n_choices):
        self.AP_path_alpha.grad.data[i] += binary_grads[j] * probs[j] * (delta_ij(i, j) - probs[i])


class MobileInvertedResidualBlock(nn.Module):

  def __init__(self, mobile_inverted_conv, shortcut):
    super(MobileInvertedResidualBlock, self).__init__()
    self.mobile_inverted_conv = mobile_inverted_conv
    self.shortcut = shortcut

  def forward(self, x):
    if self.mobile_inverted_conv.is_zero_layer():
      res = x
    elif self.shortcut is None or self.shortcut.is_zero_layer():
      res = self.mobile_inverted_conv(x)
    else:
      conv_x = self.mobile_inverted_conv(x)
      skip_x = self.shortcut(x)
      res = skip_x + conv_x
    return res


class IdentityLayer(nn.Module):

  def forward(self, x):
    return x

  @staticmethod
  def is_zero_layer():
    return False


PROXYLESS_CANDIDATES = ['3x3_MBConv3', '5x5_MBConv3', '3x3_MBConv6', 'zero']


def build_candidate_ops(candidate_ops, C, stride):
  ops = []
  for name in candidate_ops:
    if name == 'zero':
      if stride == 1:  # upstream adds 'zero' only where the block has an identity shortcut
        ops.append(ZeroLayer(stride))
    else:
      k, e = name.split('_')
      ops.append(MBInvertedConvLayer(C, C, int(k[0]), stride, int(e[len('MBConv'):])))
  return ops


class SuperProxylessNASNets(nn.Module):

  def __init__(self, C=PROXYLESS_C, strides=PROXYLESS_STRIDES, n_classes=NUM_CLASSES,
               conv_candidates=PROXYLESS_CANDIDATES):
    super(SuperProxylessNASNets, self).__init__()
    self._redundant_modules = None
    self._unused_modules = None
    self.first_conv = nn.Sequential(nn.Conv2d(3, C, 3, 1, 1, bias=False), nn.BatchNorm2d(C),
                                    nn.ReLU6(inplace=True))
    blocks = []
    for stride in strides:
      conv_op = MixedEdge(build_candidate_ops(conv_candidates, C, stride))
      shortcut = IdentityLayer() if stride == 1 else None
      blocks.append(MobileInvertedResidualBlock(conv_op, shortcut))
    self.blocks = nn.ModuleList(blocks)
    self.global_avg_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C, n_classes)
    self.init_arch_params()

  def forward(self, x):
    x = self.first_conv(x)
    for block in self.blocks:
      x = block(x)
    x = self.global_avg_pooling(x)
    x = x.view(x.size(0), -1)  # flatten
    x = self.classifier(x)
    return x

  def architecture_parameters(self):
    for name, param in self.named_parameters():
      if 'AP_path_alpha' in name:
        yield param

  def binary_gates(self):
    for name, param in self.named_parameters():
      if 'AP_path_wb' in name:
        yield param

  def weight_parameters(self):
    for name, param in self.named_parameters():
      if 'AP_path_alpha' not in name and 'AP_path_wb' not in name:
        yield param

  def arch_parameters(self):
    return list(self.architecture_parameters())

  @property
  def redundant_modules(self):
    if self._redundant_modules is None:
      module_list = []
      for m in self.modules():
        if m.__str__().startswith('MixedEdge'):
          module_list.append(m)
      self._redundant_modules = module_list
    return self._redundant_modules

  def init_arch_params(self, init_type='normal', init_ratio=1e-3):
    for param in self.architecture_parameters():
      param.data.normal_(0, init_ratio)
    for param in self.binary_gates():
      param.data.zero_()

  def reset_binary_gates(self):
    for m in self.redundant_modules:
      m.binarize()

  def set_arch_param_grad(self):
    for m in self.redundant_modules:
      m.set_arch_param_grad()

  def unused_modules_off(self):
    self._unused_modules = []
    for m in self.redundant_modules:
      unused = {}
      if MixedEdge.MODE in ['full', 'two', 'full_v2']:
        involved_index = m.active_index + m.inactive_index
      else:
        involved_index = m.active_index
      for i in range(m.n_choices):
        if i not in involved_index:
          unused[i] = m.candidate_ops[i]
          m.candidate_ops[i] = None
      self._unused_modules.append(unused)

  def unused_modules_back(self):
    if self._unused_modules is None:
      return
    for m, unused in zip(self.redundant_modules, self._unused_modules):
      for i in unused:
        m.candidate_ops[i] = unused[i]
    self._unused_modules = None


def build_proxyless():
  return SuperProxylessNASNets()


def proxyless_search(module, model, data, grad_binary_mode='full_v2'):
  """``ArchSearchRunManager.train``'s inner loop: a weight step (``MixedEdge.MODE = None``,
  fresh binary gates, unused modules off, the active path trained) on one batch, then
  ``gradient_step`` (``MixedEdge.MODE = 'full_v2'``, fresh gates, forward, backward,
  ``set_arch_param_grad``, arch optimizer step) on another.  The sampling draws come from
  the global RNG, as upstream.  Records losses, the sampled paths, alphas and statistics."""
  optimizer = torch.optim.SGD(list(model.weight_parameters()), lr=0.05, momentum=0.9,
                              weight_decay=4e-5)
  arch_optimizer = torch.optim.Adam(list(model.architecture_parameters()), lr=0.1,
                                    betas=(0.0, 0.999), eps=1e-8)
  criterion = nn.CrossEntropyLoss()
  record = []
  for step in range(len(data) // 2):
    (images, labels), (v_images, v_labels) = data[2 * step], data[2 * step + 1]
    # train weight parameters
    MixedEdge.MODE = None
    model.reset_binary_gates()  # random sample binary gates
    model.unused_modules_off()  # remove unused module for speedup
    output = module(images)
    loss = criterion(output, labels)
    model.zero_grad()
    loss.backward()
    optimizer.step()
    model.unused_modules_back()
    paths = [m.active_index[0] for m in model.redundant_modules]
    # gradient_step: the architecture parameters
    MixedEdge.MODE = grad_binary_mode
    model.reset_binary_gates()
    model.unused_modules_off()
    output = module(v_images)
    arch_loss = criterion(output, v_labels)
    model.zero_grad()
    arch_loss.backward()
    model.set_arch_param_grad()
    arch_optimizer.step()
    model.unused_modules_back()
    MixedEdge.MODE = None
    paths += [m.active_index[0] for m in model.redundant_modules]
    record.append((torch.stack([loss.detach(), arch_loss.detach()]), paths,
                   [a.detach().clone() for a in model.arch_parameters()]
                   + [b.detach().clone() for b in model.buffers()]))
  return record


# ==========================================================================
# NASLib (a cell as a networkx graph)
# ==========================================================================
import networkx as nx  # noqa: E402

NASLIB_C = 4
NASLIB_PRIMITIVES = ['skip_connect', 'avg_pool_3x3', 'sep_conv_3x3', 'dil_conv_3x3']
NASLIB_NUM_MIXED_OPS = 2 * 3  # two cells, three mixed edges each


class NaslibMixedOp(nn.Module):
  """NASLib's ``DARTSMixedOp``: the primitives of one edge; the alpha comes with the edge data."""

  def __init__(self, C):
    super(NaslibMixedOp, self).__init__()
    self.primitives = nn.ModuleList()
    for primitive in NASLIB_PRIMITIVES:
      op = OPS[primitive](C, 1, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self.primitives.append(op)

  def forward(self, x, edge_data):
    weights = torch.softmax(edge_data['alpha'], dim=-1)
    return sum(w * op(x) for w, op in zip(weights, self.primitives))


class Identity(nn.Module):

  def forward(self, x, edge_data=None):
    return x


class Graph(nn.Module, nx.DiGraph):
  """NASLib's ``Graph(torch.nn.Module, nx.DiGraph)``: node 1 the input, the last node the
  output; every edge holds ``op`` (a module, registered under ``'{name}-edge({u},{v})'``) and
  data; every node a ``comb_op`` summing its inputs.  The forward walks
  ``nx.lexicographical_topological_sort``, writing each edge's output into
  ``self.nodes[v]['input']`` and clearing those dicts at the end."""

  def __init__(self, name='cell'):
    nn.Module.__init__(self)
    nx.DiGraph.__init__(self)
    self.name = name

  def compile(self):
    for u, v, data in sorted(self.edges(data=True)):
      self.add_module('{}-edge({},{})'.format(self.name, u, v), data['op'])

  def forward(self, x, *args):
    for node_idx in nx.lexicographical_topological_sort(self):
      node = self.nodes[node_idx]
      if node_idx == 1:
        x = x
      elif len(node['input']) == 1:
        x = list(node['input'].values())[0]
      else:
        x = node['comb_op']([node['input'][k] for k in sorted(node['input'])])
      for neighbor_idx in self.neighbors(node_idx):
        edge_data = self.get_edge_data(node_idx, neighbor_idx)
        edge_output = edge_data['op'](x, edge_data)
        self.nodes[neighbor_idx]['input'].update({node_idx: edge_output})
    for node_idx in self.nodes:
      self.nodes[node_idx]['input'] = {}
    return x


def _sum(inputs):
  return sum(inputs)


def naslib_cell(name, C, alphas):
  """Nodes 1-4: mixed edges 1->2, 1->3, 2->3 (each with its alpha, shared between cells as
  NASLib's ``shared=True`` edge data), identity edges 2->4, 3->4."""
  g = Graph(name)
  for n in range(1, 5):
    g.add_node(n, comb_op=_sum, input={})
  for (u, v), alpha in zip([(1, 2), (1, 3), (2, 3)], alphas):
    g.add_edge(u, v, op=NaslibMixedOp(C), alpha=alpha)
  g.add_edge(2, 4, op=Identity())
  g.add_edge(3, 4, op=Identity())
  g.compile()
  return g


class NaslibNetwork(nn.Module):

  def __init__(self, C=NASLIB_C, num_classes=NUM_CLASSES):
    super(NaslibNetwork, self).__init__()
    # DARTSOptimizer.adapt_search_space: one alpha per mixed edge, kept in a ParameterList
    self.architectural_weights = nn.ParameterList(
      nn.Parameter(1e-3 * torch.randn(len(NASLIB_PRIMITIVES))) for _ in range(3))
    self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    self.cells = nn.ModuleList(naslib_cell('cell{}'.format(i), C, self.architectural_weights)
                               for i in range(2))
    self.classifier = nn.Linear(C, num_classes)

  def arch_parameters(self):
    return list(self.architectural_weights)

  def weights(self):
    return [p for n, p in self.named_parameters() if 'architectural_weights' not in n]

  def forward(self, x):
    x = self.stem(x)
    for cell in self.cells:
      x = cell(x)
    return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_naslib():
  return NaslibNetwork()


def naslib_search(module, model, data):
  """NASLib's ``DARTSOptimizer.step`` (first order): ``arch_optimizer`` on the validation
  batch, then ``op_optimizer`` on the training batch, with ``clip_grad_norm_``."""
  op_optimizer = torch.optim.SGD(model.weights(), lr=0.05, momentum=0.9, weight_decay=3e-4)
  arch_optimizer = torch.optim.Adam(model.arch_parameters(), lr=0.1, betas=(0.5, 0.999),
                                    weight_decay=1e-3)
  loss_fn = nn.CrossEntropyLoss()
  record = []
  for step in range(len(data) // 2):
    (input_train, target_train), (input_val, target_val) = data[2 * step], data[2 * step + 1]
    arch_optimizer.zero_grad()
    logits_val = module(input_val)
    val_loss = loss_fn(logits_val, target_val)
    val_loss.backward()
    arch_optimizer.step()
    op_optimizer.zero_grad()
    logits_train = module(input_train)
    train_loss = loss_fn(logits_train, target_train)
    train_loss.backward()
    nn.utils.clip_grad_norm_(model.weights(), 5.0)
    op_optimizer.step()
    record.append((torch.stack([val_loss.detach(), train_loss.detach()]),
                   [a.detach().clone() for a in model.arch_parameters()]
                   + [b.detach().clone() for b in model.buffers()]))
  return record


# ==========================================================================
# NNI 3.x differentiable one-shot (DARTS / GumbelDARTS strategies)
# ==========================================================================
NNI3_C, NNI3_LABELS = 4, ('op_a', 'op_b', 'op_a')   # layers 0 and 2 share one alpha
NNI3_NUM_MIXED_OPS = len(NNI3_LABELS)


class GumbelSoftmax(nn.Softmax):
  """NNI 3's ``GumbelSoftmax``: ``F.gumbel_softmax`` with a ``tau`` attribute (an int at
  first) and ``hard``."""

  def __init__(self, dim=-1):
    super().__init__(dim)
    self.tau = 1
    self.hard = False

  def forward(self, inputs):
    return F.gumbel_softmax(inputs, tau=self.tau, hard=self.hard, dim=self.dim)


def weighted_sum(items, weights):
  return sum(w * item for w, item in zip(weights, items))


class DifferentiableMixedLayer(nn.Module):
  """NNI 3's ``DifferentiableMixedLayer``: the candidates as named children, the alpha (shared
  by every layer with the same label) as ``_arch_alpha`` and ONE softmax module shared by all
  layers (``mutate_kwargs['softmax']``)."""
  _arch_parameter_names = ['_arch_alpha']

  def __init__(self, paths, alpha, softmax, label):
    super().__init__()
    self.op_names = []
    for name, module in paths:
      self.add_module(name, module)
      self.op_names.append(name)
    self.label = label
    self._arch_alpha = alpha
    self._softmax = softmax

  def forward(self, *args, **kwargs):
    all_op_results = [getattr(self, op)(*args, **kwargs) for op in self.op_names]
    return weighted_sum(all_op_results, self._softmax(self._arch_alpha))


def _nni3_paths(C):
  return [('conv3x3', nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))),
          ('conv1x1', nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))),
          ('avgpool', nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
          ('skip', nn.Identity())]


class Nni3Network(nn.Module):

  def __init__(self, C=NNI3_C, num_classes=NUM_CLASSES, softmax=None):
    super().__init__()
    softmax = GumbelSoftmax(-1) if softmax is None else softmax
    memo = {}
    self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    layers = []
    for label in NNI3_LABELS:
      if label not in memo:
        memo[label] = nn.Parameter(torch.randn(4) * 1e-3)
      layers.append(DifferentiableMixedLayer(_nni3_paths(C), memo[label], softmax, label))
    self.layers = nn.ModuleList(layers)
    self.classifier = nn.Linear(C, num_classes)

  def forward(self, x):
    x = self.stem(x)
    for layer in self.layers:
      x = x + layer(x)
    return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

  def arch_parameters(self):
    seen = {}
    for module in self.modules():
      if isinstance(module, DifferentiableMixedLayer):
        seen.setdefault(id(module._arch_alpha), module._arch_alpha)
    return list(seen.values())

  def weights(self):
    return [p for n, p in self.named_parameters() if '_arch_' not in n]


def build_nni3():
  return Nni3Network()


def nni3_search(module, model, data, init_temp=1.0, min_temp=0.33, walk=None):
  """NNI 3's ``GumbelDartsLightningModule``: ``on_train_epoch_start`` anneals the temperature
  linearly and sets ``m._softmax.tau`` on every module ``m`` of ``walk`` (upstream: of
  ``self.model``, the module it trains; default ``module``) that has a ``_softmax``; each
  epoch (one step here) an architecture step on the validation batch, then a weight step."""
  walk = module if walk is None else walk
  arch_optim = torch.optim.Adam(model.arch_parameters(), lr=0.1, betas=(0.5, 0.999),
                                weight_decay=1e-3)
  w_optim = torch.optim.SGD(model.weights(), lr=0.05, momentum=0.9, weight_decay=3e-4)
  max_epochs = len(data) // 2
  record = []
  for epoch in range(max_epochs):
    temp = (1 - epoch / max_epochs) * (init_temp - min_temp) + min_temp
    temp = max(temp, min_temp)
    for m in walk.modules():
      if hasattr(m, '_softmax'):
        m._softmax.tau = temp
    (trn_x, trn_y), (val_x, val_y) = data[2 * epoch], data[2 * epoch + 1]
    arch_optim.zero_grad()
    loss_a = F.cross_entropy(module(val_x), val_y)
    loss_a.backward()
    arch_optim.step()
    w_optim.zero_grad()
    loss = F.cross_entropy(module(trn_x), trn_y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.weights(), 5.0)
    w_optim.step()
    record.append((torch.stack([loss_a.detach(), loss.detach()]),
                   [a.detach().clone() for a in model.arch_parameters()]
                   + [b.detach().clone() for b in model.buffers()]))
  return record


# ==========================================================================
# entry points
# ==========================================================================
def example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


def snas_example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW), 1.0)


STYLES = {
  'snas': Style(build_snas, snas_example_inputs, SNAS_NUM_MIXED_OPS,
                'SNAS model_search.py re-implementations (RelaxedOneHotCategorical, COSTS)'),
  'drnas': Style(build_drnas, example_inputs, DRNAS_NUM_MIXED_OPS,
                 'xiangning-chen/DrNAS DARTS-space progressive model_search (Dirichlet, k, KL)'),
  'proxyless': Style(build_proxyless, example_inputs, PROXYLESS_NUM_MIXED_OPS,
                     'mit-han-lab/proxylessnas search/modules/mix_op.py, nas_manager.py'),
  'naslib': Style(build_naslib, example_inputs, NASLIB_NUM_MIXED_OPS,
                  'automl/NASLib naslib/search_spaces/core/graph.py, DARTSOptimizer'),
  'nni3': Style(build_nni3, example_inputs, NNI3_NUM_MIXED_OPS,
                'microsoft/nni 3.x nas/oneshot/pytorch (DifferentiableMixedLayer, GumbelDARTS)'),
}
