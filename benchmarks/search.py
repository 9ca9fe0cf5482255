"""``python -m benchmarks.search``: a first-order DARTS search on real data, eager against compiled.

Every other benchmark measures what a search step costs; this one measures what the search
*finds*.  It runs the same first-order DARTS search (Liu et al., ICLR 2019, the
``--unrolled False`` variant of quark0/darts ``train_search.py``) once per configuration, from
the same initial weights and with the same data order:

* data: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes, shipped inside
  the package), upsampled to ``--resolution`` (bilinear), standardized with the training
  split's mean and std, repeated to 3 channels; split once into train / validation / test
  with a fixed seed (``--data-seed``), the same for every run seed;
* search: the built-in DARTS space (``topo_compiler.spaces``, C=8, 5 cells); each iteration
  takes an architecture step on a validation batch (Adam lr 3e-4, betas (0.5, 0.999), weight
  decay 1e-3, first order: the gradient of the validation loss at the current weights) and
  then a weight step on a training batch (SGD momentum 0.9, cosine lr from 0.025 to 0.001,
  weight decay 3e-4, gradient norm clipped at 5) -- DARTS's settings, scaled down;
* derive: DARTS's genotype rule (``model.genotype()``: per node the two strongest incoming
  edges, each with its strongest non-``none`` op);
* retrain: the discrete network of that genotype (DARTS's ``NetworkCIFAR`` without
  auxiliary head or drop path, built here from the space's own ops), from scratch, with one
  short schedule for every configuration (train + validation splits, the weight optimizer
  above), then its accuracy on the test split.

Configurations: ``eager`` (the supernet itself), ``exact`` (``exact=True``), the default
pipeline without kernel normalization and with it, and sharing + KN with no merge (what KN
does when nothing is merged).  Within a seed the configurations run epoch by epoch in turn
(the first one rotates), so a change in the machine's load falls on all of them alike.

Reported per configuration: median epoch time (search steps only) and peak memory of one
search step (forward and backward; CPU: what :func:`benchmarks.measure.step_peak_bytes`
sees), both as ratios to eager; supernet validation accuracy and mean alpha entropy per
epoch; the genotype; retrained test accuracy (mean and spread over seeds); agreement with
eager's genotype and the largest difference of the alpha trajectory from eager's.

Examples::

    python -m benchmarks.search                         # the full CPU run (see BENCHMARKS.md)
    python -m benchmarks.search --quick --out /tmp/s    # smoke run, < 1 min
    python -m benchmarks.search --configs eager,exact --seeds 0
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
    layers: int = 5
    resolution: int = 16
    n_train: int = 256
    n_val: int = 256
    n_test: int = 297
    batch: int = 32
    epochs: int = 3
    retrain_epochs: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_betas: tuple[float, float] = (0.5, 0.999)
    a_decay: float = 1e-3


QUICK = dict(C=4, layers=3, resolution=8, n_train=64, n_val=64, n_test=64, batch=32,
             epochs=2, retrain_epochs=1, seeds=(0,))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """One configuration: the eager supernet (``eager=True``) or ``compile_supernet``'s
    ``passes`` (``None``: the default pipeline) and ``exact``."""

    name: str
    passes: tuple[str, ...] | None = None
    exact: bool = False
    eager: bool = False

    def describe(self) -> str:
        if self.eager:
            return "the eager supernet"
        passes = "default pipeline" if self.passes is None else f"passes={self.passes}"
        return f"compile_supernet({passes}{', exact=True' if self.exact else ''})"

    def build(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        if self.eager:
            return model
        return compile_supernet(model, example, passes=self.passes, exact=self.exact)


def configurations(example_model: nn.Module, example: torch.Tensor) -> list[SearchConfig]:
    """eager, exact, the default pipeline without and with ``kn``, and ``pms+fms+kn``.

    The default pipeline's pass names are read from a compile report (the public API), so
    "without kn" follows the pipeline whatever passes it gains.
    """
    default = compile_supernet(example_model, example).report.passes
    without_kn = tuple(p for p in default if p != "kn")
    configs = [SearchConfig("eager", eager=True), SearchConfig("exact", exact=True),
               SearchConfig("+".join(without_kn) or "traced", without_kn),
               SearchConfig("default", None)]
    if "kn" in default:
        configs.append(SearchConfig("pms+fms+kn", tuple(p for p in ("pms", "fms", "kn")
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
    """scikit-learn's digits as ``train`` / ``val`` / ``test`` tensors ``(N, 3, r, r)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # why: scikit-learn is an extra, not a core dependency
        raise SystemExit("benchmarks.search needs scikit-learn: pip install "
                         "'topo-compiler[bench]'") from err
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
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


