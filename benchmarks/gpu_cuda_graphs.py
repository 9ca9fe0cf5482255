"""``python -m benchmarks.gpu_cuda_graphs``: the CUDA-graph rows of issue 13, every peer, one run.

Per space (paper sizes by default: batch 64, C=16, 32x32; DARTS 8 cells, NB201 5 cells per
stage, wide 5 cells), one search step (zero_grad(set_to_none), forward, cross-entropy,
backward) of:

* ``eager``; ``eager, captured by hand``: PyTorch's whole-network recipe (warm-up on a side
  stream, ``torch.cuda.graph`` around forward, loss and backward, then ``replay``), the peer a
  user could write without this project;
* ``compiled`` (default pipeline), ``compiled, cuda_graphs`` (``compile_supernet(...,
  cuda_graphs=...)``), ``compiled, captured by hand`` (the same recipe as the eager row);
* ``exact``, ``exact, cuda_graphs``;
* the same under bf16 autocast, and with a channels_last model and batch;
* ``torch.compile`` (inductor, default mode) of the eager and of the compiled supernet, each in a
  child process after the rows above, all children at once, each with up to
  ``--peer-timeout`` seconds (and no more than the budget leaves) for its compile, first call
  and measurement; a child without a result is recorded as "no result within N s".

Rows of one space share one supernet (the channels_last rows a second one with the same
initial weights) and are timed round-robin (``benchmarks.measure.interleaved_times``).  First
call: the first step of the row (capture included for captured rows; compile time apart).
Peak: ``max_memory_allocated`` during one step above the memory allocated when it starts, plus
the memory a captured row keeps between steps (its graphs' pools and static tensors).

Writes ``cuda-graphs.json`` and ``BENCHMARKS-cuda-graphs.md`` (a ``BENCHMARKS.md`` section)
under ``--out``.  ``--device cpu --quick`` is a dry run of the same code on a CPU: the rows
that need CUDA say so, the ``cuda_graphs`` rows run uncaptured and count why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from topo_compiler import compile_supernet
from topo_compiler.cuda_graphs import CudaGraphOptions

from .configs import CONFIGURATIONS, full_method
from .measure import interleaved_times, logits_of, step_peak_bytes, synchronizer
from .peers import peer_specs
from .report import machine_info, source_revision, write_json, write_markdown
from .suite import Settings, Sizes, build_supernet

__all__ = ["main", "SIZES"]

SIZES = {"paper": {"darts": Sizes(batch=64, C=16, layers=8, resolution=32),
                   "nb201": Sizes(batch=64, C=16, layers=5, resolution=32),
                   "wide": Sizes(batch=64, C=16, layers=5, resolution=32)},
         "quick": {"darts": Sizes(batch=2, C=4, layers=3, resolution=8),
                   "nb201": Sizes(batch=2, C=4, layers=1, resolution=8),
                   "wide": Sizes(batch=2, C=4, layers=2, resolution=8)}}
_ROOT = Path(__file__).resolve().parent.parent
OPTIONS = CudaGraphOptions(warmup=2, capture_on_call=1, warn=False)


@dataclasses.dataclass
class Row:
    """One measured way of running the step."""

    name: str
    step: Callable[[], None] | None
    first_call_s: float | None = None
    compile_s: float | None = None
    kept_bytes: int = 0
    """Memory the row keeps between steps (captured graphs' pools and static tensors)."""
    status: str = "measured"
    note: str = ""
    stats: Any = None


def _step(module: Callable[..., Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
          autocast: bool = False) -> Callable[[], None]:
    device = x.device.type

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(logits_of(module(x)), y)
        loss.backward()
    return step


def _captured_by_hand(module: Callable[..., Any], model: torch.nn.Module, x: torch.Tensor,
                      y: torch.Tensor, warmup: int = 3) -> tuple[Callable[[], None], Any]:
    """PyTorch's whole-network capture of one step (docs, "CUDA Graphs", whole-network
    capture): the batch and the gradients are the graph's static tensors."""
    static_x, static_y = x.clone(), y.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits_of(module(static_x)), static_y).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = F.cross_entropy(logits_of(module(static_x)), static_y)
        static_loss.backward()
    model.zero_grad(set_to_none=True)  # why: the other rows must not see its static .grad
    return graph.replay, (graph, static_x, static_y, static_loss)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def _rows(space: str, sizes: Sizes, settings: Settings, keep: list[Any]) -> list[Row]:
    """Build (compile, capture, first call) every row of ``space``."""
    device, sync = settings.device, synchronizer(settings.device)
    cuda = device.type == "cuda"
    model, x, y = build_supernet(space, sizes, settings)
    model_cl, _, _ = build_supernet(space, sizes, settings)
    model_cl = model_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rows: list[Row] = []

    def add(name: str, make: Callable[[], tuple[Callable[[], None], float | None, Any]],
            needs_cuda: bool = False) -> Any:
        if needs_cuda and not cuda:
            rows.append(Row(name, None, status="not run", note="needs CUDA"))
            return None
        before = _allocated(device)
        try:
            step, compile_s, extra = make()
            _, first = _timed(step, sync)
        except Exception as error:  # why: one failing row must not hide the others
            traceback.print_exc()
            rows.append(Row(name, None, status="failed", note=_reason(error)))
            return None
        row = Row(name, step, first, compile_s)
        if isinstance(extra, dict) and "stats" in extra:
            row.stats = extra["stats"]
        if name.endswith("by hand") or "cuda_graphs" in name:
            model.zero_grad(set_to_none=True)
            model_cl.zero_grad(set_to_none=True)
            sync()
            row.kept_bytes = max(_allocated(device) - before, 0)
        keep.append(extra)
        rows.append(row)
        return extra

    def compiled(m: torch.nn.Module, inp: torch.Tensor, exact: bool, graphs: bool) -> tuple:
        start = time.perf_counter()
        module = compile_supernet(m, inp, exact=exact, cuda_graphs=OPTIONS if graphs else False)
        return module, time.perf_counter() - start

    mods: dict[str, Any] = {}

    def compiled_row(key: str, m, inp, exact: bool, graphs: bool, amp: bool = False):
        def make():
            seconds = None
            if key not in mods:
                mods[key] = compiled(m, inp, exact, graphs)
                seconds = mods[key][1]
            module = mods[key][0]
            stats = module.cuda_graphs.stats if graphs else None
            return _step(module, m, inp, y, amp), seconds, {"module": module, "stats": stats}
        return make

    add("eager", lambda: (_step(model, model, x, y), None, None))
    add("eager, captured by hand",
        lambda: (lambda r: (r[0], None, r[1]))(_captured_by_hand(model, model, x, y)),
        needs_cuda=True)
    add("compiled", compiled_row("compiled", model, x, False, False))
    add("compiled, cuda_graphs", compiled_row("compiled+graphs", model, x, False, True))
    add("compiled, captured by hand",
        lambda: (lambda r: (r[0], None, r[1]))(_captured_by_hand(mods["compiled"][0], model,
                                                                  x, y)),
        needs_cuda=True)
    add("exact", compiled_row("exact", model, x, True, False))
    add("exact, cuda_graphs", compiled_row("exact+graphs", model, x, True, True))
    add("eager, bf16", lambda: (_step(model, model, x, y, True), None, None))
    add("compiled, bf16", compiled_row("compiled", model, x, False, False, True))
    add("compiled, bf16, cuda_graphs", compiled_row("compiled+graphs", model, x, False, True,
                                                    True))
    add("eager, channels_last", lambda: (_step(model_cl, model_cl, x_cl, y), None, None))
    add("compiled, channels_last", compiled_row("cl", model_cl, x_cl, False, False))
    add("compiled, channels_last, cuda_graphs", compiled_row("cl+graphs", model_cl, x_cl,
                                                             False, True))
    return rows


def _peak(step: Callable[[], None], device: torch.device) -> int | None:
    """CUDA peak bytes of one step (the CPU dry run reports none: its profiler pass is slow)."""
    return step_peak_bytes(step, device) if device.type == "cuda" else None


def measure_space(space: str, sizes: Sizes, settings: Settings) -> dict[str, Any]:
    keep: list[Any] = []
    start = time.perf_counter()
    rows = _rows(space, sizes, settings, keep)
    built = time.perf_counter() - start
    steps = {r.name: r.step for r in rows if r.step is not None}
    times = interleaved_times(steps, settings.steps, settings.warmup,
                              synchronizer(settings.device))
    out = []
    for r in rows:
        entry = {"name": r.name, "status": r.status, "note": r.note,
                 "first_call_s": r.first_call_s, "compile_s": r.compile_s,
                 "kept_bytes": r.kept_bytes}
        if r.step is not None:
            entry["step_s"] = statistics.median(times[r.name])
            entry["step_samples"] = times[r.name]
            peak = _peak(r.step, settings.device)
            entry["peak_bytes"] = None if peak is None else peak + r.kept_bytes
        if r.stats is not None:
            entry["cuda_graphs"] = r.stats.as_dict()
            entry["cuda_graphs_summary"] = r.stats.summary()
        out.append(entry)
    _ratios(out)
    keep.clear()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"space": space, "sizes": dataclasses.asdict(sizes),
            "sizes_text": sizes.describe(space), "rows": out,
            "seconds": time.perf_counter() - start, "build_seconds": built}


