"""Pictures of the IR with graphviz: what the compiler did, edge by edge.

:func:`draw` returns a ``graphviz.Digraph`` of a *view* of the IR:

* ``View.edge(name)`` -- one mixed op (one searchable edge) and the weights feeding it;
* ``View.cell(path)`` -- every mixed op of one cell (``cells.0``), with the cell's other nodes;
* ``View.full()`` -- every node (only sensible for small supernets);
* :func:`draw_network` -- the whole network collapsed, one box per cell with its counts.

Each mixed op is a cluster titled by its place in the network; nodes are shaped and coloured
by kind (the same in every picture); modules the passes share are drawn with a thick red
(sibling, common child) or purple (floating) border; merged convolutions list the candidates
they absorbed, their frame and whether kernel normalization applies; architecture weights
read ``w[row, col]`` of their alpha; tensor edges carry their shapes; the caption holds the
paper's Table II counts.  User-provided names are escaped and never break the DOT.

Only :class:`DumpHook` and the ``topo-viz`` command write files.
"""

from __future__ import annotations

import dataclasses
import html
import os
import shutil
from pathlib import Path
from typing import Iterable

import graphviz
import torch

from .descriptors import Kind, Ref
from .ir import IRNode, Role, SupernetIR
from .report import CompileReport, StageReport, count_modules

__all__ = ["View", "draw", "draw_network", "DumpHook", "have_dot", "INSTALL_DOT",
           "cells_of", "edges_of", "report_html", "legend_html", "glossary_html", "GLOSSARY"]

INSTALL_DOT = ("graphviz's `dot` program is not installed, so only DOT files were written; "
               "install it with `apt-get install graphviz` (Debian/Ubuntu), "
               "`brew install graphviz` (macOS) or `conda install -c conda-forge graphviz`, "
               "then run again (or render a .dot file with `dot -Tsvg FILE.dot -o FILE.svg`)")

# (shape, fill colour) by kind: the same op looks the same in every picture
STYLE = {
    Kind.INPUT: ("invhouse", "#e0e0e0"), Kind.OUTPUT: ("house", "#e0e0e0"),
    Kind.PARAM: ("note", "#f5f5f5"), Kind.CONV: ("box", "#8ecae6"),
    Kind.LINEAR: ("box", "#8ecae6"), Kind.NORM: ("box", "#ffd166"),
    Kind.ACT: ("ellipse", "#95d5b2"), Kind.POOL: ("hexagon", "#cdb4db"),
    Kind.DROPOUT: ("ellipse", "#dddddd"), Kind.MODULE: ("component", "#f4a261"),
    Kind.IDENTITY: ("circle", "#ffffff"), Kind.ZERO: ("circle", "#eeeeee"),
    Kind.ARITH: ("ellipse", "#ffffff"), Kind.LAYOUT: ("cds", "#f1f1f1"),
    Kind.SHAPE: ("plaintext", "#ffffff"), Kind.OTHER: ("box", "#ffffff"),
}
WEIGHT_STYLE = ("octagon", "#fde2e4")
MERGED_STYLE = ("box3d", "#219ebc")
_DERIVED_WEIGHT_LABEL = {Role.GROUP_WEIGHT: "w_S = Σ w_i",
                         Role.CONDITIONAL_WEIGHT: "w' = w_i / w_S"}
_DERIVED_WEIGHT_TEXT = {Role.GROUP_WEIGHT: "w_S", Role.CONDITIONAL_WEIGHT: "w'"}
SHARED_COLOURS = {"sibling": "#d62828", "common child": "#d62828", "floating": "#7b2cbf"}
_LEGEND = [("conv", Kind.CONV), ("norm", Kind.NORM), ("activation", Kind.ACT),
           ("pool", Kind.POOL), ("weight arithmetic", Kind.ARITH), ("layout", Kind.LAYOUT),
           ("input / output", Kind.INPUT)]


def have_dot() -> bool:
    """Whether graphviz's ``dot`` program is installed (needed for SVG/PNG/PDF)."""
    return shutil.which("dot") is not None


# --------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------

