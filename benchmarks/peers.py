"""Peers: the same search step under ``torch.compile``, of the baseline and the compiled supernet.

Each peer runs in a child process (``python -m benchmarks.peers SPEC``) with a wall-clock
limit: ``torch.compile`` of a whole supernet's forward and backward can take minutes (on a
cold inductor cache on CPU, many), and a thread cannot be stopped, a process group can.  The
child measures the eager baseline too, interleaved with the peer, so the ratios it reports
hold within its own process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from topo_compiler import compile_supernet

from .configs import Configuration
from .measure import (
    TrainingStep,
    interleaved_times,
    resident_tensors,
    saved_activation_bytes,
    step_peak_bytes,
    synchronizer,
)
from .progress import Progress
from .suite import Settings, Sizes, build_supernet

__all__ = ["peer_specs", "run_peer", "measure_peer", "measure_peers"]

_ROOT = Path(__file__).resolve().parent.parent
_RATIOS = {"step_s": "time_ratio", "saved_bytes": "saved_ratio", "peak_bytes": "peak_ratio"}


def peer_specs(space: str, sizes: Sizes, settings: Settings, threads: int | None,
               compiled: Configuration | None) -> list[dict[str, Any]]:
    """What each child measures: ``torch.compile`` of the baseline, then of ``compiled``."""
    common = {"space": space, "sizes": dataclasses.asdict(sizes),
              "device": str(settings.device), "steps": settings.steps,
              "warmup": settings.warmup, "seed": settings.seed, "threads": threads}
    specs = [dict(common, peer="torch.compile(baseline)", config=None)]
    if compiled is not None:
        config = {"passes": list(compiled.passes), "exact": compiled.exact}
        specs.append(dict(common, peer=f"torch.compile({compiled.name})", config=config))
    return specs


def run_peer(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one peer in a child process; on a timeout or a crash, say so in the row."""
    row = {"space": spec["space"], "peer": spec["peer"]}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", json.dumps(spec)],
                             cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # why: inductor's compile workers too
        child.communicate()
        return dict(row, status="timed out",
                    note=f"no result within {timeout:.0f} s (compile and measurement)")
    row["wall_s"] = time.perf_counter() - start
    if child.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return dict(row, status="failed", note=lines[-1] if lines else f"exit {child.returncode}")
    return dict(row, **json.loads(out.strip().splitlines()[-1]))


def measure_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: the eager baseline and the ``torch.compile``-d module, interleaved."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    settings = Settings(torch.device(spec["device"]), steps=spec["steps"],
                        warmup=spec["warmup"], compiles=1, seed=spec["seed"])
    model, inputs, target = build_supernet(spec["space"], Sizes(**spec["sizes"]), settings)
    config = spec["config"]
    module = model if config is None else compile_supernet(model, inputs, **config)
    steps = {"baseline": TrainingStep(model, model, inputs, target),
             "peer": TrainingStep(torch.compile(module), model, inputs, target)}
    sync = synchronizer(settings.device)
    sync()
    start = time.perf_counter()
    steps["peer"]()
    sync()
    first_call = time.perf_counter() - start
    times = interleaved_times(steps, settings.steps, settings.warmup, sync)
    resident = resident_tensors(model, inputs, target)
    figures = {"status": "measured", "first_call_s": first_call}
    for name, step in steps.items():
        prefix = "baseline_" if name == "baseline" else ""
        figures[prefix + "step_s"] = statistics.median(times[name])
        figures[prefix + "saved_bytes"] = saved_activation_bytes(step, resident).bytes
        step.clear_gradients()
        figures[prefix + "peak_bytes"] = step_peak_bytes(step, settings.device)
    for metric, ratio in _RATIOS.items():
        base, value = figures["baseline_" + metric], figures[metric]
        figures[ratio] = value / base if base and value is not None else None
    return figures


def measure_peers(space: str, sizes: Sizes, settings: Settings, threads: int | None,
                  compiled: Configuration | None, timeout: float,
                  progress: Progress) -> list[dict[str, Any]]:
    """Every peer of ``space``, one child process each."""
    rows = []
    for spec in peer_specs(space, sizes, settings, threads, compiled):
        rows.append(run_peer(spec, timeout))
        progress.advance(f"{space}: {spec['peer']}")
    return rows


def main(argv: Sequence[str]) -> None:
    print(json.dumps(measure_peer(json.loads(argv[0]))))


if __name__ == "__main__":
    main(sys.argv[1:])
