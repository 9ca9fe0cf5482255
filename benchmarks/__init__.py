"""The benchmark instrument of topo-compiler: what one search step costs, per configuration.

``python -m benchmarks.run`` builds each search space (NB201, DARTS, wide), compiles the
supernet once per configuration of the paper's ablation (baseline, PMS, FMS, PMS+FMS,
+merge, all; each also exact where that gives another graph) and measures one search step
of each: saved-activation bytes, peak memory, FLOPs, wall time (configurations interleaved in
one process) and the compile time.  It prints ratios to the baseline next to the paper's
figures and writes JSON and ``BENCHMARKS.md``.

Modules:

* :mod:`benchmarks.configs` -- the configurations, the paper's figures and the targets;
* :mod:`benchmarks.measure` -- the measuring functions (one search step each);
* :mod:`benchmarks.suite` -- one search space measured under every configuration;
* :mod:`benchmarks.scaling` -- the paper's Fig. 8: cost against the number of candidates;
* :mod:`benchmarks.peers` -- the same step under ``torch.compile`` (in a child process);
* :mod:`benchmarks.report` -- console tables, JSON and Markdown;
* :mod:`benchmarks.run` -- the command line.
"""
