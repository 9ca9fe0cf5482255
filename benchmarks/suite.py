"""One search space measured under every configuration, in one process.

All configurations compile the same supernet instance, so they share its parameters: the
gradients, the batch and the resident memory are the same for every row, and only what the
configuration changes (the graph) differs.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from topo_compiler.spaces import build, default_input

from .configs import Configuration
from .measure import (
    TrainingStep,
    gradients_reached,
    interleaved_times,
    resident_tensors,
    saved_activations_and_flops,
    step_peak_bytes,
    synchronizer,
    timed_compiles,
    unique_storage_bytes,
)
from .progress import Progress

__all__ = ["Sizes", "Settings", "build_supernet", "measure_space", "space_work",
           "RATIO_METRICS"]

NUM_CLASSES = 10
RATIO_METRICS = ("saved_bytes", "peak_bytes", "flops", "step_s")
"""The metrics reported as a ratio to the baseline of the same run."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The supernet and batch a space is measured at (``layers``: cells per stage for NB201)."""

    batch: int
    C: int
    layers: int
    resolution: int

    def describe(self, space: str) -> str:
        cells = "cells per stage" if space == "nb201" else "cells"
        return (f"batch {self.batch}, C={self.C}, {self.layers} {cells}, "
                f"{self.resolution}x{self.resolution} inputs")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to measure: device, timed rounds, warm-up rounds, compiles per configuration."""

    device: torch.device
    steps: int
    warmup: int
    compiles: int
    """At most this many compiles per configuration (the median is reported) ..."""
    compile_budget_s: float = 5.0
    """... and no more once they add up to this many seconds."""
    seed: int = 0


def build_supernet(space: str, sizes: Sizes, settings: Settings,
                   **space_kw: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The supernet in training mode, a batch and its labels, all on the device already."""
    torch.manual_seed(settings.seed)
    model = build(space, C=sizes.C, layers=sizes.layers, num_classes=NUM_CLASSES, **space_kw)
    model = model.to(settings.device).train()
    inputs = default_input(space, batch=sizes.batch, resolution=sizes.resolution, **space_kw)
    target = torch.randint(0, NUM_CLASSES, (sizes.batch,))
    return model, inputs.to(settings.device), target.to(settings.device)


def space_work(configs: Sequence[Configuration], settings: Settings) -> int:
    """Progress units :func:`measure_space` advances: compile, measure, then timed rounds."""
    return 2 * len(configs) + settings.warmup + settings.steps


def measure_space(space: str, configs: Sequence[Configuration], sizes: Sizes,
                  settings: Settings, progress: Progress, **space_kw: Any) -> dict[str, Any]:
    """Measure one search step of ``space`` under each configuration (``configs[0]``: baseline).

    Returns the space, its sizes, the resident bytes and one row per configuration: either
    measured (figures and ratios to the baseline) or with the status that says why not.
    """
    model, inputs, target = build_supernet(space, sizes, settings, **space_kw)
    sync = synchronizer(settings.device)
    rows: dict[str, dict[str, Any]] = {}
    modules: dict[str, nn.Module] = {}
    for config in configs:
        rows[config.name], module = _prepare(config, model, inputs, settings, modules)
        if module is not None:
            modules[config.name] = module
        progress.advance(f"{space}: compile {config.name}")
    _baseline_counts(rows, modules)

    resident = resident_tensors(model, inputs, target)
    steps = {}
    for config in configs:
        if config.name in modules:
            step = TrainingStep(modules[config.name], model, inputs, target)
            try:
                rows[config.name].update(_measure_step(step, resident, settings.device))
                steps[config.name] = step
            except Exception as error:  # why: one broken graph must not hide the other rows
                rows[config.name] = _row(config, "failed", note=_reason(error))
        progress.advance(f"{space}: measure {config.name}")

    times = interleaved_times(steps, settings.steps, settings.warmup, sync,
                              tick=lambda: progress.advance(f"{space}: timed round"))
    for name, samples in times.items():
        rows[name].update(step_s=statistics.median(samples), step_samples=samples)
    _add_ratios(rows, configs[0].name)
    return {"space": space, "space_kw": space_kw, "sizes": dataclasses.asdict(sizes),
            "sizes_text": sizes.describe(space),
            "resident_bytes": unique_storage_bytes(resident), "rows": list(rows.values())}


def _row(config: Configuration, status: str, **fields: Any) -> dict[str, Any]:
    passes = None if config.passes is None else list(config.passes)
    return {"config": config.name, "passes": passes, "exact": config.exact,
            "status": status, **fields}


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _prepare(config: Configuration, model: nn.Module, inputs: torch.Tensor, settings: Settings,
             compiled: dict[str, nn.Module]) -> tuple[dict[str, Any], nn.Module | None]:
    """The row and the module to measure for ``config`` (``None`` when there is none)."""
    if config.is_baseline:
        return _row(config, "measured"), model
    missing = config.missing_passes()
    if missing:
        return _row(config, "not implemented yet", note=f"needs {', '.join(missing)}"), None
    try:
        module, seconds = timed_compiles(model, inputs, config, settings.compiles,
                                         settings.compile_budget_s,
                                         synchronizer(settings.device))
    except Exception as error:  # why: a failing pass is a result to report, not a crash
        return _row(config, "failed", note=_reason(error)), None
    same = next((name for name, other in compiled.items()
                 if getattr(other, "code", None) == module.code), None)
    if config.exact and same is not None:
        return _row(config, "same graph", note=f"exact=True compiles to the graph of {same}",
                    compile_s=statistics.median(seconds)), None
    report = module.report
    return _row(config, "measured", compile_s=statistics.median(seconds),
                compile_samples=seconds, compile_stages=dict(report.timings),
                counts=report.final.counts.as_dict()), module


def _baseline_counts(rows: dict[str, dict[str, Any]], modules: dict[str, nn.Module]) -> None:
    """The baseline's basic modules: the input stage of any compile report (all the same)."""
    reports = [m.report for m in modules.values() if hasattr(m, "report")]
    for row in rows.values():
        if row["passes"] is None and reports:
            row["counts"] = reports[0].input.counts.as_dict()


def _measure_step(step: TrainingStep, resident: Sequence[torch.Tensor],
                  device: torch.device) -> dict[str, Any]:
    """Saved bytes, FLOPs, gradients reached (one step), then peak memory (another)."""
    saved, flops = saved_activations_and_flops(step, resident)
    reached = gradients_reached(step.model)
    step.clear_gradients()
    peak = step_peak_bytes(step, device)
    return {"saved_bytes": saved.bytes, "saved_storages": saved.storages,
            "saved_tensors": saved.tensors, "grads": reached, "flops": flops,
            "peak_bytes": peak}


def _add_ratios(rows: dict[str, dict[str, Any]], baseline: str) -> None:
    """``ratios[metric]`` = the row's figure / the baseline's, for every measured row."""
    base = rows[baseline]
    for row in rows.values():
        if row["status"] != "measured":
            continue
        row["ratios"] = {m: row[m] / base[m] if row.get(m) is not None and base.get(m)
                         else None for m in RATIO_METRICS}