class SearchRun:
    """One configuration's search state for one seed."""

    def __init__(self, config: SearchConfig, settings: Settings, seed: int,
                 data: dict[str, Split], steps_per_epoch: int):
        torch.manual_seed(seed)  # the same initial weights and alphas for every configuration
        self.model = spaces.build("darts", C=settings.C, layers=settings.layers)
        example = data["train"].x[:settings.batch]  # the training batch: merge's cost model
        start = time.perf_counter()
        self.module = config.build(self.model, example)
        self.compile_s = time.perf_counter() - start
        self.report = None if config.eager else self.module.report
        self.alphas = list(self.model.arch_parameters())
        self.weights = list(self.model.weights())
        self.w_opt, self.w_sched = weight_optimizer(self.weights, settings,
                                                    settings.epochs * steps_per_epoch)
        self.a_opt = torch.optim.Adam(self.alphas, settings.a_lr, betas=settings.a_betas,
                                      weight_decay=settings.a_decay)
        self.settings = settings
        self.epoch_s: list[float] = []
        self.epoch_cpu_s: list[float] = []
        self.val_acc: list[float] = []
        self.entropy: list[float] = [alpha_entropy(self.alphas)]
        self.trajectory: list[torch.Tensor] = []  # alphas after every architecture step

    def arch_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """First-order DARTS: the validation loss's gradient at the current weights."""
        loss = F.cross_entropy(self.module(x), y)
        _set_grads(self.alphas, torch.autograd.grad(loss, self.alphas))
        self.a_opt.step()
        self.trajectory.append(torch.cat([a.detach().flatten() for a in self.alphas]).clone())

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
        train, val = data["train"], data["val"]
        start, cpu_start = time.perf_counter(), time.process_time()
        for t, v in zip(train_batches, val_batches):
            self.arch_step(val.x[v], val.y[v])
            self.weight_step(train.x[t], train.y[t])
        self.epoch_s.append(time.perf_counter() - start)
        self.epoch_cpu_s.append(time.process_time() - cpu_start)
        self.val_acc.append(accuracy(self.module, val))
        self.entropy.append(alpha_entropy(self.alphas))

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


