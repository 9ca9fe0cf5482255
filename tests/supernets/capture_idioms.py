"""One tiny supernet per capture idiom: constructs public NAS code uses inside ``forward``
that a symbolic tracer has to record rather than follow.

Plain PyTorch, in the styles of the codebases named per class (written in our own words).
Each model is a DARTS-like mixed op over a few candidates on a ``C x HW x HW`` input, with
``arch_parameters()`` returning its architecture weights.

``CAPTURE = {name: Capture(factory, example_inputs, random, segfaulted)}``:

* ``random`` -- the forward draws random numbers (Gumbel noise, Dirichlet samples, drop-path
  masks): two calls differ, the same RNG state reproduces the output;
* ``segfaulted`` -- compiling it killed the interpreter before issue 11 (run it in a
  subprocess in tests);
* ``num_mixed_ops`` -- mixed ops the compiler can see (a checkpointed function is one opaque
  call, so its mixed op is hidden; ArchGrad weights a single candidate).

Idioms:

* ``ste_gate``: a custom ``torch.autograd.Function`` (straight-through binary gate, as in
  binarized-path NAS code) called in forward;
* ``arch_grad_function``: a ProxylessNAS-style ``ArchGradientFunction`` whose backward
  computes a custom gradient of the binary gates;
* ``dirichlet``: DrNAS-style ``Dirichlet(F.elu(alpha) + 1).rsample()`` (uses an autograd
  Function internally; argument validation reads tensor values);
* ``checkpoint_reentrant`` / ``checkpoint_nonreentrant``: each mixed op run under
  ``torch.utils.checkpoint.checkpoint``;
* ``jit_script``: a ``torch.jit.script`` function applied to the weights;
* ``zero_factory``: a Zero op ``torch.zeros(n, c, h // s, w // s, device=x.device)`` with
  sizes from ``x.size()``;
* ``zero_legacy``: the legacy ``torch.FloatTensor(n, c, h, w).fill_(0)`` Zero op;
* ``new_factories``: ``x.new_zeros``, ``x.new_empty(...).fill_``, ``x.new(...).zero_()``;
* ``drop_path``: ``torch.zeros((x.size(0), 1, 1, 1)).bernoulli_(keep)`` in training;
* ``drop_path_variable``: DARTS's own ``Variable(torch.FloatTensor(n, 1, 1, 1).bernoulli_(k))``
  then ``x.mul_(mask)``;
* ``drop_path_legacy``: ``torch.FloatTensor(n, 1, 1, 1).bernoulli_(1 - p)`` without Variable;
* ``gumbel_softmax``: SNAS-style ``F.gumbel_softmax(alpha, tau, hard=True)`` in forward;
* ``gumbel_exponential``: GDAS-style ``-torch.empty_like(a).exponential_().log()``;
* ``module_in_forward``: ``nn.Softmax(dim=-1)(alpha)``, a module built in forward;
* ``attr_in_forward``: ``self.weights_normal = F.softmax(alpha) - bias`` assigned in forward;
* ``bookkeeping``: ``alphas_cpu = softmax(alpha).detach().cpu()``, ``.tolist()``,
  ``.numpy()`` and appends to a Python list, none of which the output depends on.
"""
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch.autograd import Variable

C = 4
HW = 6


@dataclass(frozen=True)
class Capture:
    factory: Callable[[], nn.Module]
    example_inputs: Callable[..., tuple]
    random: bool = False
    segfaulted: bool = False
    num_mixed_ops: int = 1


def _x_only(batch_size=2):
    return (torch.randn(batch_size, C, HW, HW),)


def _candidates():
    return nn.ModuleList([
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, padding=1, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 1, bias=False),
                      nn.BatchNorm2d(C, affine=False)),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Identity(),
    ])


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self._ops = _candidates()
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self._ops)))

    def arch_parameters(self):
        return [self.alpha]

    def mixed(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


# -- autograd Functions, checkpoint, scripted functions (the former segfaults) -----------------
class BinarizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs):
        return (probs >= probs.max()).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class SteGate(_Base):
    def forward(self, x):
        probs = F.softmax(self.alpha, dim=-1)
        gates = BinarizeSTE.apply(probs)
        return self.mixed(x, gates * probs)


