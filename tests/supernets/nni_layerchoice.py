"""Imitation of NNI's one-shot DARTS supernet (microsoft/nni).

Imitates ``DartsLayerChoice`` / ``DartsInputChoice`` and the module-replacement
step of NNI's DARTS trainer (``nni/retiarii/oneshot/pytorch/darts.py`` and
``nni/nas/oneshot/pytorch/darts.py`` in NNI 2.x, plus
``_replace_module_with_type`` from ``.../oneshot/pytorch/utils.py``), applied to
a network written like NNI's DARTS example (``examples/nas/oneshot/darts/
model.py`` + ``ops.py``: Node / Cell / CNN, PoolBN, StdConv, FactorizedReduce,
DilConv, SepConv, DropPath).  Minimal stand-ins for ``LayerChoice`` and
``InputChoice`` are defined here so there is no NNI dependency.

Idioms exercised:

* the user model is built with ``LayerChoice(OrderedDict([...]), label=...)``
  / ``InputChoice(n_candidates, n_chosen, label)`` placeholders which are then
  *replaced in place* (``setattr(parent, name, DartsLayerChoice(child))``,
  including into ``nn.ModuleList`` slots) before training;
* every choice module owns its own architecture parameter
  ``self.alpha = nn.Parameter(torch.randn(len(self.op_choices)) * 1e-3)`` --
  alphas are scattered through the module tree instead of living in one
  matrix;
* ``self.op_choices = nn.ModuleDict(layer_choice.named_children())`` keyed by
  candidate names; forward
  ``op_results = torch.stack([op(*args, **kwargs) for op in
  self.op_choices.values()])``, ``alpha_shape = [-1] + [1] *
  (len(op_results.size()) - 1)``, ``torch.sum(op_results *
  F.softmax(self.alpha, -1).view(*alpha_shape), 0)`` -- ``*args/**kwargs``
  forwarding, ``len()`` of a ``torch.Size``, stacked candidates;
* ``DartsLayerChoiceNoneSlot`` (:func:`build_none_slot`): the stack form with a zero slot
  for ``none`` appended (``torch.cat([outs, torch.zeros_like(outs[:1])], 0)``) and n + 1
  softmax weights;
* ``DartsInputChoice``: the same stack/softmax/sum but over a *list of
  different inputs* (``torch.stack(inputs)``) -- NOT a mixed op;
* the quirky ``parameters()`` / ``named_parameters()`` overrides of both
  choice classes (hide ``alpha``; ``named_parameters`` takes no ``recurse``
  argument, exactly as in NNI 2.x -- calling ``choice.named_parameters(
  recurse=False)`` raises ``TypeError``);
* Node: ``assert len(self.ops) == len(prev_nodes)``, ``[op(node) for op, node
  in zip(self.ops, prev_nodes)]``, ``[self.drop_path(o) if o is not None else
  None for o in out]``; DropPath with ``if self.training and self.p > 0.``;
* ``nn.Identity`` as a candidate, ``PoolBN`` with a Python string branch;
* ``out.view(out.size(0), -1)`` flatten.

Size used by :func:`build`: channels=4, n_layers=2, n_nodes=2, 7 candidates
per LayerChoice, 16x16 input.  With NNI's rule (reduction at
``n_layers // 3`` and ``2 * n_layers // 3``) both cells of a 2-layer network
are reduction cells (16x16 -> 8x8 -> 4x4); cell 1 gets a FactorizedReduce
preprocessing of s0.

Mixed ops by construction: one DartsLayerChoice per (node, predecessor):
nodes have 2 and 3 predecessors -> 5 per cell; 2 cells -> 10.
(The 2 DartsInputChoices per cell -- 4 in total -- are weighted sums over
different inputs, not mixed ops.)
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------
# minimal stand-ins for nni.retiarii.nn.pytorch.LayerChoice / InputChoice
# --------------------------------------------------------------------------
class LayerChoice(nn.Module):
    def __init__(self, candidates, label=None):
        super().__init__()
        self.label = label
        self.key = label
        self.names = []
        for name, module in candidates.items():
            self.add_module(name, module)
            self.names.append(name)

    def __getitem__(self, name):
        return self._modules[name]

    def __len__(self):
        return len(self.names)

    def forward(self, x):
        raise RuntimeError('LayerChoice must be replaced by a one-shot strategy before use')


class InputChoice(nn.Module):
    def __init__(self, n_candidates, n_chosen=1, label=None):
        super().__init__()
        self.n_candidates = n_candidates
        self.n_chosen = n_chosen
        self.label = label
        self.key = label

    def forward(self, candidate_inputs):
        raise RuntimeError('InputChoice must be replaced by a one-shot strategy before use')


# --------------------------------------------------------------------------
# nni/.../oneshot/pytorch/darts.py
# --------------------------------------------------------------------------
class DartsLayerChoice(nn.Module):
    def __init__(self, layer_choice):
        super(DartsLayerChoice, self).__init__()
        self.name = layer_choice.label
        self.op_choices = nn.ModuleDict(OrderedDict([(name, layer_choice[name]) for name in layer_choice.names]))
        self.alpha = nn.Parameter(torch.randn(len(self.op_choices)) * 1e-3)

    def forward(self, *args, **kwargs):
        op_results = torch.stack([op(*args, **kwargs) for op in self.op_choices.values()])
        alpha_shape = [-1] + [1] * (len(op_results.size()) - 1)
        return torch.sum(op_results * F.softmax(self.alpha, -1).view(*alpha_shape), 0)

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self):
        for name, p in super(DartsLayerChoice, self).named_parameters():
            if name == 'alpha':
                continue
            yield name, p

    def export(self):
        return list(self.op_choices.keys())[torch.argmax(self.alpha).item()]


class DartsLayerChoiceNoneSlot(nn.Module):
    """The stack form with a zero slot for the ``none`` op: the candidate outputs are stacked,
    a slot of zeros is appended (``torch.cat([outs, torch.zeros_like(outs[:1])], 0)``) and
    ``n + 1`` softmax weights viewed as ``(-1, 1, 1, 1, 1)`` weight the ``n + 1`` slots before
    ``sum(0)`` -- the form of the differentiable layer in later NNI versions."""

    def __init__(self, layer_choice):
        super(DartsLayerChoiceNoneSlot, self).__init__()
        self.name = layer_choice.label
        self.op_choices = nn.ModuleDict(OrderedDict([(name, layer_choice[name]) for name in layer_choice.names]))
        self.alpha = nn.Parameter(torch.randn(len(self.op_choices) + 1) * 1e-3)

    def forward(self, *args, **kwargs):
        outs = torch.stack([op(*args, **kwargs) for op in self.op_choices.values()])
        outs = torch.cat([outs, torch.zeros_like(outs[:1])], 0)
        weights = F.softmax(self.alpha, -1).view(-1, 1, 1, 1, 1)
        return (outs * weights).sum(0)

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self):
        for name, p in super(DartsLayerChoiceNoneSlot, self).named_parameters():
            if name == 'alpha':
                continue
            yield name, p

    def export(self):
        names = list(self.op_choices.keys()) + ['none']
        return names[torch.argmax(self.alpha).item()]


class DartsInputChoice(nn.Module):
    def __init__(self, input_choice):
        super(DartsInputChoice, self).__init__()
        self.name = input_choice.label
        self.alpha = nn.Parameter(torch.randn(input_choice.n_candidates) * 1e-3)
        self.n_chosen = input_choice.n_chosen or 1

    def forward(self, inputs):
        inputs = torch.stack(inputs)
        alpha_shape = [-1] + [1] * (len(inputs.size()) - 1)
        return torch.sum(inputs * F.softmax(self.alpha, -1).view(*alpha_shape), 0)

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self):
        for name, p in super(DartsInputChoice, self).named_parameters():
            if name == 'alpha':
                continue
            yield name, p

    def export(self):
        return torch.argsort(-self.alpha).cpu().numpy().tolist()[:self.n_chosen]


# nni/.../oneshot/pytorch/utils.py
def _replace_module_with_type(root_module, init_fn, type_name, modules):
    if modules is None:
        modules = []

    def apply(m):
        for name, child in m.named_children():
            if isinstance(child, type_name):
                setattr(m, name, init_fn(child))
                modules.append((child.key, getattr(m, name)))
            else:
                apply(child)

    apply(root_module)
    return modules


def replace_layer_choice(root_module, init_fn, modules=None):
    return _replace_module_with_type(root_module, init_fn, LayerChoice, modules)


def replace_input_choice(root_module, init_fn, modules=None):
    return _replace_module_with_type(root_module, init_fn, InputChoice, modules)


# --------------------------------------------------------------------------
# examples/nas/oneshot/darts/ops.py
# --------------------------------------------------------------------------
class DropPath(nn.Module):
    def __init__(self, p=0.):
        """
        Drop path with probability.

        Parameters
        ----------
        p : float
            Probability of an path to be zeroed.
        """
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.training and self.p > 0.:
            keep_prob = 1. - self.p
            # per data point mask
            mask = torch.zeros((x.size(0), 1, 1, 1), device=x.device).bernoulli_(keep_prob)
            return x / keep_prob * mask

        return x


class PoolBN(nn.Module):
    """
    AvgPool or MaxPool with BN. ``pool_type`` must be ``max`` or ``avg``.
    """
    def __init__(self, pool_type, C, kernel_size, stride, padding, affine=True):
        super().__init__()
        if pool_type.lower() == 'max':
            self.pool = nn.MaxPool2d(kernel_size, stride, padding)
        elif pool_type.lower() == 'avg':
            self.pool = nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=False)
        else:
            raise ValueError()

        self.bn = nn.BatchNorm2d(C, affine=affine)

    def forward(self, x):
        out = self.pool(x)
        out = self.bn(out)
        return out


class StdConv(nn.Module):
    """
    Standard conv: ReLU - Conv - BN
    """
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine)
        )

    def forward(self, x):
        return self.net(x)


class FacConv(nn.Module):
    """
    Factorized conv: ReLU - Conv(Kx1) - Conv(1xK) - BN
    """
    def __init__(self, C_in, C_out, kernel_length, stride, padding, affine=True):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, (kernel_length, 1), stride, padding, bias=False),
            nn.Conv2d(C_in, C_out, (1, kernel_length), stride, padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine)
        )

    def forward(self, x):
        return self.net(x)


class DilConv(nn.Module):
    """
    (Dilated) depthwise separable conv.
    ReLU - (Dilated) depthwise separable - Pointwise - BN.
    If dilation == 2, 3x3 conv => 5x5 receptive field, 5x5 conv => 9x9 receptive field.
    """
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine)
        )

    def forward(self, x):
        return self.net(x)


class SepConv(nn.Module):
    """
    Depthwise separable conv.
    DilConv(dilation=1) * 2.
    """
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.net = nn.Sequential(
            DilConv(C_in, C_in, kernel_size, stride, padding, dilation=1, affine=affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, dilation=1, affine=affine)
        )

    def forward(self, x):
        return self.net(x)


class FactorizedReduce(nn.Module):
    """
    Reduce feature map size by factorized pointwise (stride=2).
    """
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, 2, 0, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, 2, 0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv1(x), self.conv2(x[:, :, 1:, 1:])], dim=1)
        out = self.bn(out)
        return out


# --------------------------------------------------------------------------
# examples/nas/oneshot/darts/model.py
# --------------------------------------------------------------------------
class Node(nn.Module):
    def __init__(self, node_id, num_prev_nodes, channels, num_downsample_connect):
        super().__init__()
        self.ops = nn.ModuleList()
        choice_keys = []
        for i in range(num_prev_nodes):
            stride = 2 if i < num_downsample_connect else 1
            choice_keys.append("{}_p{}".format(node_id, i))
            self.ops.append(
                LayerChoice(OrderedDict([
                    ("maxpool", PoolBN('max', channels, 3, stride, 1, affine=False)),
                    ("avgpool", PoolBN('avg', channels, 3, stride, 1, affine=False)),
                    ("skipconnect", nn.Identity() if stride == 1 else FactorizedReduce(channels, channels, affine=False)),
                    ("sepconv3x3", SepConv(channels, channels, 3, stride, 1, affine=False)),
                    ("sepconv5x5", SepConv(channels, channels, 5, stride, 2, affine=False)),
                    ("dilconv3x3", DilConv(channels, channels, 3, stride, 2, 2, affine=False)),
                    ("dilconv5x5", DilConv(channels, channels, 5, stride, 4, 2, affine=False))
                ]), label=choice_keys[-1]))
        self.drop_path = DropPath()
        self.input_switch = InputChoice(n_candidates=len(choice_keys), n_chosen=2, label="{}_switch".format(node_id))

    def forward(self, prev_nodes):
        assert len(self.ops) == len(prev_nodes)
        out = [op(node) for op, node in zip(self.ops, prev_nodes)]
        out = [self.drop_path(o) if o is not None else None for o in out]
        return self.input_switch(out)


class Cell(nn.Module):

    def __init__(self, n_nodes, channels_pp, channels_p, channels, reduction_p, reduction):
        super().__init__()
        self.reduction = reduction
        self.n_nodes = n_nodes

        # If previous cell is reduction cell, current input size does not match with
        # output size of cell[k-2]. So the output[k-2] should be reduced by preprocessing.
        if reduction_p:
            self.preproc0 = FactorizedReduce(channels_pp, channels, affine=False)
        else:
            self.preproc0 = StdConv(channels_pp, channels, 1, 1, 0, affine=False)
        self.preproc1 = StdConv(channels_p, channels, 1, 1, 0, affine=False)

        # generate dag
        self.mutable_ops = nn.ModuleList()
        for depth in range(2, self.n_nodes + 2):
            self.mutable_ops.append(Node("{}_n{}".format("reduce" if reduction else "normal", depth),
                                         depth, channels, 2 if reduction else 0))

    def forward(self, s0, s1):
        # s0, s1 are the outputs of previous previous cell and previous cell, respectively.
        tensors = [self.preproc0(s0), self.preproc1(s1)]
        for node in self.mutable_ops:
            cur_tensor = node(tensors)
            tensors.append(cur_tensor)

        output = torch.cat(tensors[2:], dim=1)
        return output


class CNN(nn.Module):

    def __init__(self, input_size, in_channels, channels, n_classes, n_layers, n_nodes=4,
                 stem_multiplier=3):
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.n_classes = n_classes
        self.n_layers = n_layers

        c_cur = stem_multiplier * self.channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_cur, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_cur)
        )

        # for the first cell, stem is used for both s0 and s1
        # [!] channels_pp and channels_p is output channel size, but c_cur is input channel size.
        channels_pp, channels_p, c_cur = c_cur, c_cur, channels

        self.cells = nn.ModuleList()
        reduction_p, reduction = False, False
        for i in range(n_layers):
            reduction_p, reduction = reduction, False
            # Reduce featuremap size and double channels in 1/3 and 2/3 layer.
            if i in [n_layers // 3, 2 * n_layers // 3]:
                c_cur *= 2
                reduction = True

            cell = Cell(n_nodes, channels_pp, channels_p, c_cur, reduction_p, reduction)
            self.cells.append(cell)
            c_cur_out = c_cur * n_nodes
            channels_pp, channels_p = channels_p, c_cur_out

        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels_p, n_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)

        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)

        out = self.gap(s1)
        out = out.view(out.size(0), -1)  # flatten
        logits = self.linear(out)
        return logits

    def drop_path_prob(self, p):
        for module in self.modules():
            if isinstance(module, DropPath):
                module.p = p


# --------------------------------------------------------------------------
# test entry points
# --------------------------------------------------------------------------
CHANNELS = 4
N_LAYERS = 2
N_NODES = 2
NUM_CLASSES = 10
INPUT_HW = 16

# one DartsLayerChoice per (node, predecessor); node k (k = 2..n_nodes+1) has k predecessors.
NUM_MIXED_OPS = N_LAYERS * sum(range(2, N_NODES + 2))  # 2 * (2 + 3) = 10
NUM_INPUT_CHOICES = N_LAYERS * N_NODES                 # 4 (not mixed ops)


def build(channels=CHANNELS, n_layers=N_LAYERS, n_nodes=N_NODES, num_classes=NUM_CLASSES,
          none_slot=False):
    """NNI-DARTS-style CNN after LayerChoice/InputChoice replacement (``none_slot``: the
    layer choices use the stack-plus-zero-slot form, :class:`DartsLayerChoiceNoneSlot`)."""
    model = CNN(INPUT_HW, 3, channels, num_classes, n_layers, n_nodes=n_nodes)
    # what nni's DartsTrainer.__init__ does:
    nas_modules = []
    replace_layer_choice(model, DartsLayerChoiceNoneSlot if none_slot else DartsLayerChoice,
                         nas_modules)
    replace_input_choice(model, DartsInputChoice, nas_modules)
    model.nas_modules = nas_modules  # plain list attribute, not registered
    return model


def build_none_slot(**kwargs):
    return build(none_slot=True, **kwargs)


def example_inputs(batch_size=2):
    return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


def get_alphas(model):
    """Every choice's ``alpha`` (LayerChoices first, then InputChoices)."""
    return [m.alpha for _, m in model.nas_modules]


def get_layer_choice_alphas(model):
    return [m.alpha for _, m in model.nas_modules
            if isinstance(m, (DartsLayerChoice, DartsLayerChoiceNoneSlot))]