def edges_of(ir: SupernetIR) -> list[str]:
    """The mixed ops (edges) of the input supernet, in program order (``notes.mixed_op``)."""
    seen: dict[str, tuple] = {}
    for node in ir.nodes():
        tag = node.notes.mixed_op
        if tag is not None and tag not in seen:
            seen[tag] = node.order
    return sorted(seen, key=seen.get)


def _cell_of(edge: str) -> str:
    """``cells.0._ops.3`` -> ``cells.0``: the shortest prefix ending in an index."""
    atoms = edge.split(".")
    for i, atom in enumerate(atoms[:-1]):
        if atom.isdigit():
            return ".".join(atoms[:i + 1])
    return ""


def cells_of(ir: SupernetIR) -> list[str]:
    """The cells holding mixed ops, in program order ('' when the model has no cells)."""
    return list(dict.fromkeys(_cell_of(e) for e in edges_of(ir)))


@dataclasses.dataclass(frozen=True)
class View:
    """Which part of the IR a picture shows."""

    kind: str            # 'edge', 'cell' or 'full'
    key: str = ""

    @classmethod
    def edge(cls, name: str) -> "View":
        return cls("edge", name)

    @classmethod
    def cell(cls, path: str) -> "View":
        return cls("cell", path)

    @classmethod
    def full(cls) -> "View":
        return cls("full")

    def title(self) -> str:
        return {"edge": f"edge {self.key}", "cell": f"cell {self.key or '<root>'}",
                "full": "whole supernet"}[self.kind]

    def select(self, ir: SupernetIR) -> set[str]:
        """The nodes this view shows (boundary inputs are added by :func:`draw`)."""
        if self.kind == "full":
            return set(ir.graph.nodes)
        if self.kind == "edge":
            inside = {n.name for n in ir.nodes() if n.notes.mixed_op == self.key}
        else:
            prefix = self.key + "." if self.key else ""

            def in_cell(n: IRNode) -> bool:
                if (n.notes.mixed_op or "").startswith(prefix):
                    return True
                return bool(self.key) and (n.module_path + ".").startswith(prefix) and \
                    not n.notes.is_weight

            inside = {n.name for n in ir.nodes() if in_cell(n)}
        # the architecture weights read inside: w[row, col] and what derives from them
        weights = {p for n in inside for p in ir.graph.predecessors(n)
                   if ir.node(p).notes.is_weight}
        return inside | weights


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------

def _shape_text(val) -> str:
    """``16×32×32``: a tensor's shape without the batch dimension (it is symbolic)."""
    if isinstance(val, torch.Tensor):
        return "×".join(str(s) for s in val.shape[1:]) if val.dim() > 1 else "scalar"
    return ""


def _alpha_index(ir: SupernetIR, name: str) -> str | None:
    """``alphas_normal[3, 4]`` for a weight read out of a softmax of alphas, else None."""
    node = ir.node(name)
    indices = []
    while node.desc.op == "getitem" and isinstance(node.args[0], Ref) and \
            isinstance(node.args[1], int):
        indices.append(node.args[1])
        node = ir.node(node.args[0].name)
    if not indices:
        return None
    source = node
    while source.opcode != "get_attr" and source.opcode != "placeholder" and source.inputs:
        source = ir.node(source.inputs[0])
    base = str(source.target)
    return f"{base}[{', '.join(str(i) for i in reversed(indices))}]"


def _label(ir: SupernetIR, node: IRNode) -> str:
    if node.opcode == "placeholder":
        return "input" if node.target == "input" else f"input {node.target}"
    if node.opcode == "output":
        return "output"
    notes = node.notes
    if notes.merged is not None and notes.kernels is not None:
        frame = "x".join(str(f) for f in notes.frame or ())
        kn = ", KN" if any(k in ir and ir.node(k).origin == "kn" for k in notes.kernels) else ""
        absorbed = "\n".join(f"• {c}" for c in notes.merged)
        return f"merged {notes.merge_form} conv {frame}{kn}\n{absorbed}"
    if notes.merged is not None:
        return f"merged depthwise (stacked)\n{node.desc.label()}"
    if notes.is_weight:
        alpha = _alpha_index(ir, node.name)
        if alpha:
            return f"w = {alpha}"
        return _DERIVED_WEIGHT_LABEL.get(notes.role, node.desc.op)
    if node.kind is Kind.ZERO:
        return "× 0"
    if node.desc.op == "add" and node.kind is Kind.ARITH:
        return "+"
    if node.desc.op == "mul" and node.kind is Kind.ARITH:
        weights = [r for r in node.inputs if ir.node(r).notes.is_weight]
        return "× " + _weight_text(ir, weights[0]) if weights else "×"
    label = node.desc.label()
    if notes.kn:
        label += "\nKN"
    return label


