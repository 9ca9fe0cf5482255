"""``topo-viz``: pictures of what the compiler did to a supernet, before and after each pass.

    topo-viz darts                                 # a built-in space (darts, nb201, wide)
    topo-viz mynet:build --input-shape 2,3,32,32   # mynet.py in the current directory
    topo-viz path/to/mynet.py:build                # build() returns (model, example_inputs)
    topo-viz darts --edge 0 --format png --out viz/    # one edge; --cell 1

Writes one HTML page (before and after side by side, the collapsed network, the report) and
the picture files, and prints first where the page is.  User errors (a bad import path, a
factory that returns no module, missing example inputs) print one line and exit with status
2; a model the tracer cannot follow prints the tracer's message, which names the module, the
source line and the way out.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from topo_compiler import TraceError, compile_supernet, spaces
from topo_compiler.viz import (INSTALL_DOT, DumpHook, View, cells_of, draw_network, edges_of,
                               glossary_html, legend_html, report_html)

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


def _import_target(module_name: str):
    """The module named by ``module_name``: a file path (``nets/mynet.py``) or a dotted module
    path importable from the current directory (``mynet``, ``mypkg.models``)."""
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise VizError(f"no such file: {module_name}")
        folder = str(path.parent)
        if folder not in sys.path:  # the file's own imports of its neighbours resolve
            sys.path.insert(0, folder)
        name = path.stem if path.stem.isidentifier() else "topo_viz_user_module"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise VizError(f"cannot load {module_name}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
            sys.modules.pop(name, None)
            raise VizError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") \
                from None
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts leave the cwd out
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
            hint = (f" (looked in the current directory {cwd} and on sys.path; give a file "
                    f"path like path/to/{module_name.replace('.', '/')}.py:factory instead)")
        raise VizError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}{hint}") \
            from None


def _as_inputs(value) -> tuple:
    """A factory's example inputs: one tensor, or a tuple/list of the forward's arguments."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def load_model(target: str, input_shape: str | None,
               size: dict | None = None) -> tuple[nn.Module, tuple, str]:
    """(model, example inputs, name) for a built-in space or ``module:factory``.

    ``module`` is a dotted module path importable from the current directory (``mynet``,
    ``mypkg.models``) or a file path (``path/to/mynet.py``).  ``factory`` is a callable
    returning the model, or ``(model, example_inputs)`` when the forward takes more than
    one input (e.g. the architecture weights as arguments); ``--input-shape`` then replaces
    the first example input.  ``factory`` may also name a module instance.
    """
    if target in spaces.SPACES:
        model = spaces.build(target, **(size or {}))
        x = spaces.default_input(target, **{k: v for k, v in (size or {}).items()
                                            if k != "layers"})
        if input_shape:
            x = torch.randn(_parse_shape(input_shape))
        return model, (x,), target
    if ":" not in target:
        raise VizError(f"{target!r} is neither a built-in space ({', '.join(spaces.SPACES)}) "
                       f"nor a factory like mynet:build or path/to/mynet.py:build")
    module_name, _, attr = target.rpartition(":")
    module = _import_target(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise VizError(f"{module_name!r} has no attribute {attr!r}")
    try:
        made = factory() if callable(factory) and not isinstance(factory, nn.Module) \
            else factory
    except Exception as exc:  # noqa: BLE001
        raise VizError(f"{target}() failed: {type(exc).__name__}: {exc}") from None
    inputs: tuple | None = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, inputs = made[0], _as_inputs(made[1])
    if not isinstance(made, nn.Module):
        raise VizError(f"{target} returned {type(made).__name__}, not an nn.Module "
                       f"(nor a pair (model, example_inputs))")
    if input_shape:
        x = torch.randn(_parse_shape(input_shape))
        inputs = (x,) + (inputs[1:] if inputs else ())
    if inputs is None:
        raise VizError(f"{target}: give the example input's shape with --input-shape, "
                       f"e.g. --input-shape 2,3,32,32, or return (model, example_inputs) "
                       f"from {attr}")
    return made, inputs, attr


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


def _page(title: str, view: str, report, files_before: str, files_after: str,
          network: str | None, fmt: str) -> str:
    def figure(stem: str, caption: str) -> str:
        target = f"{stem}.{fmt}"
        if fmt in ("svg", "png"):
            body = (f'<a href="{target}" title="open at full size"><img src="{target}" '
                    f'alt="{html.escape(caption)}"></a>')
        else:
            body = f'<a href="{target}">{target}</a>'
        return (f"<figure>{body}<figcaption>{html.escape(caption)} "
                f'(<a href="{target}">full size</a>)</figcaption></figure>')

    after = report.stages[-1].name if report.stages else ""
    net = figure(network, "the whole network, cells collapsed, after " + after) \
        if network else ""
    mode = "exact (keeps the function)" if report.exact else \
        "the paper's (changes the function on purpose)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>topo-viz: {html.escape(title)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 1.5em; max-width: 110em; }}
.pair {{ display: flex; gap: 1.5em; align-items: flex-start; }}
figure {{ flex: 1; margin: 0 0 1em 0; border: 1px solid #ddd; padding: .5em; }}
figure img {{ max-width: 100%; max-height: 80vh; display: block; margin: auto; }}
figcaption {{ text-align: center; color: #555; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: right; }}
.legend {{ display: flex; flex-wrap: wrap; gap: .4em; margin: .5em 0; }}
.swatch {{ border: 1px solid #333; border-radius: 4px; padding: .15em .5em; font-size: 90%; }}
.glossary {{ max-width: 60em; line-height: 1.4; }}
.glossary {{ font-size: 90%; }}
</style></head><body>
<h1>topo-viz: {html.escape(title)}</h1>
<p>{html.escape(view)}; passes: {', '.join(report.passes) or 'none'}; mode: {mode};
mixed ops: {len(report.mixed_ops)}; basic modules {report.input.counts.total} &rarr;
{report.final.counts.total}. Click a picture to open it at full size.</p>
{glossary_html()}
{legend_html()}
{report_html(report)}
<div class="pair">{figure(files_before, "before: the traced supernet")}
{figure(files_after, "after " + after)}</div>
{net}
</body></html>
"""


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topo-viz", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a built-in space (darts, nb201, wide), or "
                                      "module:factory (a module importable from the current "
                                      "directory) or path/to/file.py:factory; the factory "
                                      "returns the model or (model, example_inputs)")
    parser.add_argument("--input-shape", help="example input shape, e.g. 2,3,32,32")
    parser.add_argument("--C", type=int, help="built-in spaces: initial channels")
    parser.add_argument("--layers", type=int, help="built-in spaces: number of cells")
    parser.add_argument("--passes", default=None,
                        help="comma-separated passes (default: pms,fms,kn,merge,fold)")
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
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="keep this module (qualified name, e.g. cells.0.sampler) opaque; "
                             "repeatable (what a trace error's way out asks for)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--verbose", action="store_true",
                      help="list every file written and every decision")
    talk.add_argument("--quiet", action="store_true", help="print only where the page is")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    size = {k: v for k, v in (("C", args.C), ("layers", args.layers)) if v is not None}
    if size and args.model not in spaces.SPACES:
        raise VizError("--C and --layers apply to the built-in spaces only")
    model, inputs, name = load_model(args.model, args.input_shape, size)
    title = type(model).__name__ if name == type(model).__name__ else \
        f"{type(model).__name__} ({name})"
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
                                        leaf_modules=args.leaf, hooks=[keep],
                                        partial=False)  # pictures need one IR
        except TraceError as exc:  # its message holds the place in the model and the way out
            raise VizError(f"{title}: {exc}") from None
        except TypeError as exc:
            hint = ""
            if "example_inputs" in str(exc) and args.model not in spaces.SPACES:
                hint = (" (a forward with more than one input: have the factory return "
                        "(model, example_inputs))")
            raise VizError(f"{exc}{hint}") from None
        except (ValueError, NotImplementedError) as exc:
            raise VizError(str(exc)) from None
    index, stage, final_ir = last[0]
    if not args.all_stages and index != 0:
        hook(index, stage, final_ir)
    network = None
    if len(cells_of(final_ir)) > 1:
        network = "network"
        hook.write(draw_network(final_ir, f"{title} after {stage.name}"), network)
    hook.write_report(compiled.report)
    fmt = args.format if hook.rendered else "dot"
    page = out / "index.html"
    view = f"{hook.view.title()} of {title}"
    page.write_text(_page(title, view, compiled.report, stages[0], stages[index], network,
                          fmt), encoding="utf-8")
    elapsed = time.perf_counter() - start
    print(f"topo-viz: open {page}  ({view}, {len(stages)} stages, {elapsed:.1f} s)")
    if not hook.rendered and args.format != "dot":
        print(f"topo-viz: {INSTALL_DOT}")
    if args.quiet:
        return 0
    if args.verbose:
        for f in hook.files:
            print(f"  wrote {f}")
        print(compiled.report.to_markdown(max_mixed_ops=None, max_decisions=None,
                                          max_guards=None))
    else:
        print(f"topo-viz: {len(hook.files)} more files in {out} (pictures, report.md, "
              f"report.json; --verbose lists them)")
        print(compiled.report.to_markdown(max_mixed_ops=0, max_decisions=0, max_guards=0))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except VizError as exc:
        print(f"topo-viz: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