class ArchGradientFunction(torch.autograd.Function):
    """ProxylessNAS: forward runs the chosen path, backward hands a custom gradient to the
    binary gates."""

    @staticmethod
    def forward(ctx, x, binary_gates, run_func, backward_func):
        ctx.run_func = run_func
        ctx.backward_func = backward_func
        detached_x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            output = run_func(detached_x)
        ctx.save_for_backward(detached_x, output)
        return output.data

    @staticmethod
    def backward(ctx, grad_output):
        detached_x, output = ctx.saved_tensors
        grad_x = torch.autograd.grad(output, detached_x, grad_output, only_inputs=True)
        binary_grads = ctx.backward_func(detached_x.data, output.data, grad_output.data)
        return grad_x[0], binary_grads, None, None


class ArchGrad(_Base):
    def forward(self, x):
        probs = F.softmax(self.alpha, dim=-1)
        gates = torch.zeros_like(probs)
        gates[1] = 1.0
        ops = self._ops

        def run(_x):
            return ops[1](_x)

        def grads(_x, _out, g):
            return torch.stack([(g * op(_x)).sum() for op in ops])

        out = ArchGradientFunction.apply(x, gates, run, grads)
        return out + probs[0] * self._ops[2](x)


class Dirichlet(_Base):
    def forward(self, x):
        weights = torch.distributions.Dirichlet(F.elu(self.alpha) + 1).rsample()
        return self.mixed(x, weights)


class CheckpointReentrant(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        return cp.checkpoint(self.mixed, x, weights, use_reentrant=True)


class CheckpointNonReentrant(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        return cp.checkpoint(self.mixed, x, weights, use_reentrant=False)


with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.script; NAS code still uses it
    warnings.simplefilter("ignore", DeprecationWarning)

    @torch.jit.script
    def sharpen(alpha: torch.Tensor, tau: float) -> torch.Tensor:
        return torch.softmax(alpha / tau, dim=-1)


class JitScript(_Base):
    def forward(self, x):
        return self.mixed(x, sharpen(self.alpha, 0.5))


# -- factories -----------------------------------------------------------------------------
class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        n, c, h, w = x.size()
        h //= self.stride
        w //= self.stride
        return torch.zeros(n, c, h, w, device=x.device, dtype=x.dtype)


class ZeroLegacy(nn.Module):
    def forward(self, x):
        n, c, h, w = x.size()
        return torch.FloatTensor(n, c, h, w).fill_(0)


class _WithZero(_Base):
    zero_cls = Zero

    def __init__(self):
        super().__init__()
        self._ops.append(Zero(1) if self.zero_cls is Zero else ZeroLegacy())
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self._ops)))

    def forward(self, x):
        return self.mixed(x, F.softmax(self.alpha, dim=-1))


class ZeroFactory(_WithZero):
    zero_cls = Zero


class ZeroFactoryLegacy(_WithZero):
    zero_cls = ZeroLegacy


class NewFactories(_Base):
    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        bias = x.new_zeros(x.size(0), 1, 1, 1) + x.new_empty((1, x.size(1), 1, 1)).fill_(1.)
        pad = x.new(x.size(0), C, HW, HW).zero_()
        return self.mixed(x, weights) + bias + pad


class DropPath(_Base):
    drop_prob = 0.2

    def forward(self, x):
        out = self.mixed(x, F.softmax(self.alpha, dim=-1))
        if self.training and self.drop_prob > 0.:
            keep = 1. - self.drop_prob
            mask = torch.zeros((x.size(0), 1, 1, 1)).bernoulli_(keep)
            out = out.div(keep) * mask
        return out


def darts_drop_path(x, drop_prob):
    """drop_path as the original DARTS repository writes it (utils.py, CPU form)."""
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = Variable(torch.FloatTensor(x.size(0), 1, 1, 1).bernoulli_(keep_prob))
        x = x.div(keep_prob)
        x.mul_(mask)
    return x


class DropPathVariable(_Base):
    """Former segfault: ``Variable(proxy)`` is a C++ constructor reading it as a tensor."""
    drop_prob = 0.3

    def forward(self, x):
        out = self.mixed(x, F.softmax(self.alpha, dim=-1))
        if self.training:
            out = darts_drop_path(out, self.drop_prob)
        return out


class DropPathLegacy(_Base):
    """The legacy factory's node ran a wrapper giving a real CPU tensor as its meta value,
    so the mask's bernoulli_ drew at trace time and the compile was refused."""
    drop_prob = 0.3

    def forward(self, x):
        out = self.mixed(x, F.softmax(self.alpha, dim=-1))
        if self.drop_prob > 0.:
            out = out * torch.FloatTensor(x.size(0), 1, 1, 1).bernoulli_(1 - self.drop_prob)
        return out