def _weight_text(ir: SupernetIR, name: str) -> str:
    node = ir.node(name)
    alpha = _alpha_index(ir, name)
    if alpha:
        return f"w{alpha[alpha.index('['):]}"
    return _DERIVED_WEIGHT_TEXT.get(node.notes.role, node.desc.op)


def _style(node: IRNode) -> dict[str, str]:
    if node.notes.merged is not None:
        shape, fill = MERGED_STYLE
    elif node.notes.is_weight:
        shape, fill = WEIGHT_STYLE
    else:
        shape, fill = STYLE.get(node.kind, ("box", "#ffffff"))
    attrs = {"shape": shape, "fillcolor": fill, "style": "filled"}
    shared = node.notes.shared
    if shared is not None:
        attrs.update(color=SHARED_COLOURS[shared.value], penwidth="3",
                     xlabel=graphviz.escape(f"shared ({shared.value})"))
    return attrs


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------

def _caption(title: str, counts) -> str:
    return (f"{title}\nconv / non-conv / total: {counts.conv} / {counts.non_conv} / "
            f"{counts.total}")


def _legend(g: graphviz.Digraph) -> None:
    with g.subgraph(name="cluster_legend") as lg:
        lg.attr(label="legend", style="dashed", color="#999999", fontsize="10")
        previous = None
        for i, (text, kind) in enumerate(_LEGEND):
            shape, fill = STYLE[kind]
            lg.node(f"legend{i}", label=text, shape=shape, fillcolor=fill, style="filled")
            if previous:
                lg.edge(previous, f"legend{i}", style="invis")
            previous = f"legend{i}"
        lg.node("legend_w", label="architecture weight", shape=WEIGHT_STYLE[0],
                fillcolor=WEIGHT_STYLE[1], style="filled")
        lg.node("legend_m", label="merged conv", shape=MERGED_STYLE[0],
                fillcolor=MERGED_STYLE[1], style="filled")
        lg.node("legend_s", label="shared module", shape="box", style="filled",
                fillcolor="#ffffff", color=SHARED_COLOURS["sibling"], penwidth="3")
        lg.node("legend_f", label="floating module", shape="box", style="filled",
                fillcolor="#ffffff", color=SHARED_COLOURS["floating"], penwidth="3")
        for a, b in ((previous, "legend_w"), ("legend_w", "legend_m"),
                     ("legend_m", "legend_s"), ("legend_s", "legend_f")):
            lg.edge(a, b, style="invis")


def _hidden(node: IRNode) -> bool:
    """Weight arithmetic and kernel arithmetic: summarized on the nodes they feed."""
    return node.notes.role is not None


