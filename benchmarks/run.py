"""``python -m benchmarks.run``: measure a search step of every space under every configuration.

Examples::

    python -m benchmarks.run --markdown BENCHMARKS.md            # the CPU report (~minutes)
    python -m benchmarks.run --quick                             # smoke run, seconds
    python -m benchmarks.run --spaces darts --configs traced,all --no-peers
    python -m benchmarks.run --spaces "" --scaling --markdown BENCHMARKS.md  # Fig. 8 only
    python -m benchmarks.run --device cuda --out "$OUT"          # same code on a GPU

Sizes (``--batch``, ``--C``, ``--layers``, ``--resolution``) take one number for every space
or ``space=number`` pairs, e.g. ``--layers darts=8,wide=5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from topo_compiler.passes import PASSES

from topo_compiler.spaces import SPACES

from .configs import CONFIGURATIONS, Configuration, full_method, select
from .guard_cost import measure_guard_cost
from .peers import measure_peers
from .progress import Progress
from .report import (
    machine_info,
    run_section,
    scaling_section,
    source_revision,
    write_json,
    write_markdown,
)
from .scaling import DEFAULT_NUM_OPS, plot_scaling, scaling_curve, scaling_work
from .suite import Settings, Sizes, measure_space, space_work

__all__ = ["main", "parse_args", "DEFAULT_SIZES"]

DEFAULT_SIZES: dict[str, dict[str, Sizes]] = {
    # 1 thread, 0.5-1 s per baseline step: a full run with every pass stays under ~10 min
    "cpu": {"nb201": Sizes(batch=8, C=16, layers=5, resolution=32),
            "darts": Sizes(batch=4, C=16, layers=8, resolution=16),
            "wide": Sizes(batch=4, C=8, layers=3, resolution=16)},
    # the paper's setting: batch 64, C=16, 8 DARTS cells, 5 NB201 cells per stage
    "cuda": {"nb201": Sizes(batch=64, C=16, layers=5, resolution=32),
             "darts": Sizes(batch=64, C=16, layers=8, resolution=32),
             "wide": Sizes(batch=64, C=16, layers=3, resolution=32)},
    # smoke sizes: 1 wide cell is a reduction cell only (its normal alphas get no gradient)
    "quick": {"nb201": Sizes(batch=2, C=4, layers=1, resolution=8),
              "darts": Sizes(batch=2, C=4, layers=3, resolution=8),
              "wide": Sizes(batch=2, C=4, layers=1, resolution=8)},
}

_ROUNDS = {"full": dict(steps=5, warmup=1, compiles=3),
           "quick": dict(steps=2, warmup=1, compiles=1)}
_PEER_TIMEOUT = {"cpu": 90.0, "cuda": 120.0}
_PEER_SPACES = {"cpu": ["nb201"], "cuda": ["nb201", "darts", "wide"]}
"""On CPU, torch.compile of the DARTS and wide supernets takes minutes on a cold cache."""


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPACES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown space(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(SPACES)}")
    return names


def _per_space(text: str) -> dict[str, int]:
    """``"8"`` -> every space 8; ``"darts=8,wide=5"`` -> those spaces only."""
    if "=" not in text:
        return {space: int(text) for space in SPACES}
    pairs = dict(item.split("=", 1) for item in text.split(",") if item.strip())
    unknown = [s for s in pairs if s not in SPACES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown space(s) {', '.join(unknown)}")
    return {space: int(value) for space, value in pairs.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spaces", type=_name_list, default=["nb201", "darts", "wide"],
                   help="comma list of search spaces (default: nb201,darts,wide; \"\" with "
                        "--scaling: the scaling curve only)")
    p.add_argument("--configs", default=None,
                   help="comma list of configurations (default: all; --quick: traced and the "
                        "full method; baseline always runs)")
    for name, what in (("batch", "batch size"), ("C", "initial channels"),
                       ("layers", "cells (NB201: cells per stage)"),
                       ("resolution", "input height and width")):
        p.add_argument(f"--{name}", type=_per_space, default={},
                       help=f"{what}: N, or space=N pairs (default: per device)")
    p.add_argument("--steps", type=int, help="timed rounds (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up rounds (default 1; --quick 1)")
    p.add_argument("--compiles", type=int,
                   help="at most this many compiles per configuration, fewer once they add up "
                        "to 5 s; the median is reported (default 3; --quick 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int,
                   help="intra-op threads (default on CPU: 1, the steadiest timing on a "
                        "small shared machine; on CUDA: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="directory for benchmarks-<device>.json")
    p.add_argument("--markdown", type=Path, help="(re)write this run's sections of this file")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 3 configurations, 1 compile, 2 rounds, no peers: a smoke "
                        "run in seconds")
    p.add_argument("--no-peers", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--peer-spaces", type=_name_list,
                   help="spaces to run peers on, if measured (default: CPU nb201, CUDA all)")
    p.add_argument("--peer-timeout", type=float,
                   help="seconds per peer child process (default: CPU 90, CUDA 120)")
    p.add_argument("--scaling", action="store_true",
                   help="also measure the wide space from 4 to 16 candidates (Fig. 8)")
    p.add_argument("--scaling-ops", type=_int_list, default=list(DEFAULT_NUM_OPS),
                   help="numbers of candidates for --scaling (default 4,6,...,16)")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/scaling.png"),
                   help="where --scaling draws its PNG")
    return p.parse_args(argv)


def _sizes(args: argparse.Namespace) -> dict[str, Sizes]:
    defaults = DEFAULT_SIZES["quick" if args.quick else args.device]
    sizes = {}
    for space, base in defaults.items():
        fields = {f: getattr(args, f)[space] for f in ("batch", "C", "layers", "resolution")
                  if space in getattr(args, f)}
        sizes[space] = dataclasses.replace(base, **fields)
    return sizes


def _settings(args: argparse.Namespace) -> Settings:
    rounds = dict(_ROUNDS["quick" if args.quick else "full"])
    rounds.update({k: getattr(args, k) for k in rounds if getattr(args, k) is not None})
    return Settings(torch.device(args.device), **rounds, seed=args.seed)


def _configs(args: argparse.Namespace) -> tuple[Configuration, ...]:
    """The configurations asked for; ``--quick`` alone: baseline, traced, the full method."""
    if args.configs is not None or not args.quick:
        return select(args.configs)
    full = full_method(CONFIGURATIONS)
    return select(",".join(["traced"] + ([full.name] if full else [])))


def _peer_module(configs: Sequence[Configuration]) -> Configuration | None:
    """The compiled supernet the peers compile: the full method, else the traced one."""
    return full_method(configs) or next((c for c in configs if c.passes == ()), None)


def _command(argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m benchmarks.run", *map(shlex.quote, args)])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables, write JSON (and Markdown); return the result."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    configs, settings, sizes = _configs(args), _settings(args), _sizes(args)
    peer_spaces = [] if args.no_peers or args.quick else [
        s for s in args.peer_spaces or _PEER_SPACES[args.device] if s in args.spaces]
    peer_timeout = args.peer_timeout or _PEER_TIMEOUT[args.device]
    scaled = full_method(configs)
    work = sum(space_work(configs, settings) for _ in args.spaces) + 2 * len(peer_spaces)
    if args.scaling:
        work += scaling_work(args.scaling_ops, scaled, settings)
    revision = source_revision()  # why: before measuring, the checkout may move meanwhile
    progress = Progress(work)
    durations: dict[str, float] = {}
    clock = time.perf_counter()

    spaces = [measure_space(s, configs, sizes[s], settings, progress) for s in args.spaces]
    durations["spaces"], clock = time.perf_counter() - clock, time.perf_counter()
    peers = None
    if peer_spaces:
        peers = [row for s in peer_spaces for row in measure_peers(
            s, sizes[s], settings, threads, _peer_module(configs), peer_timeout, progress)]
    durations["peers"], clock = time.perf_counter() - clock, time.perf_counter()
    curve = (scaling_curve(args.scaling_ops, sizes["wide"], settings, scaled, progress)
             if args.scaling else None)
    durations["scaling"], clock = time.perf_counter() - clock, time.perf_counter()
    progress.close()
    # guard checks per call on the CPU DARTS supernet (8 cells), whatever the run's sizes
    guards = measure_guard_cost(device=args.device) if "darts" in args.spaces else None
    durations["guards"] = time.perf_counter() - clock

    meta = {"machine": machine_info(settings.device), "command": _command(argv),
            "revision": revision,
            "passes_available": list(PASSES), "steps": settings.steps,
            "warmup": settings.warmup, "compiles": settings.compiles,
            "compile_budget_s": settings.compile_budget_s, "seed": settings.seed,
            "durations_s": durations}
    result = {"meta": meta, "spaces": spaces, "peers": peers, "scaling": curve,
              "guards": guards,
              "peers_note": _peers_note(args, peer_spaces, peer_timeout, settings)}
    _write(args, result)
    return result


def _peers_note(args: argparse.Namespace, peer_spaces: list[str], timeout: float,
                settings: Settings) -> str:
    if not peer_spaces:
        return "Not run (`--no-peers`, `--quick`, or no space of `--peer-spaces` measured)."
    skipped = [s for s in args.spaces if s not in peer_spaces]
    not_run = (f" Not run for {', '.join(skipped)} (default on CPU: nb201 only, torch.compile "
               f"of the larger supernets takes minutes here; add them with `--peer-spaces`)."
               if skipped else "")
    return (f"Each peer runs in a child process limited to {timeout:.0f} s (its compile, "
            f"{settings.warmup}+{settings.steps} interleaved rounds with the eager baseline, "
            f"then one saved-bytes and one peak step); ratios are to the eager baseline "
            f"measured in that child. Inductor's on-disk cache is used as found: on a cold "
            f"cache the first call is much slower than on a warm one.{not_run}")


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the sections; write the JSON files, the plot and the Markdown."""
    device, sections, files = args.device, {}, {}
    if result["spaces"]:
        sections[device] = run_section(result)
        files[f"benchmarks-{device}.json"] = dict(result, scaling=None)
    if result["scaling"] is not None:
        failure = plot_scaling(result["scaling"], args.plot,
                               f"wide space, {result['scaling']['sizes_text']}, {device}")
        print(failure or f"wrote {args.plot}", file=sys.stderr)
        plot = None
        if failure is None and args.markdown is not None:
            plot = os.path.relpath(args.plot.resolve(), args.markdown.resolve().parent)
        sections[f"{device}-scaling"] = scaling_section(result, plot)
        files[f"scaling-{device}.json"] = {"meta": result["meta"], "scaling": result["scaling"]}
    for text in sections.values():
        print(text, end="\n\n")
    for name, content in files.items():
        write_json(args.out / name, content)
        print(f"wrote {args.out / name}", file=sys.stderr)
    if args.markdown is not None:
        write_markdown(args.markdown, sections)
        print(f"wrote {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
