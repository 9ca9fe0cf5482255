"""Pictures of the IR with graphviz, and the ``dump_dir`` hook that writes one per stage.

Drawing returns a ``graphviz.Digraph`` (or its DOT text); only :class:`DumpHook` and the
``topo-viz`` command write files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import graphviz

from .descriptors import Kind
from .ir import SupernetIR
from .report import CompileReport, StageReport

__all__ = ["draw", "DumpHook", "have_dot"]

_STYLE = {
    Kind.INPUT: ("box", "#dddddd"), Kind.OUTPUT: ("box", "#dddddd"),
    Kind.PARAM: ("note", "#f5f5f5"), Kind.CONV: ("box", "#8ecae6"),
    Kind.LINEAR: ("box", "#8ecae6"), Kind.NORM: ("box", "#ffb703"),
    Kind.ACT: ("ellipse", "#95d5b2"), Kind.POOL: ("hexagon", "#cdb4db"),
    Kind.ARITH: ("circle", "#ffffff"), Kind.ZERO: ("circle", "#eeeeee"),
    Kind.IDENTITY: ("circle", "#eeeeee"),
}


def have_dot() -> bool:
    """Whether graphviz's ``dot`` program is installed (needed for SVG/PNG)."""
    return shutil.which("dot") is not None


def draw(ir: SupernetIR, title: str = "") -> graphviz.Digraph:
    """The IR as a graph: one node per IR node, coloured by kind, in stable order."""
    g = graphviz.Digraph(name="supernet", graph_attr={"rankdir": "TB", "label": title,
                                                      "labelloc": "t", "fontsize": "12"},
                         node_attr={"fontsize": "9", "style": "filled"})
    for node in ir.nodes():
        shape, color = _STYLE.get(node.kind, ("box", "#ffffff"))
        label = node.desc.label() if node.opcode != "placeholder" else str(node.target)
        g.node(node.name, label=label, shape=shape, fillcolor=color)
    for name in ir.topological_order():
        for user in ir.users(name):
            g.edge(name, user)
    return g


class DumpHook:
    """Writes the IR after each stage (``00-input.dot``, ``01-pms.dot``...) and the report."""

    def __init__(self, dump_dir: str | os.PathLike, formats: tuple[str, ...] = ("svg",),
                 max_render_nodes: int = 2000):
        self.dir = Path(dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.formats = formats
        self.max_render_nodes = max_render_nodes

    def __call__(self, index: int, stage: StageReport, ir: SupernetIR) -> None:
        stem = f"{index:02d}-{stage.name.replace('#', '-')}"
        graph = draw(ir, title=f"{stage.name}: {stage.counts} (conv/non-conv/total)")
        (self.dir / f"{stem}.dot").write_text(graph.source)
        if have_dot() and len(ir) <= self.max_render_nodes:
            for fmt in self.formats:
                graph.render(outfile=str(self.dir / f"{stem}.{fmt}"), format=fmt,
                             cleanup=True, quiet=True)

    def write_report(self, report: CompileReport) -> None:
        (self.dir / "report.json").write_text(report.to_json())
        (self.dir / "report.md").write_text(report.to_markdown(max_mixed_ops=None))
