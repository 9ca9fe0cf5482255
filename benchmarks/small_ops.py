"""``python -m benchmarks.small_ops``: CPU step time of the compiled supernet with and without
the lowering preparation of issue 13 (merged repeated computations, weight program, dropped
identities), against eager.

One process, one supernet per space, the modules timed round-robin
(``benchmarks.measure.interleaved_times``), medians; sizes are ``benchmarks.run``'s CPU
sizes.  "before" compiles with :func:`topo_compiler.vectorize.vectorize_weights`,
:func:`~topo_compiler.vectorize.drop_identity_arithmetic` and the lowering's one-attribute
module access (``lower._shorten_attribute_chains``) switched off, so the two compiled modules
differ only there; "no CSE" has everything but
:func:`~topo_compiler.cse.eliminate_common_subexpressions` and
:func:`~topo_compiler.kernel_batching.batch_kernel_arithmetic`, "no batching" everything but
the latter (each step's own before/after).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

import torch

from topo_compiler import compile_supernet

from .configs import CONFIGURATIONS, full_method
from .measure import TrainingStep, interleaved_times
from .run import DEFAULT_SIZES
from .suite import Settings, build_supernet


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_ops")
    p.add_argument("--spaces", default="darts,nb201")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--exact", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = full_method(CONFIGURATIONS)
    settings = Settings(torch.device("cpu"), steps=args.steps, warmup=args.warmup, compiles=1)
    results = {}
    for space in args.spaces.split(","):
        model, x, y = build_supernet(space, DEFAULT_SIZES["cpu"][space], settings)
        kw = dict(passes=config.passes, exact=args.exact)
        with mock.patch("topo_compiler.api.vectorize_weights", lambda ir: None), \
                mock.patch("topo_compiler.api.drop_identity_arithmetic", lambda ir: 0), \
                mock.patch("topo_compiler.api.eliminate_common_subexpressions", lambda ir: 0), \
                mock.patch("topo_compiler.api.batch_kernel_arithmetic", lambda ir: None), \
                mock.patch("topo_compiler.lower._shorten_attribute_chains",
                           lambda gm, graph: None):
            before = compile_supernet(model, x, **kw)
        assert "getattr(" in before.code and "getattr(" not in \
            compile_supernet(model, x, **kw).code
        with mock.patch("topo_compiler.api.batch_kernel_arithmetic", lambda ir: None):
            with mock.patch("topo_compiler.api.eliminate_common_subexpressions", lambda ir: 0):
                no_cse = compile_supernet(model, x, **kw)
            no_batching = compile_supernet(model, x, **kw)
        after = compile_supernet(model, x, **kw)
        steps = {name: TrainingStep(m, model, x, y)
                 for name, m in (("eager", model), ("before", before), ("no CSE", no_cse),
                                 ("no batching", no_batching), ("after", after))}
        times = interleaved_times(steps, args.steps, args.warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[space] = med
        print(f"{space} ({DEFAULT_SIZES['cpu'][space].describe(space)}, "
              f"{'exact' if args.exact else config.name}): eager {med['eager'] * 1e3:.0f} ms, "
              f"compiled before {med['before'] * 1e3:.0f} ms "
              f"({med['before'] / med['eager']:.2f}), without CSE (and batching) "
              f"{med['no CSE'] * 1e3:.0f} ms "
              f"({med['no CSE'] / med['eager']:.2f}), without kernel batching "
              f"{med['no batching'] * 1e3:.0f} ms ({med['no batching'] / med['eager']:.2f}), "
              f"after {med['after'] * 1e3:.0f} ms "
              f"({med['after'] / med['eager']:.2f}); {'; '.join(after.report.lowering)}",
              flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