def _ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["name"]: r for r in rows}
    for r in rows:
        eager = by["eager, bf16"] if "bf16" in r["name"] else \
            by["eager, channels_last"] if "channels_last" in r["name"] else by["eager"]
        hand = by.get("eager, captured by hand")
        for key, base in (("time_ratio", eager), ("time_vs_eager_captured", hand)):
            ok = r.get("step_s") and base and base.get("step_s")
            r[key] = r["step_s"] / base["step_s"] if ok else None
        ok = r.get("peak_bytes") and eager.get("peak_bytes")
        r["peak_ratio"] = r["peak_bytes"] / eager["peak_bytes"] if ok else None


def run_peers(spaces: Sequence[str], sizes: dict[str, Sizes], settings: Settings,
              timeout: float) -> list[dict[str, Any]]:
    """Every ``torch.compile`` peer, all child processes at once, each killed at ``timeout``."""
    compiled = full_method(CONFIGURATIONS)
    specs = [s for space in spaces
             for s in peer_specs(space, sizes[space], settings, None, compiled)]
    threads = max(1, (os.cpu_count() or 2) // max(len(specs), 1))
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(threads))
    children = []
    for spec in specs:
        children.append((spec, time.perf_counter(), subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peers", json.dumps(spec)], cwd=_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)))
    rows = []
    deadline = time.perf_counter() + timeout
    for spec, started, child in children:
        row = {"space": spec["space"], "peer": spec["peer"], "timeout_s": timeout,
               "concurrent_children": len(children)}
        try:
            out, err = child.communicate(timeout=max(deadline - time.perf_counter(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # why: inductor's compile workers too
            child.communicate()
            rows.append(dict(row, status="timed out",
                             note=f"no result within {timeout:.0f} s (compile, first call "
                                  f"and measurement)"))
            continue
        row["wall_s"] = time.perf_counter() - started
        if child.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            rows.append(dict(row, status="failed",
                             note=lines[-1][:200] if lines else f"exit {child.returncode}"))
        else:
            rows.append(dict(row, **json.loads(out.strip().splitlines()[-1])))
    return rows


def check(device: torch.device, spaces: Sequence[str] = ("darts", "nb201")) -> list[str]:
    """The alternating DARTS loop (tests/alternating.py), captured against uncaptured: the
    largest differences of losses, gradients and buffers, and what the capture counted."""
    sys.path.insert(0, str(_ROOT / "tests"))
    from alternating import batches, fresh_model, run_loop

    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    lines = []
    try:
        for space in spaces:
            data = batches(space, 3, batch=4, resolution=16, device=device.type)
            runs, stats = [], None
            for graphs in (False, OPTIONS):
                model = fresh_model(space, device.type)
                module = compile_supernet(model, data[0][0], cuda_graphs=graphs)
                runs.append(run_loop(model, module, data))
                stats = module.cuda_graphs.stats if graphs else stats
            diff = {"loss": 0.0, "grads": 0.0, "buffers": 0.0}
            none_mismatch = 0
            for e, a in zip(*runs):
                diff["loss"] = max(diff["loss"], (e["loss"] - a["loss"]).abs().item())
                for n, g in e["grads"].items():
                    h = a["grads"][n]
                    if (g is None) != (h is None):
                        none_mismatch += 1
                    elif g is not None:
                        diff["grads"] = max(diff["grads"], (g - h).abs().max().item())
                for n, b in e["buffers"].items():
                    d = (b.double() - a["buffers"][n].double()).abs().max().item()
                    diff["buffers"] = max(diff["buffers"], d)
            lines.append(f"{space}: {len(runs[0])} alternating steps, max |diff| loss "
                         f"{diff['loss']:.1e}, grads {diff['grads']:.1e}, buffers "
                         f"{diff['buffers']:.1e}, grads None in one run only: {none_mismatch}; "
                         + "; ".join(stats.summary()))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    return lines


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def section(result: dict[str, Any]) -> str:
    meta = result["meta"]
    m = meta["machine"]
    where = f"{m.get('gpu', 'CPU')} (CUDA {m.get('cuda')}), host " if m["device"] == "cuda" \
        else ""
    lines = ["## CUDA graphs (issue 13)", "",
             f"Machine: {where}{m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}.",
             "", f"Command: `{meta['command']}` at commit {meta['revision']}. "
             f"Step time: median of {meta['steps']} interleaved rounds after {meta['warmup']} "
             f"warm-up round(s). Run time: {meta['seconds']:.0f} s.", "",
             "Ratios: to the eager row of the same precision and layout (`/ eager`) and to the "
             "eager supernet captured by hand (`/ eager captured`). First call: the row's first "
             "step, capture included (compile apart). Peak: above the memory allocated at the "
             "step's start, plus what a captured row keeps between steps.", ""]
    head = ["space", "row", "step (ms)", "/ eager", "/ eager captured", "peak (MiB)",
            "peak / eager", "first call (s)", "compile (s)", "note"]
    lines += [f"| {' | '.join(head)} |", "|" + "---|" * 2 + "---:|" * 7 + "---|"]
    for sp in result["spaces"]:
        for r in sp["rows"]:
            note = r["note"]
            if r.get("cuda_graphs"):
                cg = r["cuda_graphs"]
                note = (f"{len([c for c in cg['captures'] if c['status'] == 'captured'])} "
                        f"capture(s), {cg['replays']} replays, "
                        f"{sum(cg['fallbacks'].values())} uncaptured")
                if cg["fallbacks"]:
                    note += ": " + "; ".join(f"{k} x{v}" for k, v in cg["fallbacks"].items())
            lines.append("| " + " | ".join([
                sp["space"], r["name"], _f(r.get("step_s") and r["step_s"] * 1e3, "{:.1f}"),
                _f(r.get("time_ratio")), _f(r.get("time_vs_eager_captured")),
                _f(r.get("peak_bytes") and r["peak_bytes"] / 2 ** 20, "{:.0f}"),
                _f(r.get("peak_ratio")), _f(r.get("first_call_s")), _f(r.get("compile_s")),
                note if r["status"] == "measured" else f"{r['status']}: {note}"]) + " |")
    lines += ["", "Sizes: " + "; ".join(f"{sp['space']} {sp['sizes_text']}"
                                        for sp in result["spaces"]) + ".", ""]
    if result.get("check"):
        lines += ["### Captured == uncaptured (DARTS alternating loop, batch 4, 16x16)", ""]
        lines += [f"- {line}" for line in result["check"]] + [""]
    lines += ["### torch.compile peers", "", result["peers_note"], ""]
    if result["peers"]:
        lines += ["| space | peer | status | first call (s) | step (ms) | / eager (in child) "
                  "| peak / eager | note |", "|---|---|---|---:|---:|---:|---:|---|"]
        for p in result["peers"]:
            lines.append("| " + " | ".join([
                p["space"], p["peer"], p["status"], _f(p.get("first_call_s")),
                _f(p.get("step_s") and p["step_s"] * 1e3, "{:.1f}"), _f(p.get("time_ratio")),
                _f(p.get("peak_ratio")), p.get("note", "")]) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_cuda_graphs",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a dry run)")
    p.add_argument("--spaces", default="darts,nb201,wide")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of the whole run; the peers get what is left "
                        "(at most --peer-timeout each, all at once)")
    p.add_argument("--peer-timeout", type=float, default=300.0)
    p.add_argument("--peer-spaces", default="darts,nb201,wide")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-check", action="store_true",
                   help="skip the captured == uncaptured check of the alternating loop")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results"))
                   / "cuda-graphs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    began = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(1)
    settings = Settings(torch.device(args.device), steps=args.steps, warmup=args.warmup,
                        compiles=1)
    sizes = SIZES["quick" if args.quick else "paper"]
    revision = source_revision()
    checked = check(settings.device) if not args.no_check else []
    spaces = []
    for space in [s for s in args.spaces.split(",") if s]:
        print(f"[{time.perf_counter() - began:.0f} s] {space}", file=sys.stderr, flush=True)
        spaces.append(measure_space(space, sizes[space], settings))
    left = args.budget_s - (time.perf_counter() - began) - 10
    timeout = min(args.peer_timeout, left)
    peer_spaces = [s for s in args.peer_spaces.split(",") if s]
    peers, note = None, "Not run (`--no-peers`)."
    if not args.no_peers:
        if timeout < 30:
            note = f"Not run: the budget left {max(left, 0):.0f} s."
        else:
            print(f"[{time.perf_counter() - began:.0f} s] torch.compile peers, {timeout:.0f} s",
                  file=sys.stderr, flush=True)
            peers = run_peers(peer_spaces, sizes, settings, timeout)
            note = (f"Each peer runs in its own child process, all {len(peers)} at once after "
                    f"the rows above, each limited to {timeout:.0f} s (compile, first call, "
                    f"{settings.warmup}+{settings.steps} interleaved rounds with the eager "
                    f"baseline measured in that child); ratios are to that baseline. Running "
                    f"at once, the children share the GPU and the CPU cores.")
    result = {"meta": {"machine": machine_info(settings.device), "revision": revision,
                       "command": "python -m benchmarks.gpu_cuda_graphs "
                                  + " ".join(sys.argv[1:] if argv is None else argv),
                       "steps": settings.steps, "warmup": settings.warmup,
                       "seconds": time.perf_counter() - began},
              "check": checked, "spaces": spaces, "peers": peers, "peers_note": note}
    text = section(result)
    print(text)
    write_json(args.out / "cuda-graphs.json", result)
    write_markdown(args.out / "BENCHMARKS-cuda-graphs.md", {"cuda-graphs": text})
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
