"""``python -m topo_compiler [space]``: compile a built-in supernet and print the report.

    python -m topo_compiler                  # DARTS, 8 cells, the paper's full pipeline
    python -m topo_compiler nb201 --passes pms,fms --exact
    python -m topo_compiler darts --verbose  # every decision and every mixed op
"""

from __future__ import annotations

import argparse
import sys
import time

from . import compile_supernet, spaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topo_compiler",
                                     description="Compile a built-in supernet and print "
                                                 "what each pass did.")
    parser.add_argument("space", nargs="?", default="darts", choices=spaces.SPACES)
    parser.add_argument("--passes", default=None,
                        help="comma-separated subset of pms,fms,kn,merge,fold ('' for none; "
                             "merge brings fold along)")
    parser.add_argument("--exact", action="store_true",
                        help="only rewrites that keep the function exactly")
    parser.add_argument("--C", type=int, default=16, help="initial channels (default 16)")
    parser.add_argument("--layers", type=int, default=None, help="cells (space default)")
    parser.add_argument("--batch", type=int, default=2, help="example batch size")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all-mixed-ops", action="store_true",
                        help="also list every mixed op with its counts at each stage")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--verbose", "-v", action="store_true",
                      help="every decision and every mixed op (default: the stage table and "
                           "one line per pass and kind of decision)")
    talk.add_argument("--quiet", "-q", action="store_true",
                      help="only the last line (module counts before and after)")
    args = parser.parse_args(argv)

    model = spaces.build(args.space, C=args.C, layers=args.layers)
    x = spaces.default_input(args.space, batch=args.batch)
    start = time.perf_counter()
    compiled = compile_supernet(model, x, passes=args.passes, exact=args.exact)
    seconds = time.perf_counter() - start
    report = compiled.report
    if args.json:
        print(report.to_json())
        return 0
    if args.verbose:
        print(report.to_markdown(max_mixed_ops=None, max_decisions=None, max_guards=None))
    elif not args.quiet:
        print(report.to_markdown(max_mixed_ops=None if args.all_mixed_ops else 0,
                                 max_decisions=0, max_guards=0))
    first, last = report.input.counts, report.final.counts
    print(f"{args.space}: {len(report.mixed_ops)} mixed ops; basic modules "
          f"{first.total} -> {last.total} (conv {first.conv} -> {last.conv}, non-conv "
          f"{first.non_conv} -> {last.non_conv}); compiled in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