def draw(ir: SupernetIR, view: View | None = None, title: str = "",
         legend: bool = True, detail: bool = False) -> graphviz.Digraph:
    """A picture of ``view`` (default: the whole IR): stable across runs.

    Without ``detail`` the architecture-weight arithmetic and the kernel arithmetic of
    merged convolutions are not drawn: weighted terms read ``× w[row, col]`` (``w_S``,
    ``w'`` for derived weights) and merged convolutions list what they absorbed.
    """
    view = view or View.full()
    shown = view.select(ir)
    counts = count_modules(ir, shown)
    if not detail:
        shown = {n for n in shown if not _hidden(ir.node(n))}
    order = [n for n in ir.topological_order() if n in shown]
    ids = {name: f"n{i}" for i, name in enumerate(order)}
    caption = _caption(title or view.title(), counts)
    g = graphviz.Digraph(name="supernet", graph_attr={
        "rankdir": "TB", "label": graphviz.escape(caption), "labelloc": "t",
        "fontsize": "14", "fontname": "Helvetica", "newrank": "true", "nodesep": "0.25",
        "ranksep": "0.35"}, node_attr={"fontsize": "10", "fontname": "Helvetica"},
        edge_attr={"fontsize": "8", "fontname": "Helvetica", "color": "#555555"})
    clusters: dict[str, list[str]] = {}
    loose: list[str] = []
    for name in order:
        tag = ir.node(name).notes.mixed_op
        (clusters.setdefault(tag, []) if tag else loose).append(name)
    for tag, names in clusters.items():
        with g.subgraph(name=f"cluster_{ids[names[0]]}") as sub:
            sub.attr(label=graphviz.escape(f"mixed op {tag}"), style="rounded",
                     color="#7a7a7a", fontsize="11", id=f"mixed_op:{tag}")
            for name in names:
                _node(sub, ir, name, ids[name])
    for name in loose:
        _node(g, ir, name, ids[name])
    boundary: dict[str, str] = {}  # one node per outside source
    for name in order:
        for src in ir.node(name).inputs:
            if src in ids:
                _edge(g, ir, src, ids[src], ids[name])
                continue
            s = ir.node(src)
            if s.opcode == "get_attr" and s.kind is Kind.PARAM or \
                    s.notes.is_weight or \
                    (not detail and _hidden(s)):
                continue  # parameters belong to their module; weights label their term
            if src not in boundary:
                boundary[src] = f"b{len(boundary)}"
                g.node(boundary[src], label=graphviz.escape(
                    f"{s.target if s.opcode in ('placeholder', 'get_attr') else src}"),
                    shape="plaintext", fontcolor="#555555")
            _edge(g, ir, src, boundary[src], ids[name])
    if legend:
        _legend(g)
    return g


def _node(g: graphviz.Digraph, ir: SupernetIR, name: str, node_id: str) -> None:
    node = ir.node(name)
    tip = f"{name}: {node.target}" if node.opcode == "call_module" else name
    g.node(node_id, label=graphviz.escape(_label(ir, node)), tooltip=graphviz.escape(tip),
           **_style(node))


def _edge(g: graphviz.Digraph, ir: SupernetIR, src: str, a: str, b: str) -> None:
    s = ir.node(src)
    shape = _shape_text(s.val)
    scalar = not shape or shape == "scalar" or s.notes.is_weight
    g.edge(a, b, label="" if scalar else graphviz.escape(shape),
           style="dashed" if scalar else "solid", fontcolor="#777777")


def draw_network(ir: SupernetIR, title: str = "") -> graphviz.Digraph:
    """The whole network collapsed: one box per cell (with its counts), other nodes kept
    when they are basic modules, weight arithmetic hidden."""
    cells = set(cells_of(ir))

    def data(node: IRNode) -> bool:
        """Activations only: weight and kernel arithmetic and parameters are not data flow
        (one batched kernel normalization reads kernels of every cell)."""
        return node.notes.role is None and \
            node.opcode != "get_attr"

    cell_of: dict[str, str] = {}
    for node in ir.nodes():
        tag = node.notes.mixed_op
        path = _cell_of(tag) if tag else _cell_of(node.module_path + ".x")
        if path in cells and data(node):
            cell_of[node.name] = path
    counts = count_modules(ir)
    g = graphviz.Digraph(name="network", graph_attr={
        "rankdir": "TB", "label": graphviz.escape(_caption(title or "network", counts)),
        "labelloc": "t", "fontname": "Helvetica"},
        node_attr={"fontname": "Helvetica", "fontsize": "10"})
    ids: dict[str, str] = {}
    for i, cell in enumerate(dict.fromkeys(cell_of.values())):
        members = [n for n, c in cell_of.items() if c == cell]
        c = count_modules(ir, members)
        edges = len({ir.node(n).notes.mixed_op for n in members} - {None})
        ids[cell] = f"c{i}"
        g.node(f"c{i}", label=graphviz.escape(
            f"{cell}\n{edges} mixed ops\nconv/non-conv/total {c.conv}/{c.non_conv}/{c.total}"),
            shape="box3d", style="filled", fillcolor="#e9f5db")
    k = 0
    for node in ir.nodes():
        if node.name in cell_of or node.notes.is_weight:
            continue
        if node.desc.is_module or node.opcode in ("placeholder", "output"):
            ids[node.name] = f"m{k}"
            k += 1
            g.node(ids[node.name], label=graphviz.escape(_label(ir, node)), **_style(node))
    seen: set[tuple[str, str]] = set()

    def group(name: str) -> str | None:
        return ids.get(cell_of.get(name, name))

    def reach(name: str, memo: dict[str, set[str]]) -> set[str]:
        """Drawn groups feeding ``name`` through hidden nodes."""
        if name in memo:
            return memo[name]
        memo[name] = set()
        out: set[str] = set()
        for p in ir.node(name).inputs:
            if not data(ir.node(p)):
                continue
            gp = group(p)
            out |= {gp} if gp else reach(p, memo)
        memo[name] = out
        return out

    memo: dict[str, set[str]] = {}
    for node in ir.nodes():
        gn = group(node.name)
        if not gn:
            continue
        for src in reach(node.name, memo) - {gn}:
            if (src, gn) not in seen:
                seen.add((src, gn))
                g.edge(src, gn)
    return g


