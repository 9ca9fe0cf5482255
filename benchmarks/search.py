"""``python -m benchmarks.search``: a first-order DARTS search on real data, eager against compiled.

Every other benchmark measures what a search step costs; this one measures what the search
*finds*.  It runs the same first-order DARTS search (Liu et al., ICLR 2019, the
``--unrolled False`` variant of quark0/darts ``train_search.py``) once per configuration, from
the same initial weights and with the same data order:

* data: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes, shipped inside
  the package), dequantized (grey level ``k`` -> ``(k + u) / 17``, ``u`` uniform and fixed;
  :func:`load_digits_splits` says why), upsampled to ``--resolution`` (bilinear),
  standardized with the training split's mean and std, repeated to 3 channels; split once
  into train / validation / test with a fixed seed (``Settings.data_seed``), the same for
  every run seed;
* search: the built-in DARTS space (``topo_compiler.spaces``, C=8, 3 cells: normal,
  reduction, reduction; 4 intermediate nodes, 14 edges of 8 candidates per cell type); each
  iteration takes an architecture step on a validation batch (Adam, betas (0.5, 0.999),
  weight decay 1e-3, first order: the gradient of the validation loss at the current
  weights) and then a weight step on a training batch (SGD momentum 0.9, cosine lr from
  0.025 to 0.001, weight decay 3e-4, gradient norm clipped at 5) -- DARTS's settings, except
  the architecture lr.  3 cells rather than 5 so that the 3-seed run fits 20 minutes of 2
  cores with 45 architecture steps per search;
* architecture lr 0.13, not DARTS's 3e-4.  Adam moves each alpha by about ``lr`` per step
  while its gradient keeps its sign, so ``lr x steps`` bounds how far the alphas travel.
  DARTS takes 50 epochs x ~390 steps = ~19,500 architecture steps, ``lr x steps`` ~ 5.9;
  this run takes 3 x 15 = 45 steps, and 0.13 gives the same 5.9.  At 3e-4 (24 steps) the
  alphas moved by 5e-3 and the mean entropy stayed at log 8 to five digits: float32
  rounding, not data, picked the genotype;
* derive: DARTS's genotype rule (``model.genotype()``: per node the two strongest incoming
  edges, each with its strongest non-``none`` op);
* retrain: the discrete network of that genotype (DARTS's ``NetworkCIFAR`` without
  auxiliary head or drop path, built here from the space's own ops), from scratch, with one
  short schedule for every configuration (train + validation splits, the weight optimizer
  above), then its accuracy on the test split.

Configurations: ``eager`` (the supernet itself), ``eager-rev`` (eager with every batch in
reverse sample order: the same search in exact arithmetic, other float32 rounding -- the
noise floor), ``exact`` (``exact=True``), the default pipeline without kernel normalization
and with it; ``pms+fms+kn`` (what KN does when nothing is merged) on request.  Within a seed
the configurations run epoch by epoch in turn (the first one rotates), so a change in the
machine's load falls on all of them alike.

Reported per configuration: median epoch time (search steps only) and peak memory of one
search step (forward and backward; CPU: what :func:`benchmarks.measure.step_peak_bytes`
sees), both as ratios to eager; supernet validation accuracy per epoch, mean alpha entropy
(log 8 = 2.079 when uniform) and the largest ``|alpha - alpha_0|`` per epoch; the genotype;
retrained test accuracy (mean and spread over seeds); agreement with eager's genotype, the
largest difference of the alpha trajectory and of the final softmax weights from eager's,
and which of eager's decisions (which inputs a node keeps, which op an edge keeps) it flips,
with eager's margin for each: a configuration that computes eager's function can only flip
decisions whose margin is within the rounding noise that ``eager-rev`` shows.

Examples::

    python -m benchmarks.search                         # the full CPU run (see BENCHMARKS.md)
    python -m benchmarks.search --quick --out /tmp/s    # smoke run, < 1 min
    python -m benchmarks.search --configs eager-rev,exact --seeds 0
    python -m benchmarks.search --seeds 0 --out /tmp/s0 & ...    # one process per seed, then
    python -m benchmarks.search --combine /tmp/s0/search-cpu.json ... --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topo_compiler import compile_supernet, spaces
from topo_compiler.spaces.ops import OPS, FactorizedReduce, ReLUConvBN

from .measure import TrainingStep, _quiet_fd2, step_peak_bytes
from .progress import Progress
from .report import machine_info, source_revision, write_json, write_markdown

__all__ = ["SearchConfig", "Settings", "load_digits_splits", "DiscreteNetwork", "main",
           "parse_args", "configurations"]


# --------------------------------------------------------------------------------------
# Settings and configurations
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and schedule of one run (the same for every configuration)."""

    C: int = 8
    layers: int = 3
    resolution: int = 16
    n_train: int = 480
    n_val: int = 480
    n_test: int = 800
    batch: int = 32
    epochs: int = 3
    retrain_epochs: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = 0.13
    a_betas: tuple[float, float] = (0.5, 0.999)
    a_decay: float = 1e-3
    dtype: str = "float32"  # "float64": the rounding check (exact against eager)
    dequantize: bool = True  # see load_digits_splits

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


