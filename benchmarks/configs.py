"""The configurations a benchmark compares (the paper's ablation rows), its figures and targets.

A configuration is a pass list given to ``compile_supernet``; ``baseline`` is the eager
supernet itself.  Whether a configuration can run is decided when it runs, from
``topo_compiler.passes.PASSES``: rows for passes that land later appear without code changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from topo_compiler.passes import PASSES, PIPELINE

__all__ = ["Configuration", "BASELINE", "CONFIGURATIONS", "select", "full_method",
           "PaperFigure", "PAPER", "Target", "TARGETS", "COMPILE_TARGET"]


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One row of the ablation: the passes to run (``None``: the eager supernet) and ``exact``."""

    name: str
    passes: tuple[str, ...] | None
    exact: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.passes is None

    def missing_passes(self) -> tuple[str, ...]:
        """The passes this configuration needs that ``topo_compiler.passes`` lacks today."""
        return tuple(p for p in self.passes or () if p not in PASSES)


BASELINE = Configuration("baseline", None)

_ABLATION = {
    "traced": (),                       # compile_supernet with no pass: sanity, ratio ~ 1
    "pms": ("pms",),                    # partial module sharing
    "fms": ("fms",),                    # floating module sharing
    "pms+fms": ("pms", "fms"),          # the paper's "sharing"
    "pms+fms+kn": ("pms", "fms", "kn"),  # Table V's "+Sharing+KN" (no merge)
    "pms+fms+merge": ("pms", "fms", "merge"),
    "all": PIPELINE,                    # sharing, merged kernels, kernel normalization
}

CONFIGURATIONS: tuple[Configuration, ...] = (
    (BASELINE,)
    + tuple(Configuration(name, passes) for name, passes in _ABLATION.items())
    + tuple(Configuration(f"{name}[exact]", passes, exact=True)
            for name, passes in _ABLATION.items() if passes))


def select(names: str | None) -> tuple[Configuration, ...]:
    """The configurations named in a comma list (all when ``None``); ``baseline`` always first."""
    if names is None:
        return CONFIGURATIONS
    by_name = {c.name: c for c in CONFIGURATIONS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: "
                         f"{', '.join(by_name)}")
    return (BASELINE,) + tuple(c for c in CONFIGURATIONS
                               if c.name in wanted and not c.is_baseline)


def full_method(configs: Sequence[Configuration]) -> Configuration | None:
    """The configuration standing for the paper's full method: the most passes, inexact first.

    Only configurations whose passes all exist count; ``None`` when no pass exists yet.
    """
    ready = [c for c in configs if c.passes and not c.missing_passes()]
    if not ready:
        return None
    return max(ready, key=lambda c: (len(c.passes), not c.exact))


class PaperFigure(NamedTuple):
    """A ratio to the paper's own baseline: GPU memory and search time."""

    memory: float
    time: float
    source: str


PAPER: dict[tuple[str, str], PaperFigure] = {
    # NB201 with DARTS (Tables III and V): +Sharing, +Sharing+Reparam, +All
    ("nb201", "pms+fms"): PaperFigure(3414 / 3626, 10761 / 11386, "Table V, +Sharing"),
    ("nb201", "pms+fms+kn"): PaperFigure(3422 / 3626, 11774 / 11386, "Table V, +Sharing+KN"),
    ("nb201", "pms+fms+merge"): PaperFigure(3000 / 3626, 8145 / 11386,
                                            "Table V, +Sharing+Reparam"),
    ("nb201", "all"): PaperFigure(3006 / 3626, 8620 / 11386, "Table III/V, DARTS+Ours"),
    # DARTS space, 8 cells (Table IV)
    ("darts", "all"): PaperFigure(11760 / 19752, 3.3 / 3.4, "Table IV, DARTS+Ours"),
    # wide space: 4 parameterless ops, 5 dilated and 7 double-stacked sep convs (Table VI)
    ("wide", "pms"): PaperFigure(15840 / 23498, 23.63 / 24.42, "Table VI, +PMS"),
    ("wide", "fms"): PaperFigure(12302 / 23498, 14.71 / 24.42, "Table VI, +FMS"),
    ("wide", "pms+fms"): PaperFigure(7672 / 23498, 14.59 / 24.42, "Table VI, +Both"),
}
"""(space, configuration) -> the paper's ratio to its baseline, where the paper has the row."""


class Target(NamedTuple):
    """The project's bar for the full method: ratios to the baseline of the same run."""

    saved: float
    time: float


TARGETS: dict[str, Target] = {
    "nb201": Target(saved=0.75, time=0.75),
    "darts": Target(saved=0.50, time=0.95),
    "wide": Target(saved=0.30, time=0.55),
}

COMPILE_TARGET = ("darts", 8, 5.0)
"""(space, cells, seconds): compiling the 8-cell DARTS supernet takes under 5 s."""