# -- sampling in forward ---------------------------------------------------------------------
class GumbelSoftmax(_Base):
    tau = 1.0

    def forward(self, x):
        weights = F.gumbel_softmax(self.alpha, self.tau, hard=True)
        return self.mixed(x, weights)


class GumbelExponential(_Base):
    tau = 1.0

    def forward(self, x):
        gumbels = -torch.empty_like(self.alpha).exponential_().log()
        probs = F.softmax((self.alpha.log_softmax(dim=-1) + gumbels) / self.tau, dim=-1)
        index = probs.max(-1, keepdim=True)[1]
        one_h = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        return self.mixed(x, one_h - probs.detach() + probs)


# -- made in forward ---------------------------------------------------------------------------
class ModuleInForward(_Base):
    def forward(self, x):
        weights = nn.Softmax(dim=-1)(self.alpha)
        return self.mixed(x, weights)


class AttrInForward(_Base):
    def __init__(self):
        super().__init__()
        self.bias = 0.1

    def forward(self, x):
        self.weights_normal = F.softmax(self.alpha, dim=-1) - self.bias
        return self.mixed(x, self.weights_normal)


class Bookkeeping(_Base):
    def __init__(self):
        super().__init__()
        self.history = []

    def forward(self, x):
        weights = F.softmax(self.alpha, dim=-1)
        alphas_cpu = F.softmax(self.alpha, dim=-1).detach().cpu()
        self.history.append(weights.detach().tolist())
        self.last = alphas_cpu.numpy()
        return self.mixed(x, weights)


CAPTURE = {
    'ste_gate': Capture(SteGate, _x_only, segfaulted=True),
    'arch_grad_function': Capture(ArchGrad, _x_only, num_mixed_ops=0),
    'dirichlet': Capture(Dirichlet, _x_only, random=True),
    'checkpoint_reentrant': Capture(CheckpointReentrant, _x_only, segfaulted=True,
                                    num_mixed_ops=0),
    'checkpoint_nonreentrant': Capture(CheckpointNonReentrant, _x_only, num_mixed_ops=0),
    'jit_script': Capture(JitScript, _x_only, segfaulted=True),
    'zero_factory': Capture(ZeroFactory, _x_only),
    'zero_legacy': Capture(ZeroFactoryLegacy, _x_only),
    'new_factories': Capture(NewFactories, _x_only),
    'drop_path': Capture(DropPath, _x_only, random=True),
    'drop_path_variable': Capture(DropPathVariable, _x_only, random=True, segfaulted=True),
    'drop_path_legacy': Capture(DropPathLegacy, _x_only, random=True),
    'gumbel_softmax': Capture(GumbelSoftmax, _x_only, random=True),
    'gumbel_exponential': Capture(GumbelExponential, _x_only, random=True),
    'module_in_forward': Capture(ModuleInForward, _x_only),
    'attr_in_forward': Capture(AttrInForward, _x_only),
    'bookkeeping': Capture(Bookkeeping, _x_only),
}


# -- partial compile: an untraceable root forward around traceable cells ------------------------
class MixedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self._ops = _candidates()

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    """Two chained mixed ops, each reading its own row of the sampled weights."""

    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleList([MixedOp(), MixedOp()])

    def forward(self, x, weights):
        for edge, w in zip(self.edges, weights):
            x = edge(x, w)
        return x


class GumbelLoopRoot(nn.Module):
    """GDAS-like root: Gumbel noise redrawn while any value is inf (a Python loop on tensor
    values, so the root forward cannot be traced); the cells take the sampled weights as an
    argument and are plain DARTS cells."""

    def __init__(self, cells=2, tau=1.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList([Cell() for _ in range(cells)])
        self.arch_parameters_ = nn.Parameter(1e-3 * torch.randn(2, 4))
        self.classifier = nn.Linear(C, 3)
        self.tau = tau

    def arch_parameters(self):
        return [self.arch_parameters_]

    def forward(self, x):
        while True:
            gumbels = -torch.empty_like(self.arch_parameters_).exponential_().log()
            weights = F.softmax((self.arch_parameters_ + gumbels) / self.tau, dim=-1)
            if torch.isinf(gumbels).any() or torch.isnan(weights).any():
                continue
            break
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x, weights)
        return self.classifier(x.mean((2, 3)))


PARTIAL_CULPRIT = 'if torch.isinf(gumbels).any() or torch.isnan(weights).any():'