# --------------------------------------------------------------------------------------
# The dump hook
# --------------------------------------------------------------------------------------

class DumpHook:
    """Writes the IR after each stage (``00-input``, ``01-pms``...) and the report.

    ``view`` picks what each picture shows: ``"cell"`` (default: the first cell with mixed
    ops, readable even for an 8-cell DARTS supernet), ``"edge"`` (the first mixed op),
    ``"full"`` or a :class:`View`.  DOT is always written; ``formats`` (svg, png, pdf) are
    rendered when graphviz's ``dot`` is installed.
    """

    def __init__(self, dump_dir: str | os.PathLike, formats: Iterable[str] = ("svg",),
                 view: str | View = "cell", detail: bool = False):
        self.detail = detail
        formats = tuple(formats)
        bad = [f for f in formats if f not in ("svg", "png", "pdf", "dot")]
        if bad:
            raise ValueError(f"dump formats {bad}: choose from svg, png, pdf, dot")
        if not isinstance(view, View) and view not in ("cell", "edge", "full"):
            raise ValueError(f"dump view {view!r}: choose cell, edge or full")
        self.dir = Path(dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.formats = tuple(f for f in formats if f != "dot")
        self.view = view
        self.files: list[Path] = []
        self.rendered = have_dot()

    def resolve(self, ir: SupernetIR) -> View:
        if isinstance(self.view, View):
            return self.view
        if self.view == "edge" and edges_of(ir):
            return View.edge(edges_of(ir)[0])
        if self.view == "cell" and cells_of(ir):
            return View.cell(cells_of(ir)[0])
        return View.full()

    def __call__(self, index: int, stage: StageReport, ir: SupernetIR) -> None:
        if index == 0 or not isinstance(self.view, View):
            self.view = self.resolve(ir)  # fixed on the input, so every stage shows the same
        stem = f"{index:02d}-{stage.name.replace('#', '-')}"
        title = f"{stage.name}: {self.view.title()}"
        self.write(draw(ir, self.view, title, detail=self.detail), stem)

    def write(self, graph: graphviz.Digraph, stem: str) -> None:
        dot = self.dir / f"{stem}.dot"
        dot.write_text(graph.source, encoding="utf-8")
        self.files.append(dot)
        if not self.rendered:
            return
        for fmt in self.formats:
            out = self.dir / f"{stem}.{fmt}"
            graph.render(outfile=str(out), format=fmt, cleanup=True, quiet=True)
            self.files.append(out)

    def write_report(self, report: CompileReport) -> None:
        for name, text in (("report.json", report.to_json()),
                           ("report.md", report.to_markdown(max_mixed_ops=None))):
            (self.dir / name).write_text(text, encoding="utf-8")
            self.files.append(self.dir / name)


GLOSSARY = (
    ("pms", "partial module sharing (paper 3.2.1): candidates that start with the same "
            "module (siblings) or end with the same module (a common child) compute it once, "
            "weighted by the sum of their weights"),
    ("fms", "floating module sharing (3.2.2): a module in the middle of several candidates "
            "(the BN-ReLU between a separable convolution's halves) is computed once between "
            "two selections"),
    ("merge", "reparameterization (3.4): linear candidates (convolutions of any kernel size, "
              "identity, average pooling, zero) become one convolution whose kernel is the "
              "weighted sum of theirs, when the cost model says it is cheaper"),
    ("fold", "weight folding: a candidate's architecture weight is folded into the "
             "convolution or BatchNorm computing its term (w * conv(z) = conv(z, w K)), "
             "which keeps the function"),
    ("kn", "kernel normalization (3.5, Eq. 28): every learnable kernel of a linear "
           "candidate is standardized (whole kernel) before merging, so a kernel's scale "
           "cannot trade against its architecture weight"),
)


def legend_html() -> str:
    """The pictures' colours and shapes as an HTML legend (the same table as in the DOT)."""
    items = [(text, STYLE[kind][1], "#333333") for text, kind in _LEGEND]
    items += [("architecture weight", WEIGHT_STYLE[1], "#333333"),
              ("merged conv", MERGED_STYLE[1], "#333333"),
              ("shared module (PMS)", "#ffffff", SHARED_COLOURS["sibling"]),
              ("floating module (FMS)", "#ffffff", SHARED_COLOURS["floating"])]
    swatches = "".join(
        f'<span class="swatch" style="background:{fill};border-color:{border}'
        f'{";border-width:3px" if border != "#333333" else ""}">{html.escape(text)}</span>'
        for text, fill, border in items)
    return f'<div class="legend">{swatches}</div>'


def glossary_html() -> str:
    """One paragraph: what each pass does, and how to read the pictures."""
    passes = "; ".join(f"<b>{name}</b>: {html.escape(text)}" for name, text in GLOSSARY)
    return (f"<p class=\"glossary\">{passes}. A stage named <code>pms#2</code> is the "
            f"second run of pms: PMS and FMS repeat until neither changes the graph (the "
            f"paper's Alg. 1). In the pictures each grey frame is one mixed op; edges carry "
            f"tensor shapes without the batch dimension (dashed: scalars and weights); "
            f"<code>× w[i, j]</code> multiplies by the architecture weight in row i, column "
            f"j of the alphas' softmax, <code>w_S</code> is a shared group's summed weight "
            f"and <code>w'</code> a weight within the group; the caption counts basic "
            f"modules as the paper's Table II does.</p>")


def report_html(report: CompileReport, max_decisions: int = 40) -> str:
    """The report's stage table, summary and first ``max_decisions`` decisions (then "N more
    decisions") as an HTML fragment."""
    def changed(s) -> str:
        return f"skipped: {html.escape(s.skipped)}" if s.skipped else \
            "yes" if s.changed else "no"

    rows = "".join(
        f"<tr><td>{html.escape(s.name)}</td><td>{changed(s)}</td>"
        f"<td>{s.seconds * 1e3:.0f}</td><td>{s.counts.conv}</td><td>{s.counts.non_conv}</td>"
        f"<td>{s.counts.total}</td></tr>" for s in report.stages)
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in report.summary().splitlines())
    every = report.decisions
    shown = every[:max_decisions]
    decisions = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(str(d))}</li>"
                        for name, d in shown)
    more = f"<p>{len(every) - len(shown)} more decisions: every one is in " \
           f"<a href=\"report.md\">report.md</a>.</p>" if len(shown) < len(every) else ""
    return (f"<div style=\"display:flex;gap:2em;align-items:flex-start\"><table><tr>"
            f"<th>stage</th><th>changed</th><th>ms</th><th>conv</th><th>non-conv</th>"
            f"<th>total</th></tr>{rows}</table>"
            f"<div><b>Summary</b> (one line per pass and kind of decision)"
            f"<ul class=\"summary\">{summary}</ul>"
            f"<details><summary>decisions ({len(every)})</summary><ul>{decisions}</ul>{more}"
            f"</details></div></div>")
