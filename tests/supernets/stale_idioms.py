"""One tiny supernet per idiom that used to compile and then go stale (issue 10).

Each class is written the way public differentiable-NAS code writes it (DARTS, GDAS, SNAS,
SPOS/FairNAS samplers, pruning variants of DARTS), and each ``STALE[name]`` entry says how the
search loop changes the model's state between calls (``changes``: callables ``change(model)``
applied one after another).  A compiled supernet must follow every change: same outputs and
gradients as the eager model after each one.

* ``temperature``: GDAS/SNAS ``softmax(alpha / self.tau)`` with ``set_tau`` annealing a
  Python float attribute;
* ``aux_head``: DARTS's ``NetworkCIFAR``: ``if self.training:`` adds the auxiliary logits in a
  non-leaf forward;
* ``global_scheduler``: a module-level scheduler object whose ``rate`` decays, multiplying an
  auxiliary skip branch (``out + aux(x) * scheduler.rate``);
* ``drop_path``: DARTS's ``model.drop_path_prob`` set every epoch, read by each cell as
  ``if self.training and drop_prob > 0.: h = drop_path(h, drop_prob)``;
* ``model_arch``: SPOS-style single-path sampler: the search loop sets ``model.arch`` (a list
  of ints) before each forward;
* ``index_arg`` / ``tuple_arg`` / ``mode_arg``: the sampled path passed as an int, a tuple of
  ints, or a string mode (``forward(x, 'weight')``);
* ``int_batch``: ``n = int(x.size(0))`` then a per-sample norm over ``x.reshape(n, -1)``;
* ``shape_branch``: ``if x.shape[-1] > 16: x = pool(x)``;
* ``pruning_mask``: ``weights = softmax(alpha) * self.mask`` then ``if w != 0:`` (and
  ``abs(w) > 1e-10``) skipping pruned candidates;
* ``bool_flags``: a bool tensor buffer flags candidates, ``if not self.flags[i]: continue``;
* ``keyword_only``: ``forward(self, x, *, tau=1.0)`` called by keyword.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

C = 4
HW = 8


def _ops(C: int) -> nn.ModuleList:
    return nn.ModuleList([
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Identity(),
    ])


class MixedOp(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self._ops = _ops(C)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


# -- temperature (GDAS / SNAS) --------------------------------------------------------
class TemperatureNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cells = nn.ModuleList([MixedOp(C), MixedOp(C)])
        self.arch_parameters_ = nn.Parameter(1e-1 * torch.randn(2, 4))
        self.tau = 10.0

    def set_tau(self, tau: float) -> None:
        self.tau = tau

    def get_tau(self) -> float:
        return self.tau

    def forward(self, x):
        x = self.stem(x)
        weights = F.softmax(self.arch_parameters_ / self.tau, dim=-1)
        for cell, w in zip(self.cells, weights):
            x = cell(x, w)
        return x


# -- auxiliary head in training mode (DARTS NetworkCIFAR) ------------------------------
class AuxiliaryHead(nn.Module):
    def __init__(self, C: int, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(C, 8, 1),
                                      nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Linear(8 * (HW // 2) ** 2, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class AuxHeadNet(nn.Module):
    def __init__(self, C: int = C, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cell = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))
        self._auxiliary = True
        self.auxiliary_head = AuxiliaryHead(C, num_classes)
        self.classifier = nn.Linear(C, num_classes)

    def forward(self, x):
        logits_aux = None
        s = self.cell(self.stem(x), F.softmax(self.alphas, dim=-1))
        if self._auxiliary and self.training:
            logits_aux = self.auxiliary_head(s)
        logits = self.classifier(F.adaptive_avg_pool2d(s, 1).view(s.size(0), -1))
        if logits_aux is not None:
            return logits + 0.4 * logits_aux
        return logits


# -- a module-level scheduler object (decay of an auxiliary skip branch) ---------------
class _Scheduler:
    def __init__(self):
        self.rate = 1.0

    def step(self, epoch: int, total: int = 10) -> None:
        self.rate = max(0.0, 1.0 - epoch / total)


scheduler = _Scheduler()


class GlobalSchedulerNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cell = MixedOp(C)
        self.aux = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x):
        x = self.stem(x)
        out = self.cell(x, F.softmax(self.alphas, dim=-1))
        return out + self.aux(x) * scheduler.rate


# -- drop-path probability (DARTS NetworkCIFAR: set by the training loop every epoch) --------
def drop_path(x, drop_prob: float):
    """DARTS's drop path, made deterministic (the expected value) so tests can compare."""
    return x * (1.0 - drop_prob)


class DropPathCell(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.mixed = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x, drop_prob):
        h = self.mixed(x, F.softmax(self.alphas, dim=-1))
        if self.training and drop_prob > 0.:
            h = drop_path(h, drop_prob)
        return h + x


class DropPathNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cells = nn.ModuleList([DropPathCell(C), DropPathCell(C)])
        self.drop_path_prob = 0.0

    def forward(self, x):
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x, self.drop_path_prob)
        return x


# -- single-path samplers ----------------------------------------------------------------
class ChoiceBlock(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.choices = _ops(C)

    def forward(self, x, index):
        return self.choices[index](x)


class ModelArchNet(nn.Module):
    """SPOS: the trainer samples ``model.arch`` before each forward."""

    def __init__(self, C: int = C, layers: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList([ChoiceBlock(C) for _ in range(layers)])
        self.arch = [0] * layers

    def forward(self, x):
        x = self.stem(x)
        for block, index in zip(self.blocks, self.arch):
            x = block(x, index)
        return x


class IndexArgNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.block = ChoiceBlock(C)

    def forward(self, x, index):
        return self.block(self.stem(x), index)


class TupleArgNet(nn.Module):
    def __init__(self, C: int = C, layers: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList([ChoiceBlock(C) for _ in range(layers)])

    def forward(self, x, arch):
        x = self.stem(x)
        for block, index in zip(self.blocks, arch):
            x = block(x, index)
        return x


class ModeArgNet(nn.Module):
    """DARTS-style ``forward(x, mode)``: 'weight' mixes, 'single' takes the argmax path."""

    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cell = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x, mode):
        x = self.stem(x)
        weights = F.softmax(self.alphas, dim=-1)
        if mode == "weight":
            return self.cell(x, weights)
        if mode == "double":
            return 2 * self.cell(x, weights)
        return self.cell._ops[1](x) * weights[1]


# -- shapes --------------------------------------------------------------------------------
class IntBatchNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cell = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x):
        n = int(x.size(0))
        s = self.cell(self.stem(x), F.softmax(self.alphas, dim=-1))
        return s / s.reshape(n, -1).norm(dim=1).view(n, 1, 1, 1)


class ShapeBranchNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.cell = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 16:
            x = self.pool(x)
        return self.cell(x, F.softmax(self.alphas, dim=-1))


# -- pruning masks and flags -----------------------------------------------------------------
class MaskedMixedOp(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self._ops = _ops(C)

    def forward(self, x, weights):
        out = 0
        for w, op in zip(weights, self._ops):
            if w != 0:
                out = out + w * op(x)
        return out


class PruningMaskNet(nn.Module):
    """Progressive pruning (P-DARTS / DARTS-PT style): ``softmax(alpha) * mask``."""

    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cells = nn.ModuleList([MaskedMixedOp(C), MaskedMixedOp(C)])
        self.alphas = nn.Parameter(1e-1 * torch.randn(2, 4))
        self.register_buffer("mask", torch.ones(2, 4))

    def prune(self, cell: int, op: int) -> None:
        self.mask[cell, op] = 0

    def forward(self, x):
        x = self.stem(x)
        weights = F.softmax(self.alphas, dim=-1) * self.mask
        for i, cell in enumerate(self.cells):
            if abs(weights[i].sum()) > 1e-10:
                x = cell(x, weights[i])
        return x


class FlagsNet(nn.Module):
    """Candidates flagged by a plain bool tensor attribute (``if not self.flags[i]``)."""

    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self._ops = _ops(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))
        self.flags = torch.ones(4, dtype=torch.bool)

    def forward(self, x):
        x = self.stem(x)
        weights = F.softmax(self.alphas, dim=-1)
        out = 0
        for i, op in enumerate(self._ops):
            if not self.flags[i]:
                continue
            out = out + weights[i] * op(x)
        return out


# -- signatures --------------------------------------------------------------------------------
class KeywordOnlyNet(nn.Module):
    def __init__(self, C: int = C):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cell = MixedOp(C)
        self.alphas = nn.Parameter(1e-1 * torch.randn(4))

    def forward(self, x, *, tau: float = 1.0):
        return self.cell(self.stem(x), F.softmax(self.alphas / tau, dim=-1))


class LossMethodNet(TemperatureNet):
    """DARTS's ``Network._loss``: a model method that calls ``self(x)``."""

    def loss(self, x, target):
        return F.cross_entropy(self(x).mean((2, 3)), target)


# ----------------------------------------------------------------------------------------------
def _x(batch: int = 2, hw: int = HW) -> torch.Tensor:
    return torch.randn(batch, 3, hw, hw)


@dataclass(frozen=True)
class Call:
    """How the search loop calls the model now: positional args and keywords."""

    args: Callable[[], tuple]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StaleIdiom:
    factory: Callable[[], nn.Module]
    example: Call
    """The compile-time call (example_inputs and example_kwargs)."""
    steps: Sequence[tuple[Callable[[nn.Module], None], Call]]
    """(state change, call) pairs the search loop makes after compiling, in order."""
    description: str = ""


def _same() -> Call:
    return Call(lambda: (_x(),))


def _set(attr: str, value: Any) -> Callable[[nn.Module], None]:
    def change(model: nn.Module) -> None:
        setattr(model, attr, value)
    change.__name__ = f"{attr}={value!r}"
    return change


def _noop(model: nn.Module) -> None:
    pass


def _train(mode: bool) -> Callable[[nn.Module], None]:
    def change(model: nn.Module) -> None:
        model.train(mode)
    change.__name__ = f"train({mode})"
    return change


def _sched(epoch: int) -> Callable[[nn.Module], None]:
    def change(model: nn.Module) -> None:
        scheduler.step(epoch)
    change.__name__ = f"scheduler.step({epoch})"
    return change


def _prune(cell: int, op: int) -> Callable[[nn.Module], None]:
    def change(model: nn.Module) -> None:
        model.prune(cell, op)
    change.__name__ = f"prune({cell}, {op})"
    return change


def _unflag(i: int) -> Callable[[nn.Module], None]:
    def change(model: nn.Module) -> None:
        model.flags = model.flags.clone()
        model.flags[i] = False
    change.__name__ = f"flags[{i}]=False"
    return change


STALE: dict[str, StaleIdiom] = {
    "temperature": StaleIdiom(
        TemperatureNet, _same(),
        [(lambda m: m.set_tau(t), _same()) for t in (5.0, 1.0, 0.5, 0.1)],
        "softmax(alpha / self.tau), tau annealed by set_tau"),
    "aux_head": StaleIdiom(
        AuxHeadNet, _same(),
        [(_train(False), _same()), (_train(True), _same()), (_train(False), _same())],
        "if self.training: logits_aux = self.auxiliary_head(s)"),
    "global_scheduler": StaleIdiom(
        GlobalSchedulerNet, _same(),
        [(_sched(e), _same()) for e in (2, 5, 7)] + [(_train(False), _same())],
        "out + aux(x) * scheduler.rate, a module-level scheduler object"),
    "drop_path": StaleIdiom(
        DropPathNet, _same(),
        [(_set("drop_path_prob", p), _same()) for p in (0.1, 0.2, 0.3, 0.0, 0.25)]
        + [(_train(False), _same())],
        "model.drop_path_prob = p * epoch / epochs; if self.training and drop_prob > 0."),
    "model_arch": StaleIdiom(
        ModelArchNet, _same(),
        [(_set("arch", a), _same()) for a in ([1, 2], [3, 0], [1, 2], [2, 2])],
        "the search loop sets model.arch before each forward"),
    "index_arg": StaleIdiom(
        IndexArgNet, Call(lambda: (_x(), 0)),
        [(_noop, Call(lambda i=i: (_x(), i))) for i in (2, 1, 0)]
        + [(_noop, Call(lambda: (_x(),), {"index": 3}))],
        "forward(x, index) with an int index, also by keyword"),
    "tuple_arg": StaleIdiom(
        TupleArgNet, Call(lambda: (_x(), (0, 1))),
        [(_noop, Call(lambda a=a: (_x(), a))) for a in ((2, 3), (1, 1))]
        + [(_noop, Call(lambda: (_x(),), {"arch": (3, 0)}))],
        "forward(x, arch) with a tuple of ints"),
    "mode_arg": StaleIdiom(
        ModeArgNet, Call(lambda: (_x(), "weight")),
        [(_noop, Call(lambda m=m: (_x(), m))) for m in ("single", "double", "weight")],
        "forward(x, 'weight') with a string mode"),
    "int_batch": StaleIdiom(
        IntBatchNet, _same(),
        [(_noop, Call(lambda b=b: (_x(b),))) for b in (4, 3, 2)],
        "n = int(x.size(0)); s.reshape(n, -1).norm(dim=1)"),
    "shape_branch": StaleIdiom(
        ShapeBranchNet, Call(lambda: (_x(2, 16),)),
        [(_noop, Call(lambda hw=hw: (_x(2, hw),))) for hw in (32, 8, 16)],
        "if x.shape[-1] > 16: x = pool(x)"),
    "pruning_mask": StaleIdiom(
        PruningMaskNet, _same(),
        [(_prune(0, 1), _same()), (_prune(1, 3), _same()), (_noop, _same()),
         (_prune(0, 0), _same())],
        "softmax(alpha) * self.mask, then if w != 0 / abs(w) > 1e-10"),
    "bool_flags": StaleIdiom(
        FlagsNet, _same(),
        [(_unflag(1), _same()), (_noop, _same()), (_unflag(3), _same())],
        "if not self.flags[i]: continue"),
    "keyword_only": StaleIdiom(
        KeywordOnlyNet, Call(lambda: (_x(),), {"tau": 1.0}),
        [(_noop, Call(lambda t=t: (_x(),), {"tau": t})) for t in (0.5, 0.25)],
        "forward(self, x, *, tau=1.0) called by keyword"),
}


def reset_globals() -> None:
    """Module-level state back to its start (the scheduler), before each test."""
    scheduler.rate = 1.0