QUICK = dict(C=4, layers=3, resolution=8, n_train=64, n_val=64, n_test=64, batch=32,
             epochs=2, retrain_epochs=1, seeds=(0,))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """One configuration: the eager supernet (``eager=True``) or ``compile_supernet``'s
    ``passes`` (``None``: the default pipeline) and ``exact``.  ``reverse_batch`` feeds every
    batch in reverse sample order: the same search (a batch's mean loss and BatchNorm's
    statistics do not depend on the order), other float32 rounding -- the noise floor that
    exact mode's differences to eager are measured against."""

    name: str
    passes: tuple[str, ...] | None = None
    exact: bool = False
    eager: bool = False
    reverse_batch: bool = False

    def describe(self) -> str:
        if self.eager:
            return ("the eager supernet, every batch in reverse sample order (float32 "
                    "rounding noise floor)" if self.reverse_batch else "the eager supernet")
        passes = "default pipeline" if self.passes is None else f"passes={self.passes}"
        return f"compile_supernet({passes}{', exact=True' if self.exact else ''})"

    def build(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        if self.eager:
            return model
        return compile_supernet(model, example, passes=self.passes, exact=self.exact)


#: configurations measured only on request (``--configs``): sharing with and without KN,
#: nothing merged -- what KN does to a search where no kernel is merged
OPTIONAL = ("pms+fms+kn", "pms+fms")


def configurations(example_model: nn.Module, example: torch.Tensor) -> list[SearchConfig]:
    """eager, eager with reversed batches (the noise floor), exact, the default pipeline
    without and with ``kn``, and (optional) ``pms+fms+kn`` and ``pms+fms``.

    The default pipeline's pass names are read from a compile report (the public API), so
    "without kn" follows the pipeline whatever passes it gains.
    """
    default = compile_supernet(example_model, example).report.passes
    without_kn = tuple(p for p in default if p != "kn")
    configs = [SearchConfig("eager", eager=True),
               SearchConfig("eager-rev", eager=True, reverse_batch=True),
               SearchConfig("exact", exact=True),
               SearchConfig("+".join(without_kn) or "traced", without_kn),
               SearchConfig("default", None)]
    if "kn" in default:
        configs.append(SearchConfig("pms+fms+kn", tuple(p for p in ("pms", "fms", "kn")
                                                         if p in default)))
        configs.append(SearchConfig("pms+fms", tuple(p for p in ("pms", "fms")
                                                      if p in default)))
    return configs


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_digits_splits(settings: Settings) -> dict[str, Split]:
    """scikit-learn's digits as ``train`` / ``val`` / ``test`` tensors ``(N, 3, r, r)``.

    With ``settings.dequantize`` each pixel's grey level ``k`` (0..16) becomes
    ``(k + u) / 17``, ``u`` uniform in [0, 1) drawn once from the data seed (the usual
    dequantization of discrete pixels).  Why: the raw images are flat over most of their
    area, so convolutions give equal values over whole regions and max pooling and ReLU meet
    ties, which float32 rounding breaks one way in one run and another way in the next; the
    gradient then goes elsewhere and the weights of two runs of the same search part by
    1e-4 within three steps (3e-8 -> 6e-6 -> 2e-4 at the --quick sizes), against 7e-8 after
    four steps with dequantized images.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # why: scikit-learn is an extra, not a core dependency
        raise SystemExit("benchmarks.search needs scikit-learn: pip install "
                         "'topo-compiler[bench]'") from err
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8)
    if settings.dequantize:
        g = torch.Generator().manual_seed(settings.data_seed + 1)
        x = (x + torch.rand(x.shape, generator=g)) / 17.0
    else:
        x = x / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    need = settings.n_train + settings.n_val + settings.n_test
    if need > len(y):
        raise ValueError(f"train + val + test = {need} images, the data set has {len(y)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(settings.data_seed))
    if settings.resolution != 8:
        x = F.interpolate(x, size=(settings.resolution,) * 2, mode="bilinear",
                          align_corners=False)
    bounds = {"test": (0, settings.n_test),
              "val": (settings.n_test, settings.n_test + settings.n_val),
              "train": (settings.n_test + settings.n_val, need)}
    idx = {name: order[a:b] for name, (a, b) in bounds.items()}
    mean, std = x[idx["train"]].mean(), x[idx["train"]].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    x = x.to(settings.torch_dtype)
    return {name: Split(x[i], y[i]) for name, i in idx.items()}


def batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches (the last, smaller one is dropped, as a drop_last
    loader does, so every step has the batch size the merge cost model was told)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


# --------------------------------------------------------------------------------------
# The discrete network of a genotype (DARTS cnn/model.py NetworkCIFAR, no auxiliary head)
# --------------------------------------------------------------------------------------

class DiscreteCell(nn.Module):
    """DARTS's evaluation cell: each node sums two chosen ops of two earlier states."""

    def __init__(self, genotype: spaces.Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(C_prev_prev, C) if reduction_prev
                            else ReLUConvBN(C_prev_prev, C, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        gene = genotype.reduce if reduction else genotype.normal
        self._concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self._steps = len(gene) // 2
        self._indices = [j for _, j in gene]
        self._ops = nn.ModuleList(
            OPS[name](C, 2 if reduction and j < 2 else 1, True) for name, j in gene)
        self.multiplier = len(self._concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            a, b = 2 * i, 2 * i + 1
            states.append(self._ops[a](states[self._indices[a]])
                          + self._ops[b](states[self._indices[b]]))
        return torch.cat([states[i] for i in self._concat], dim=1)


class DiscreteNetwork(nn.Module):
    """The network a genotype describes, laid out like the search network (stem, reduction
    cells at ``layers // 3`` and ``2 * layers // 3``, global pooling, classifier)."""

    def __init__(self, genotype: spaces.Genotype, C: int, layers: int, num_classes: int = 10,
                 stem_multiplier: int = 3):
        super().__init__()
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = DiscreteCell(genotype, C_prev_prev, C_prev, C_curr, reduction,
                                reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------

def accuracy(module: nn.Module, split: Split, batch: int = 256) -> float:
    """Top-1 accuracy in eval mode (BatchNorm's running statistics), as DARTS's ``infer``."""
    module.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch):
            logits = module(split.x[i:i + batch])
            correct += int((logits.argmax(1) == split.y[i:i + batch]).sum())
    module.train()
    return correct / len(split)


def alpha_entropy(alphas: Sequence[torch.Tensor]) -> float:
    """Mean entropy (nats) of the softmax over candidates, over every edge of both cell
    types: ``log(num_ops)`` when uniform, 0 when one-hot."""
    with torch.no_grad():
        rows = torch.cat([a.detach().reshape(-1, a.shape[-1]) for a in alphas])
        p = F.softmax(rows, dim=-1)
        return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def weight_optimizer(params: Sequence[nn.Parameter], settings: Settings, steps: int):
    opt = torch.optim.SGD(params, settings.w_lr, momentum=settings.w_momentum,
                          weight_decay=settings.w_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1),
                                                       eta_min=settings.w_lr_min)
    return opt, sched


def _set_grads(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def alpha_movement(alphas: Sequence[torch.Tensor], initial: torch.Tensor) -> float:
    """The largest ``|alpha - alpha_0|`` over every edge and candidate (logit units)."""
    return float((_flat(alphas) - initial).abs().max())


def _flat(alphas: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([a.detach().flatten() for a in alphas]).clone()


class SearchRun:
    """One configuration's search state for one seed."""

    def __init__(self, config: SearchConfig, settings: Settings, seed: int,
                 data: dict[str, Split], steps_per_epoch: int):
        torch.manual_seed(seed)  # the same initial weights and alphas for every configuration
        self.model = spaces.build("darts", C=settings.C, layers=settings.layers).to(
            settings.torch_dtype)
        example = data["train"].x[:settings.batch]  # the training batch: merge's cost model
        start = time.perf_counter()
        self.module = config.build(self.model, example)
        self.compile_s = time.perf_counter() - start
        self.report = None if config.eager else self.module.report
        self.reverse_batch = config.reverse_batch
        self.alphas = list(self.model.arch_parameters())
        self.weights = list(self.model.weights())
        self.w_opt, self.w_sched = weight_optimizer(self.weights, settings,
                                                    settings.epochs * steps_per_epoch)
        self.a_opt = torch.optim.Adam(self.alphas, settings.a_lr, betas=settings.a_betas,
                                      weight_decay=settings.a_decay)
        self.settings = settings
        self.epoch_s: list[float] = []
        self.epoch_cpu_s: list[float] = []
        self.val_acc: list[float] = []  # per epoch: the architecture steps' own batches
        self.initial = _flat(self.alphas)
        self.entropy: list[float] = [alpha_entropy(self.alphas)]
        self.movement: list[float] = [0.0]
        self.trajectory: list[torch.Tensor] = []  # alphas after every architecture step
        self._correct = 0

    def _batch(self, split: Split, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reverse_batch:
            idx = idx.flip(0)
        return split.x[idx], split.y[idx]

    def arch_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """First-order DARTS: the validation loss's gradient at the current weights."""
        logits = self.module(x)
        loss = F.cross_entropy(logits, y)
        _set_grads(self.alphas, torch.autograd.grad(loss, self.alphas))
        self.a_opt.step()
        self.trajectory.append(_flat(self.alphas))
        self._correct += int((logits.detach().argmax(1) == y).sum())

    def weight_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.module(x), y)
        grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
        _set_grads(self.weights, grads)
        nn.utils.clip_grad_norm_([p for p in self.weights if p.grad is not None],
                                 self.settings.grad_clip)
        self.w_opt.step()
        self.w_sched.step()

    def epoch(self, data: dict[str, Split], train_batches: list[torch.Tensor],
              val_batches: list[torch.Tensor]) -> None:
        """One epoch of alternating steps.  Its validation accuracy is that of the
        architecture steps' forward passes (training-mode BatchNorm, the batch before each
        step): free, where an evaluation pass over the split would cost a third of an epoch."""
        train, val = data["train"], data["val"]
        self._correct = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for t, v in zip(train_batches, val_batches):
            self.arch_step(*self._batch(val, v))
            self.weight_step(*self._batch(train, t))
        self.epoch_s.append(time.perf_counter() - start)
        self.epoch_cpu_s.append(time.process_time() - cpu_start)
        self.val_acc.append(self._correct / sum(len(v) for v in val_batches))
        self.entropy.append(alpha_entropy(self.alphas))
        self.movement.append(alpha_movement(self.alphas, self.initial))

    def peak_bytes(self, data: dict[str, Split]) -> int | None:
        """Peak memory of one search step (forward, backward to weights and alphas), the
        model's state restored afterwards so the search is not disturbed."""
        state = copy.deepcopy(self.model.state_dict())
        x, y = data["train"].x[:self.settings.batch], data["train"].y[:self.settings.batch]
        step = TrainingStep(self.module, self.model, x, y)
        step()  # warm-up: first-call allocations
        with _quiet_fd2():  # why: the profiler's allocator warnings are not results
            peak = step_peak_bytes(step, torch.device("cpu"))
        self.model.load_state_dict(state)
        self.model.zero_grad(set_to_none=True)
        return peak


# --------------------------------------------------------------------------------------
# Decisions of the genotype rule and their margins
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decision:
    """One choice DARTS's genotype rule makes, with its margin in softmax weights.

    ``kind="edges"``: which two inputs node ``node`` keeps (nodes with three or more inputs);
    the margin is the weaker kept edge's strength minus the strongest dropped edge's (an
    edge's strength: its largest non-``none`` weight).  ``kind="op"``: which op a kept edge
    ``(node, edge)`` gets; the margin is its weight minus the runner-up non-``none`` weight.
    A perturbation of at most ``d`` per weight can flip a decision only if its margin is
    below ``2 d``.
    """

    cell: str
    kind: str
    node: int
    edge: int
    choice: tuple[int, ...]
    margin: float


def decisions(alphas: Sequence[torch.Tensor], primitives: Sequence[str], steps: int = 4
              ) -> list[Decision]:
    """The genotype rule's decisions for the final ``(alphas_normal, alphas_reduce)``; the
    same rule as ``Network.genotype()``."""
    none = primitives.index("none") if "none" in primitives else None
    keep = [k for k in range(len(primitives)) if k != none]
    out = []
    for cell, alpha in zip(("normal", "reduce"), alphas):
        w = F.softmax(alpha.detach().double(), dim=-1)[:, keep]
        start = 0
        for node in range(steps):
            rows = w[start:start + node + 2]
            strength = rows.max(1).values
            order = sorted(range(node + 2), key=lambda j: -float(strength[j]))
            kept = order[:2]
            if node + 2 > 2:
                out.append(Decision(cell, "edges", node, -1, tuple(sorted(kept)),
                                    float(strength[kept[1]] - strength[order[2]])))
            for j in kept:
                top = rows[j].topk(2)
                out.append(Decision(cell, "op", node, j, (keep[int(top.indices[0])],),
                                    float(top.values[0] - top.values[1])))
            start += node + 2
    return out


def flipped(reference: Sequence[Decision], alphas: Sequence[torch.Tensor],
            primitives: Sequence[str], steps: int = 4) -> list[Decision]:
    """The reference's decisions that ``alphas`` decide otherwise under the same rule: a
    node keeps another pair of inputs, or an edge the reference keeps has another best
    non-``none`` op (whether or not ``alphas`` keep that edge)."""
    edges = {(d.cell, d.node): d.choice for d in decisions(alphas, primitives, steps)
             if d.kind == "edges"}
    none = primitives.index("none") if "none" in primitives else None
    best = {}
    for cell, alpha in zip(("normal", "reduce"), alphas):
        a = alpha.detach().clone()
        if none is not None:
            a[:, none] = -float("inf")
        best[cell] = a.argmax(1).tolist()
    out = []
    for d in reference:
        if d.kind == "edges":
            other = edges[(d.cell, d.node)]
        else:
            other = (best[d.cell][sum(n + 2 for n in range(d.node)) + d.edge],)
        if other != d.choice:
            out.append(d)
    return out


def retrain(genotype: spaces.Genotype, settings: Settings, seed: int,
            data: dict[str, Split]) -> float:
    """Train the discrete network from scratch on train + val; its test accuracy."""
    torch.manual_seed(seed)
    net = DiscreteNetwork(genotype, settings.C, settings.layers).to(settings.torch_dtype)
    x = torch.cat([data["train"].x, data["val"].x])
    y = torch.cat([data["train"].y, data["val"].y])
    g = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = len(y) // settings.batch
    opt, sched = weight_optimizer(list(net.parameters()), settings,
                                  settings.retrain_epochs * per_epoch)
    net.train()
    for _ in range(settings.retrain_epochs):
        for idx in batches(len(y), settings.batch, g):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip)
            opt.step()
            sched.step()
    return accuracy(net, data["test"])


def genotype_dict(genotype: spaces.Genotype) -> dict[str, Any]:
    return {k: [list(e) if isinstance(e, tuple) else e for e in v]
            for k, v in genotype._asdict().items()}


def edge_agreement(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int]:
    """How many chosen (op, input) edges two genotypes share, node by node."""
    same = total = 0
    for cell in ("normal", "reduce"):
        for i in range(0, len(a[cell]), 2):
            x = sorted(map(tuple, a[cell][i:i + 2]))
            y = sorted(map(tuple, b[cell][i:i + 2]))
            same += sum(e in y for e in x)
            total += len(x)
    return same, total


def search_seed(configs: Sequence[SearchConfig], settings: Settings, seed: int,
                data: dict[str, Split], progress: Progress, measure_memory: bool
                ) -> dict[str, dict[str, Any]]:
    """Search under every configuration from one seed, epoch by epoch in turn; derive and
    retrain.  Returns per-configuration results."""
    steps = min(len(data["train"]), len(data["val"])) // settings.batch
    runs = {}
    for c in configs:
        runs[c.name] = SearchRun(c, settings, seed, data, steps)
        progress.advance(f"seed {seed}: built {c.name}")
    memory = {c.name: runs[c.name].peak_bytes(data) if measure_memory else None
              for c in configs}
    g_train = torch.Generator().manual_seed(seed)
    g_val = torch.Generator().manual_seed(seed + 1)
    names = [c.name for c in configs]
    for e in range(settings.epochs):
        tb = batches(len(data["train"]), settings.batch, g_train)[:steps]
        vb = batches(len(data["val"]), settings.batch, g_val)[:steps]
        shift = e % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].epoch(data, tb, vb)
            progress.advance(f"seed {seed}: {name} epoch {e + 1}/{settings.epochs} "
                             f"val {runs[name].val_acc[-1]:.2f}")
    out: dict[str, dict[str, Any]] = {}
    eager = runs[names[0]]
    primitives = eager.model.primitives
    eager_decisions = decisions(eager.alphas, primitives)
    eager_weights = torch.cat([F.softmax(a.detach(), -1).flatten() for a in eager.alphas])
    retrained: dict[str, float] = {}
    retrain_cpu_s: dict[str, float] = {}
    for c in configs:
        run = runs[c.name]
        geno = run.model.genotype()
        key = repr(geno)
        reused = key in retrained
        if not reused:  # why: same seed, genotype and data give the same network and result
            start = time.process_time()
            retrained[key] = retrain(geno, settings, seed, data)
            retrain_cpu_s[key] = time.process_time() - start
        progress.advance(f"seed {seed}: retrained {c.name}")
        traj = torch.stack(run.trajectory)
        diff = float((traj - torch.stack(eager.trajectory)).abs().max())
        weights = torch.cat([F.softmax(a.detach(), -1).flatten() for a in run.alphas])
        own = decisions(run.alphas, primitives)
        out[c.name] = {
            "compile_s": run.compile_s, "epoch_s": run.epoch_s, "epoch_cpu_s": run.epoch_cpu_s,
            "peak_bytes": memory[c.name],
            "val_acc": run.val_acc, "val_acc_eval": accuracy(run.module, data["val"]),
            "entropy": run.entropy, "alpha_movement": run.movement,
            "genotype": genotype_dict(geno),
            "test_acc": retrained[key], "retrain_reused": reused,
            "retrain_cpu_s": retrain_cpu_s[key],
            "max_alpha_diff_vs_eager": diff,
            "max_weight_diff_vs_eager": float((weights - eager_weights).abs().max()),
            "min_margin": min(d.margin for d in own),
            "flipped_vs_eager": [dataclasses.asdict(d) for d in
                                 flipped(eager_decisions, run.alphas, primitives)],
            "n_decisions": len(eager_decisions),
            "final_alphas": [a.detach().tolist() for a in run.alphas],
            "compiler": _kn_decisions(run.report),
        }
    for name in names:
        same, total = edge_agreement(out[name]["genotype"], out[names[0]]["genotype"])
        out[name]["edges_same_as_eager"] = [same, total]
        out[name]["genotype_same_as_eager"] = out[name]["genotype"] == out[names[0]]["genotype"]
    return out


def _kn_decisions(report: Any) -> list[str]:
    """The merge, fold and kn stages' summary decisions (what was merged, which kernels KN
    normalized), from the compile report."""
    if report is None:
        return []
    lines = []
    for stage in report.stages:
        if stage.name in ("merge", "fold", "kn"):
            lines += [f"{stage.name}: {d}" for d in stage.decisions if not d.startswith("cells")]
    return lines


# --------------------------------------------------------------------------------------
# Summary, table, figure
# --------------------------------------------------------------------------------------

def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(configs: dict[str, str], per_seed: dict[Any, dict[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """Per configuration (name -> description, eager first), over seeds: the table's
    figures."""
    seeds = list(per_seed)
    eager = next(iter(configs))
    eager_epoch = statistics.median(t for s in seeds for t in per_seed[s][eager]["epoch_s"])
    eager_peak = per_seed[seeds[0]][eager]["peak_bytes"]
    out = {}
    for name, description in configs.items():
        rows = [per_seed[s][name] for s in seeds]
        epoch = statistics.median(t for r in rows for t in r["epoch_s"])
        peak = rows[0]["peak_bytes"]
        accs = [r["test_acc"] for r in rows]
        flips = [r["flipped_vs_eager"] for r in rows]
        out[name] = {
            "describe": description,
            "epoch_s": epoch, "epoch_ratio": epoch / eager_epoch,
            "peak_bytes": peak,
            "peak_ratio": None if peak is None or not eager_peak else peak / eager_peak,
            "val_acc_eval_mean": statistics.fmean(r["val_acc_eval"] for r in rows),
            "val_acc_mean_per_epoch": _mean_per_epoch(rows, "val_acc"),
            "entropy_mean_per_epoch": _mean_per_epoch(rows, "entropy"),
            "movement_mean_per_epoch": _mean_per_epoch(rows, "alpha_movement"),
            "test_acc_mean": statistics.fmean(accs), "test_acc_std": _spread(accs),
            "test_acc_min": min(accs), "test_acc_max": max(accs),
            "genotype_same_as_eager": [r["genotype_same_as_eager"] for r in rows],
            "edges_same_as_eager": [r["edges_same_as_eager"] for r in rows],
            "flipped_per_seed": [len(f) for f in flips],
            "n_decisions": rows[0]["n_decisions"],
            "largest_flipped_margin": max((d["margin"] for f in flips for d in f),
                                          default=None),
            "min_margin_per_seed": [r["min_margin"] for r in rows],
            "max_alpha_diff_vs_eager": max(r["max_alpha_diff_vs_eager"] for r in rows),
            "max_weight_diff_vs_eager": max(r["max_weight_diff_vs_eager"] for r in rows),
        }
    return out


def _mean_per_epoch(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [statistics.fmean(v) for v in zip(*(r[key] for r in rows))]


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of the report."""
    head = ("| configuration | epoch time | peak memory | supernet val acc | "
            "retrained test acc, mean ± std [min, max] | genotype = eager's (edges shared) | "
            "eager's decisions flipped, per seed (largest eager margin flipped) | "
            "max alpha diff to eager (trajectory) | max weight diff to eager (final) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, s in summary.items():
        peak = "n/a" if s["peak_ratio"] is None else f"{s['peak_ratio']:.2f}x"
        same = sum(s["genotype_same_as_eager"])
        edges = ", ".join(f"{a}/{b}" for a, b in s["edges_same_as_eager"])
        flips = ", ".join(map(str, s["flipped_per_seed"]))
        largest = s["largest_flipped_margin"]
        flips += f" of {s['n_decisions']}" + ("" if largest is None else f" ({largest:.1e})")
        rows.append(
            f"| {name} | {s['epoch_ratio']:.2f}x ({s['epoch_s']:.1f} s) | {peak} | "
            f"{s['val_acc_eval_mean']:.3f} | {s['test_acc_mean']:.3f} ± "
            f"{s['test_acc_std']:.3f} [{s['test_acc_min']:.3f}, {s['test_acc_max']:.3f}] | "
            f"{same}/{len(s['genotype_same_as_eager'])} seeds ({edges}) | {flips} | "
            f"{s['max_alpha_diff_vs_eager']:.1e} | {s['max_weight_diff_vs_eager']:.1e} |")
    return "\n".join(rows)


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> str | None:
    """Validation accuracy, mean alpha entropy and alpha movement per epoch, one line per
    configuration (means over seeds).  Returns why it could not draw, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure"
    fig, (acc_ax, ent_ax, mov_ax) = plt.subplots(1, 3, figsize=(15, 4))
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]
    for i, (name, s) in enumerate(summary.items()):
        acc = s["val_acc_mean_per_epoch"]
        ent = s["entropy_mean_per_epoch"]
        mov = s["movement_mean_per_epoch"]
        style = dict(linestyle=styles[i % len(styles)], marker="o", markersize=3)
        acc_ax.plot(range(1, len(acc) + 1), acc, label=name, **style)
        ent_ax.plot(range(len(ent)), ent, label=name, **style)
        mov_ax.plot(range(len(mov)), mov, label=name, **style)
    uniform = summary[next(iter(summary))]["entropy_mean_per_epoch"][0]
    ent_ax.axhline(uniform, color="grey", linewidth=0.8)
    acc_ax.set(xlabel="epoch", ylabel="supernet validation accuracy",
               title="validation accuracy (architecture steps' batches)")
    ent_ax.set(xlabel="epoch (0: initial alphas, grey: uniform)",
               ylabel="mean alpha entropy (nats)", title="architecture entropy")
    mov_ax.set(xlabel="epoch", ylabel="max |alpha - alpha_0|",
               title="how far the alphas moved")
    for ax in (acc_ax, ent_ax, mov_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def markdown(result: dict[str, Any], figure: str | None) -> str:
    """The BENCHMARKS.md section of a run."""
    meta, st = result["meta"], result["settings"]
    lines = [
        "## Search fidelity: first-order DARTS on digits, eager against compiled", "",
        f"Command: `{meta['command']}` ({meta['machine']['cpu']}, {meta['machine']['threads']} "
        f"threads, torch {meta['machine']['torch']}, {meta['machine']['date']}, revision "
        f"{meta['revision']}; load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}; wall time {meta['wall_s']:.0f} s, CPU time {meta['cpu_s']:.0f} s"
        f"{_parallel(meta)}).", "",
        f"DARTS space, C={st['C']}, {st['layers']} cells, digits at {st['resolution']}x"
        f"{st['resolution']}: {st['n_train']} train / {st['n_val']} validation / "
        f"{st['n_test']} test images, batch {st['batch']}, {st['epochs']} search epochs, "
        f"retrain {st['retrain_epochs']} epochs on train + validation, seeds "
        f"{', '.join(map(str, st['seeds']))}; architecture step Adam lr {st['a_lr']:g}; "
        f"{st.get('dtype', 'float32')}; images "
        f"{'dequantized' if st.get('dequantize') else 'raw (17 grey levels)'}. "
        f"Epoch time: median over epochs and seeds of the search steps (architecture + "
        f"weight step); peak memory: one search step, as `benchmarks.measure.step_peak_bytes` "
        f"sees it; both ratios to eager. Supernet val acc: the final supernet on the whole "
        f"validation split (eval mode), mean over seeds. Test accuracy: the retrained discrete "
        f"network, mean ± standard deviation over seeds. Decisions: the genotype rule's "
        f"choices (per cell type, which two inputs each node with three or more keeps, and "
        f"each kept edge's op); a decision's margin is the gap in softmax weight to the "
        f"runner-up; a configuration flips one of eager's decisions when its own alphas choose "
        f"otherwise. `eager-rev` is eager with every batch in reverse sample order: the same "
        f"search in exact arithmetic, other float32 rounding, i.e. the noise floor.", "",
        table(result["summary"]), "",
    ]
    if figure:
        lines += [f"![validation accuracy, alpha entropy and alpha movement per epoch]"
                  f"({figure})", ""]
    seeds = list(result["per_seed"])
    names = list(result["summary"])
    lines += ["Per epoch (mean over seeds) and per seed:", "",
              "| configuration | supernet val acc per epoch (architecture steps' batches) | "
              "mean alpha entropy per epoch (epoch 0: initial) | max \\|alpha - alpha_0\\| "
              "per epoch | smallest decision margin per seed | retrained test acc per seed ("
              + ", ".join(map(str, seeds)) + ") |",
              "|---|---|---|---|---|---|"]
    for name in names:
        s = result["summary"][name]
        accs = ", ".join(f"{result['per_seed'][seed][name]['test_acc']:.3f}" for seed in seeds)
        lines.append(f"| {name} | {' '.join(f'{v:.3f}' for v in s['val_acc_mean_per_epoch'])} "
                     f"| {' '.join(f'{v:.3f}' for v in s['entropy_mean_per_epoch'])} "
                     f"| {' '.join(f'{v:.3f}' for v in s['movement_mean_per_epoch'])} "
                     f"| {', '.join(f'{v:.1e}' for v in s['min_margin_per_seed'])} | {accs} |")
    lines += ["", "Eager's decisions that the configurations of eager's function flip (seed: "
                  "cell, node, which inputs (edges) or which op of input e, eager's margin):",
              ""]
    for name in [n for n in names[1:] if n in ("eager-rev", "exact")]:
        parts = []
        for seed in seeds:
            flips = result["per_seed"][seed][name]["flipped_vs_eager"]
            parts.append(f"seed {seed}: " + (", ".join(
                _decision(d) for d in sorted(flips, key=lambda d: d["margin"])) or "none"))
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", f"What the compiler did (seed {seeds[0]}'s compile reports, merge / fold / kn "
                  f"summaries):", ""]
    for name in names:
        compiler = result["per_seed"][seeds[0]][name]["compiler"]
        if compiler:
            lines.append(f"- {name}: " + "; ".join(compiler))
    lines += [""]
    lines.append("Genotypes (normal / reduce), per seed:")
    lines.append("")
    for seed, per in result["per_seed"].items():
        for name, r in per.items():
            g = r["genotype"]
            lines.append(f"- seed {seed}, {name}: normal {_edges(g['normal'])}; "
                         f"reduce {_edges(g['reduce'])}")
    return "\n".join(lines)


def _decision(d: dict[str, Any]) -> str:
    what = "edges" if d["kind"] == "edges" else f"op e{d['edge']}"
    return f"{d['cell']} n{d['node']} {what} {d['margin']:.1e}"


def _parallel(meta: dict[str, Any]) -> str:
    n = meta.get("parallel_processes")
    return f", {n} processes side by side, one per seed, merged with --combine" if n else ""


def _edges(gene: Sequence[Sequence[Any]]) -> str:
    return " ".join(f"{op}<-{j}" for op, j in gene)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one seed, two epochs, tiny sizes: a smoke run under a minute")
    p.add_argument("--configs", help="comma list of configurations (default: all but "
                                     f"{', '.join(OPTIONAL)}; eager always runs first)")
    p.add_argument("--seeds", help="comma list of seeds (default 0,1,2; --quick 0)")
    for f in ("epochs", "retrain_epochs", "batch", "n_train", "n_val", "n_test", "C",
              "layers", "resolution"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, dest=f)
    p.add_argument("--a-lr", type=float, dest="a_lr", help="the architecture step's Adam lr")
    p.add_argument("--no-dequantize", dest="dequantize", action="store_false", default=None,
                   help="the raw 17 grey levels (flat regions: ties that rounding breaks)")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="float64: the same search without float32 rounding (slower)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on a shared machine more threads "
                        "contend and a step can take 20x longer)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="directory for search-cpu.json and search-cpu.png")
    p.add_argument("--markdown", type=Path, help="(re)write the search section of this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="merge the search-cpu.json of runs over different seeds (run one "
                        "process per seed with --seeds N --out DIR) and write the summary")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    fields = dict(QUICK) if args.quick else {}
    for f in ("epochs", "retrain_epochs", "batch", "n_train", "n_val", "n_test", "C",
              "layers", "resolution"):
        if getattr(args, f) is not None:
            fields[f] = getattr(args, f)
    if args.a_lr is not None:
        fields["a_lr"] = args.a_lr
    if args.dtype is not None:
        fields["dtype"] = args.dtype
    if args.dequantize is not None:
        fields["dequantize"] = args.dequantize
    if args.seeds:
        fields["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    return Settings(**fields)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.search",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    if args.combine:
        return finish(args, combine(args.combine, command))
    torch.set_num_threads(args.threads)
    settings = _settings(args)
    data = load_digits_splits(settings)
    example_model = spaces.build("darts", C=settings.C, layers=settings.layers).to(
        settings.torch_dtype)
    configs = configurations(example_model, data["train"].x[:2])
    if args.configs:
        wanted = {n.strip() for n in args.configs.split(",") if n.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; known: "
                             f"{', '.join(c.name for c in configs)}")
        configs = [c for c in configs if c.name == "eager" or c.name in wanted]
    else:
        configs = [c for c in configs if c.name not in OPTIONAL]
    revision, load_start = source_revision(), _load()
    clock, cpu_clock = time.perf_counter(), time.process_time()
    n = len(configs)
    progress = Progress(len(settings.seeds) * n * (settings.epochs + 2),
                        enabled=not args.no_progress)
    per_seed = {}
    for i, seed in enumerate(settings.seeds):
        per_seed[seed] = search_seed(configs, settings, seed, data, progress,
                                     measure_memory=i == 0)
    progress.close()
    meta = {"machine": machine_info(torch.device("cpu")), "command": command,
            "revision": revision, "load_start": load_start, "load_end": _load(),
            "wall_s": time.perf_counter() - clock, "cpu_s": time.process_time() - cpu_clock}
    result = {"meta": meta, "settings": dataclasses.asdict(settings),
              "configurations": {c.name: c.describe() for c in configs},
              "per_seed": per_seed}
    return finish(args, result)


def combine(paths: Sequence[Path], command: str) -> dict[str, Any]:
    """Merge runs of the same settings over different seeds (e.g. one process per seed):
    per-seed results side by side, CPU seconds added, wall time the longest."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        if {k: v for k, v in part["settings"].items() if k != "seeds"} != \
                {k: v for k, v in first["settings"].items() if k != "seeds"} or \
                part["configurations"] != first["configurations"]:
            raise SystemExit(f"--combine: {paths[0]} and another run differ in settings or "
                             f"configurations")
    per_seed: dict[str, Any] = {}
    for part in parts:
        per_seed.update(part["per_seed"])
    meta = dict(first["meta"])
    meta.update(command=" ; ".join([p["meta"]["command"] for p in parts] + [command]),
                wall_s=max(p["meta"]["wall_s"] for p in parts),
                cpu_s=sum(p["meta"]["cpu_s"] for p in parts),
                load_start=" / ".join(p["meta"]["load_start"] for p in parts),
                load_end=" / ".join(p["meta"]["load_end"] for p in parts),
                parallel_processes=len(parts))
    settings = dict(first["settings"], seeds=[int(s) for s in per_seed])
    return {"meta": meta, "settings": settings, "configurations": first["configurations"],
            "per_seed": per_seed}


def finish(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Summarize; print the table; write the JSON, the figure (and the Markdown)."""
    write_json(args.out / "search-cpu.json", result)  # why: kept even if summarizing fails
    summary = summarize(result["configurations"], result["per_seed"])
    result = dict(result, summary=summary)
    write_json(args.out / "search-cpu.json", result)
    figure = args.out / "search-cpu.png"
    st = result["settings"]
    failure = plot(summary, figure, f"first-order DARTS on digits ({st['resolution']}x"
                                    f"{st['resolution']}), {len(result['per_seed'])} seed(s)")
    print(table(summary))
    print(failure or f"wrote {figure}", file=sys.stderr)
    print(f"wrote {args.out / 'search-cpu.json'} ({result['meta']['wall_s']:.0f} s wall, "
          f"{result['meta']['cpu_s']:.0f} s CPU)", file=sys.stderr)
    if args.markdown is not None:
        rel = None
        if failure is None:
            rel = os.path.relpath(figure.resolve(), args.markdown.resolve().parent)
        write_markdown(args.markdown, {"search": markdown(result, rel)})
        print(f"wrote {args.markdown}", file=sys.stderr)
    return result

if __name__ == "__main__":
    main()
