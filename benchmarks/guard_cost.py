"""What checking a compiled supernet's guards adds to every call (issue 10).

Each call of a compiled supernet binds its arguments to the model's forward, checks the guards
of the variant that runs (one generated Python expression) and refreshes the numbers it reads
at run time.  This measures that work on its own, ``calls`` times in a row, and compares it
with one eager search step (forward, cross-entropy, backward) of the same model.

``python -m benchmarks.guard_cost`` prints the figure for the CPU DARTS supernet (8 cells);
``python -m benchmarks.run`` adds it to its report.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from topo_compiler import compile_supernet

from .measure import interleaved_times, logits_of
from .suite import Settings, Sizes, build_supernet

__all__ = ["measure_guard_cost", "guard_cost_line", "GUARD_SIZES"]

GUARD_SIZES = Sizes(batch=4, C=16, layers=8, resolution=16)
"""The CPU DARTS supernet of the benchmark (8 cells)."""


def measure_guard_cost(space: str = "darts", sizes: Sizes = GUARD_SIZES,
                       device: str = "cpu", calls: int = 2000, steps: int = 5) -> dict[str, Any]:
    """Guards of the first trace, microseconds per call spent on them, the eager step."""
    settings = Settings(torch.device(device), steps=steps, warmup=1, compiles=1)
    model, inputs, target = build_supernet(space, sizes, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, inputs, passes=())  # guards do not depend on passes
    dispatch = compiled.__dict__["_dispatch"]
    variant = dispatch.variants[0]
    args: tuple = (inputs,)

    def guard_work() -> None:
        a = dispatch.signature.bind(args, {})
        if not variant.guards.check(a):
            raise AssertionError("the guards of an unchanged model must hold")
        variant.guards.refresh()

    per_call = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            guard_work()
        per_call.append((time.perf_counter() - start) / calls)

    def eager_step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model(inputs)), target).backward()

    times = interleaved_times({"eager": eager_step}, rounds=steps, warmup=1)["eager"]
    check_s = min(per_call)  # the least disturbed batch of calls on a shared machine
    step_s = statistics.median(times)
    return {"space": space, "sizes_text": sizes.describe(space), "device": device,
            "guards": len(variant.guards.guards), "check_us": check_s * 1e6,
            "eager_step_ms": step_s * 1e3, "fraction": check_s / step_s}


def guard_cost_line(cost: dict[str, Any]) -> str:
    return (f"Guard check per call ({cost['space']}, {cost['sizes_text']}, "
            f"{cost['device'].upper()}): {cost['check_us']:.1f} µs for {cost['guards']} guards, "
            f"{100 * cost['fraction']:.3f}% of the eager step ({cost['eager_step_ms']:.1f} ms).")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(guard_cost_line(measure_guard_cost()))
