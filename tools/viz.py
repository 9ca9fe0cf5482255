"""``topo-viz``: pictures of what the compiler did to a supernet, before and after each pass.

    topo-viz darts                                 # a built-in space (darts, nb201, wide)
    topo-viz mypkg.models:build_supernet --input-shape 2,3,32,32
    topo-viz darts --edge 0 --format png --out viz/    # one edge; --cell 1; --network

Writes one HTML page (before and after side by side, with the report) and the picture files,
and prints where they are.  Errors (a bad import path, a factory that returns no module, an
input shape that does not fit) give one line and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from topo_compiler import TraceError, compile_supernet, spaces
from topo_compiler.viz import (INSTALL_DOT, DumpHook, View, cells_of, draw_network, edges_of,
                               report_html)

EXIT_USAGE = 2


class VizError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise VizError(f"--input-shape {text!r}: expected integers like 2,3,32,32") from None
    if not shape or any(v <= 0 for v in shape):
        raise VizError(f"--input-shape {text!r}: expected positive integers like 2,3,32,32")
    return shape


def load_model(target: str, input_shape: str | None,
               size: dict | None = None) -> tuple[nn.Module, tuple, str]:
    """(model, example inputs, name) for a built-in space or a ``module:factory`` path."""
    if target in spaces.SPACES:
        model = spaces.build(target, **(size or {}))
        x = spaces.default_input(target, **{k: v for k, v in (size or {}).items()
                                            if k != "layers"})
        if input_shape:
            x = torch.randn(_parse_shape(input_shape))
        return model, (x,), target
    if ":" not in target:
        raise VizError(f"{target!r} is neither a built-in space ({', '.join(spaces.SPACES)}) "
                       f"nor an import path like mypkg.models:build_supernet")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise VizError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise VizError(f"{module_name!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) \
            else factory
    except Exception as exc:  # noqa: BLE001
        raise VizError(f"{target}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise VizError(f"{target} returned {type(model).__name__}, not an nn.Module")
    if not input_shape:
        raise VizError(f"{target}: give the example input's shape with --input-shape, "
                       f"e.g. --input-shape 2,3,32,32")
    return model, (torch.randn(_parse_shape(input_shape)),), attr


def _choose_view(ir, args) -> View:
    if args.edge is not None:
        edges = edges_of(ir)
        if not edges:
            raise VizError("the model has no mixed op to show with --edge")
        if args.edge.isdigit():
            if int(args.edge) >= len(edges):
                raise VizError(f"--edge {args.edge}: the model has {len(edges)} mixed ops "
                               f"(0..{len(edges) - 1})")
            return View.edge(edges[int(args.edge)])
        if args.edge not in edges:
            raise VizError(f"--edge {args.edge!r}: no such mixed op; e.g. {edges[0]!r}")
        return View.edge(args.edge)
    cells = cells_of(ir)
    if args.cell is not None:
        if args.cell.isdigit():
            if int(args.cell) >= len(cells):
                raise VizError(f"--cell {args.cell}: the model has {len(cells)} cells")
            return View.cell(cells[int(args.cell)])
        if args.cell not in cells:
            raise VizError(f"--cell {args.cell!r}: no such cell; cells: {cells[:4]}...")
        return View.cell(args.cell)
    if len(ir) <= 400 or not cells:
        return View.full()
    return View.cell(cells[0])


def _page(name: str, report, files_before: str, files_after: str, network: str | None,
          fmt: str) -> str:
    def figure(stem: str, caption: str) -> str:
        if fmt in ("svg", "png"):
            body = f'<img src="{stem}.{fmt}" alt="{caption}">'
        else:
            body = f'<a href="{stem}.{fmt}">{stem}.{fmt}</a>'
        return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"

    net = figure(network, "the whole network, cells collapsed") if network else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>topo-viz: {name}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 1.5em; }}
.pair {{ display: flex; gap: 1.5em; align-items: flex-start; }}
.pair figure {{ flex: 1; margin: 0; overflow: auto; border: 1px solid #ddd; padding: .5em; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: right; }}
</style></head><body>
<h1>topo-viz: {name}</h1>
<p>passes: {', '.join(report.passes) or 'none'}; exact: {report.exact};
mixed ops: {len(report.mixed_ops)}</p>
{report_html(report)}
<div class="pair">{figure(files_before, "before (the traced supernet)")}
{figure(files_after, "after " + (report.stages[-1].name if report.stages else ""))}</div>
{net}
</body></html>
"""


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topo-viz", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a built-in space (darts, nb201, wide) or "
                                      "module.path:factory")
    parser.add_argument("--input-shape", help="example input shape, e.g. 2,3,32,32")
    parser.add_argument("--C", type=int, help="built-in spaces: initial channels")
    parser.add_argument("--layers", type=int, help="built-in spaces: number of cells")
    parser.add_argument("--passes", default=None,
                        help="comma-separated passes (default: pms,fms,merge,fold,kn)")
    parser.add_argument("--exact", action="store_true", help="only exact rewrites")
    parser.add_argument("--format", default="svg", choices=("svg", "png", "pdf", "dot"))
    parser.add_argument("--out", default="topo-viz-out", help="output directory")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cell", help="show one cell (index or path)")
    where.add_argument("--edge", help="show one mixed op (index or name)")
    parser.add_argument("--detail", action="store_true",
                        help="also draw weight and kernel arithmetic")
    parser.add_argument("--all-stages", action="store_true",
                        help="also write a picture after every pass (default: first and last)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    size = {k: v for k, v in (("C", args.C), ("layers", args.layers)) if v is not None}
    if size and args.model not in spaces.SPACES:
        raise VizError("--C and --layers apply to the built-in spaces only")
    model, inputs, name = load_model(args.model, args.input_shape, size)
    out = Path(args.out)
    formats = () if args.format == "dot" else (args.format,)
    hook = DumpHook(out, formats=formats, detail=args.detail)
    stages: list[str] = []

    def keep(index, stage, ir_):
        if index == 0:  # the analysed input: pick what the pictures show before drawing
            hook.view = _choose_view(ir_, args)
        stages.append(f"{index:02d}-{stage.name.replace('#', '-')}")
        if args.all_stages or index == 0:
            hook(index, stage, ir_)
        last[0] = (index, stage, ir_)

    last: list = [None]
    passes = args.passes.split(",") if args.passes else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled = compile_supernet(model, inputs, passes=passes, exact=args.exact,
                                        hooks=[keep], partial=False)  # pictures need one IR
        except TraceError as exc:
            shape = "x".join(str(v) for v in inputs[0].shape)
            raise VizError(f"the input shape {shape} does not fit {name}: "
                           f"{str(exc).splitlines()[0]}") from None
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise VizError(str(exc)) from None
    index, stage, final_ir = last[0]
    if not args.all_stages and index != 0:
        hook(index, stage, final_ir)
    network = None
    if len(cells_of(final_ir)) > 1:
        network = "network"
        hook.write(draw_network(final_ir, f"{name} after {stage.name}"), network)
    hook.write_report(compiled.report)
    fmt = args.format if hook.rendered else "dot"
    page = out / "index.html"
    page.write_text(_page(name, compiled.report, stages[0], stages[index], network, fmt),
                    encoding="utf-8")
    elapsed = time.perf_counter() - start
    print(compiled.report.to_markdown(max_mixed_ops=8))
    print(f"topo-viz: {hook.view.title()} of {name}, {len(stages)} stages, {elapsed:.1f} s")
    for f in [page] + hook.files:
        print(f"  wrote {f}")
    if not hook.rendered and args.format != "dot":
        print(f"topo-viz: {INSTALL_DOT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except VizError as exc:
        print(f"topo-viz: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
