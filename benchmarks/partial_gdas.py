"""GDAS (AutoDL-Projects style) compiled partially: module counts, saved bytes, step time.

The root forward (Gumbel redraw loop) and the search cells (``.item()`` of each edge's
argmax, through ``forward_gdas``) run eagerly; stem, ResNet blocks, the last activation and
every candidate op are compiled.  Run: ``python -m benchmarks.partial_gdas``.
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings

import torch

from benchmarks.measure import (TrainingStep, interleaved_times, resident_tensors,
                                saved_activation_bytes)
from topo_compiler import compile_supernet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from supernets import gdas_autodl  # noqa: E402


def measure(exact: bool, C: int = 16, N: int = 2, batch: int = 16, rounds: int = 30) -> dict:
    torch.manual_seed(0)
    model = gdas_autodl.build(C=C, N=N)
    x = torch.randn(batch, 3, 16, 16)
    y = torch.randint(0, 10, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = compile_supernet(model, (x,), exact=exact)
    steps = {"eager": TrainingStep(model, model, x, y),
             "partial": TrainingStep(partial, model, x, y)}
    saved = {}
    for name, step in steps.items():
        torch.manual_seed(1)  # the same Gumbel draws, so the same ops run
        saved[name] = saved_activation_bytes(step, resident_tensors(model, x)).bytes
    def seeded(step):  # every configuration draws the same Gumbel noise: the same ops run
        def run():
            torch.manual_seed(2)
            step()
        return run

    steps["eager again"] = steps["eager"]  # the noise floor of the ratio
    times = interleaved_times({k: seeded(v) for k, v in steps.items()}, rounds=rounds,
                              warmup=3)
    median = {k: statistics.median(v) for k, v in times.items()}
    before, after = partial.report.counts()
    return {"exact": exact, "compiled": len(partial.report.compiled),
            "traced": len(partial.report.traced),
            "unreached": len(partial.report.unreached),
            "eager": len(partial.report.eager), "counts_before": str(before),
            "counts_after": str(after), "saved_ratio": saved["partial"] / saved["eager"],
            "time_ratio": median["partial"] / median["eager"],
            "noise_ratio": median["eager again"] / median["eager"],
            "eager_ms": median["eager"] * 1e3, "report": partial.report}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for exact in (True, False):
        r = measure(exact)
        print(f"exact={r['exact']}: {r['compiled']} modules compiled, {r['traced']} traced "
              f"(nothing to simplify, own forward), {r['eager']} eager, {r['unreached']} "
              f"not reached; "
              f"basic modules {r['counts_before']} -> {r['counts_after']}; saved bytes ratio "
              f"{r['saved_ratio']:.3f}; step time ratio {r['time_ratio']:.3f} "
              f"(eager {r['eager_ms']:.1f} ms; eager vs itself {r['noise_ratio']:.3f})")
    print(r["report"].to_markdown()[:1200])
