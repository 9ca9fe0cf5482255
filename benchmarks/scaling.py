"""The paper's Fig. 8: search cost against the number of candidate operations.

The wide space grows from the three parameterless ops by one dilated or separable
convolution at a time (``build("wide", num_ops=k)``, see ``topo_compiler.spaces.wide``);
each size is measured like a row of the main table, baseline against the compiled supernet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .configs import BASELINE, Configuration
from .progress import Progress
from .suite import Settings, Sizes, measure_space, space_work

__all__ = ["DEFAULT_NUM_OPS", "scaling_work", "scaling_curve", "plot_scaling"]

DEFAULT_NUM_OPS = (4, 6, 8, 10, 12, 14, 16)


def _configs(compiled: Configuration | None) -> tuple[Configuration, ...]:
    return (BASELINE,) if compiled is None else (BASELINE, compiled)


def scaling_work(num_ops: Sequence[int], compiled: Configuration | None,
                 settings: Settings) -> int:
    """Progress units :func:`scaling_curve` advances."""
    return len(num_ops) * space_work(_configs(compiled), settings)


def scaling_curve(num_ops: Sequence[int], sizes: Sizes, settings: Settings,
                  compiled: Configuration | None, progress: Progress) -> dict[str, Any]:
    """Measure the wide space at each number of candidates; ``compiled=None``: baseline only."""
    points = []
    for k in num_ops:
        result = measure_space("wide", _configs(compiled), sizes, settings, progress, num_ops=k)
        points.append({"num_ops": k, "rows": result["rows"]})
    return {"space": "wide", "sizes": dataclasses.asdict(sizes),
            "sizes_text": sizes.describe("wide"),
            "compiled": None if compiled is None else compiled.name, "points": points}


def _series(curve: dict[str, Any], config: str, metric: str, scale: float) -> list[float]:
    values = []
    for point in curve["points"]:
        row = next(r for r in point["rows"] if r["config"] == config)
        value = row.get(metric)
        values.append(float("nan") if value is None else value * scale)
    return values


def plot_scaling(curve: dict[str, Any], path: Path, title: str) -> str | None:
    """Draw saved MiB and step time against the number of candidates into ``path``.

    Returns ``None`` when written, else why not (matplotlib is optional).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    x = [p["num_ops"] for p in curve["points"]]
    names = ["baseline"] + ([curve["compiled"]] if curve["compiled"] else [])
    fig, (memory, step) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in names:
        memory.plot(x, _series(curve, name, "saved_bytes", 2 ** -20), marker="o", label=name)
        step.plot(x, _series(curve, name, "step_s", 1e3), marker="o", label=name)
    memory.set(xlabel="candidate operations", ylabel="saved activations (MiB)")
    step.set(xlabel="candidate operations", ylabel="search step (ms, median)")
    for axes in (memory, step):
        axes.grid(alpha=0.3)
        axes.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