def retrain(genotype: spaces.Genotype, settings: Settings, seed: int,
            data: dict[str, Split]) -> float:
    """Train the discrete network from scratch on train + val; its test accuracy."""
    torch.manual_seed(seed)
    net = DiscreteNetwork(genotype, settings.C, settings.layers)
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
        out[c.name] = {
            "compile_s": run.compile_s, "epoch_s": run.epoch_s, "epoch_cpu_s": run.epoch_cpu_s,
            "peak_bytes": memory[c.name],
            "val_acc": run.val_acc, "entropy": run.entropy, "genotype": genotype_dict(geno),
            "test_acc": retrained[key], "retrain_reused": reused,
            "retrain_cpu_s": retrain_cpu_s[key],
            "max_alpha_diff_vs_eager": diff,
            "final_alphas": [a.detach().tolist() for a in run.alphas],
            "decisions": _kn_decisions(run.report),
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
        final_val = [r["val_acc"][-1] for r in rows]
        out[name] = {
            "describe": description,
            "epoch_s": epoch, "epoch_ratio": epoch / eager_epoch,
            "peak_bytes": peak,
            "peak_ratio": None if peak is None or not eager_peak else peak / eager_peak,
            "val_acc_final_mean": statistics.fmean(final_val),
            "val_acc_mean_per_epoch": [statistics.fmean(v) for v in
                                       zip(*(r["val_acc"] for r in rows))],
            "entropy_mean_per_epoch": [statistics.fmean(v) for v in
                                       zip(*(r["entropy"] for r in rows))],
            "test_acc_mean": statistics.fmean(accs), "test_acc_std": _spread(accs),
            "test_acc_min": min(accs), "test_acc_max": max(accs),
            "genotype_same_as_eager": [r["genotype_same_as_eager"] for r in rows],
            "edges_same_as_eager": [r["edges_same_as_eager"] for r in rows],
            "max_alpha_diff_vs_eager": max(r["max_alpha_diff_vs_eager"] for r in rows),
        }
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of the report."""
    head = ("| configuration | epoch time | peak memory | supernet val acc (final) | "
            "retrained test acc, mean ± std [min, max] | genotype = eager's (edges shared) | "
            "max alpha diff to eager |\n|---|---|---|---|---|---|---|")
    rows = [head]
    for name, s in summary.items():
        peak = "n/a" if s["peak_ratio"] is None else f"{s['peak_ratio']:.2f}x"
        same = sum(s["genotype_same_as_eager"])
        edges = ", ".join(f"{a}/{b}" for a, b in s["edges_same_as_eager"])
        rows.append(
            f"| {name} | {s['epoch_ratio']:.2f}x ({s['epoch_s']:.1f} s) | {peak} | "
            f"{s['val_acc_final_mean']:.3f} | {s['test_acc_mean']:.3f} ± "
            f"{s['test_acc_std']:.3f} [{s['test_acc_min']:.3f}, {s['test_acc_max']:.3f}] | "
            f"{same}/{len(s['genotype_same_as_eager'])} seeds ({edges}) | "
            f"{s['max_alpha_diff_vs_eager']:.1e} |")
    return "\n".join(rows)


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> str | None:
    """Validation accuracy and mean alpha entropy per epoch, one line per configuration
    (means over seeds).  Returns why it could not draw, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure"
    fig, (acc_ax, ent_ax) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", "-.", ":", (0, (5, 1))]
    for i, (name, s) in enumerate(summary.items()):
        acc = s["val_acc_mean_per_epoch"]
        ent = s["entropy_mean_per_epoch"]
        style = dict(linestyle=styles[i % len(styles)], marker="o", markersize=3)
        acc_ax.plot(range(1, len(acc) + 1), acc, label=name, **style)
        ent_ax.plot(range(len(ent)), ent, label=name, **style)
    acc_ax.set(xlabel="epoch", ylabel="supernet validation accuracy",
               title="validation accuracy (mean over seeds)")
    ent_ax.set(xlabel="epoch (0: initial alphas)", ylabel="mean alpha entropy (nats)",
               title="architecture entropy (mean over seeds)")
    for ax in (acc_ax, ent_ax):
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
        f"{', '.join(map(str, st['seeds']))}. Epoch time: median over epochs and seeds of the "
        f"search steps (architecture + weight step); peak memory: one search step, as "
        f"`benchmarks.measure.step_peak_bytes` sees it; both ratios to eager. Test accuracy: "
        f"the retrained discrete network, mean ± standard deviation over seeds.", "",
        table(result["summary"]), "",
    ]
    if figure:
        lines += [f"![validation accuracy and alpha entropy per epoch]({figure})", ""]
    seeds = list(result["per_seed"])
    names = list(result["summary"])
    lines += ["Per epoch (mean over seeds) and per seed:", "",
              "| configuration | supernet val acc per epoch | mean alpha entropy per epoch "
              "(epoch 0: initial) | retrained test acc per seed (" + ", ".join(map(str, seeds))
              + ") |",
              "|---|---|---|---|"]
    for name in names:
        s = result["summary"][name]
        accs = ", ".join(f"{result['per_seed'][seed][name]['test_acc']:.3f}" for seed in seeds)
        lines.append(f"| {name} | {' '.join(f'{v:.3f}' for v in s['val_acc_mean_per_epoch'])} "
                     f"| {' '.join(f'{v:.5f}' for v in s['entropy_mean_per_epoch'])} | {accs} |")
    lines += ["", f"What the compiler did (seed {seeds[0]}'s compile reports, merge / fold / kn "
                  f"summaries):", ""]
    for name in names:
        decisions = result["per_seed"][seeds[0]][name]["decisions"]
        if decisions:
            lines.append(f"- {name}: " + "; ".join(decisions))
    lines += [""]
    lines.append("Genotypes (normal / reduce), per seed:")
    lines.append("")
    for seed, per in result["per_seed"].items():
        for name, r in per.items():
            g = r["genotype"]
            lines.append(f"- seed {seed}, {name}: normal {_edges(g['normal'])}; "
                         f"reduce {_edges(g['reduce'])}")
    return "\n".join(lines)


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
    p.add_argument("--configs", help="comma list of configurations (default: all; eager "
                                     "always runs first)")
    p.add_argument("--seeds", help="comma list of seeds (default 0,1,2; --quick 0)")
    for f in ("epochs", "retrain_epochs", "batch", "n_train", "n_val", "n_test", "C",
              "layers", "resolution"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, dest=f)
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
    example_model = spaces.build("darts", C=settings.C, layers=settings.layers)
    configs = configurations(example_model, data["train"].x[:2])
    if args.configs:
        wanted = {n.strip() for n in args.configs.split(",") if n.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; known: "
                             f"{', '.join(c.name for c in configs)}")
        configs = [c for c in configs if c.eager or c.name in wanted]
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
