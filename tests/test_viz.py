"""Pictures: topo-viz, the dump hook, escaping, and stability."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from topo_compiler import compile_supernet, lift, trace_supernet
from topo_compiler.api import analyze
from topo_compiler.spaces import build, default_input
from topo_compiler.tools import viz as cli
from topo_compiler.viz import (View, cells_of, draw, draw_network, edges_of, have_dot,
                               report_html)

needs_dot = pytest.mark.skipif(not have_dot(), reason="graphviz's dot is not installed")
SVG = "{http://www.w3.org/2000/svg}"


def _clusters(svg_path):
    root = ET.parse(svg_path).getroot()  # well-formed XML, or this raises
    return {g.get("id")[len("mixed_op:"):] for g in root.iter(f"{SVG}g")
            if (g.get("id") or "").startswith("mixed_op:")}


@needs_dot
@pytest.mark.parametrize("space", ["darts", "nb201",
                                   pytest.param("wide", marks=pytest.mark.slow)])
def test_cli_on_builtin_spaces_writes_svg_whose_clusters_are_the_mixed_ops(space, tmp_path,
                                                                           capsys):
    status = cli.main([space, "--C", "4", "--layers", "3" if space != "nb201" else "1",
                       "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "index.html" in out and "conv" in out
    model = build(space, C=4, layers=3 if space != "nb201" else 1)
    ir = lift(trace_supernet(model, default_input(space)))
    analyze(ir)
    shown = {e for e in edges_of(ir) if e.startswith(cells_of(ir)[0] + ".")}
    before, after = sorted(tmp_path.glob("0*.svg"))
    assert _clusters(before) == shown
    assert _clusters(after) == shown
    page = (tmp_path / "index.html").read_text()
    assert before.name in page and after.name in page and "<table>" in page
    # every picture links to itself at full size; the page explains passes and colours
    assert f'<a href="{before.name}"' in page and f'<a href="{after.name}"' in page
    for words in ("partial module sharing", "floating module sharing", "reparameterization",
                  "weight folding", "kernel normalization", "shared module (PMS)", "merged conv"):
        assert words in page
    title = {"darts": "Network", "nb201": "TinyNetworkDarts", "wide": "Network"}[space]
    assert f"<title>topo-viz: {title} ({space})</title>" in page


@needs_dot
def test_cli_edge_png_and_network(tmp_path):
    status = cli.main(["darts", "--C", "4", "--layers", "3", "--edge", "0", "--format", "png",
                       "--out", str(tmp_path)])
    assert status == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"00-input.png", "network.png", "index.html", "report.json"} <= names


@pytest.mark.parametrize("argv,message", [
    (["nosuchpkg.models:build"], "cannot import 'nosuchpkg.models'"),
    (["topo_compiler.spaces:nothing_here", "--input-shape", "2,3,8,8"], "has no attribute"),
    (["tests_viz_factory:number", "--input-shape", "2,3,8,8"], "not an nn.Module"),
    (["tests_viz_factory:make"], "--input-shape"),
    (["tests_viz_factory:make", "--input-shape", "2,a,8"], "expected integers"),
    (["darts", "--layers", "2", "--edge", "999"], "mixed ops"),
    (["darts", "--layers", "2", "--passes", "pms,nope"], "unknown pass"),
    (["plainname"], "neither a built-in space"),
    (["tests_viz_factory:make", "--input-shape", "2,3,8,8", "--C", "4"], "built-in spaces"),
])
def test_error_paths_exit_nonzero_with_one_line(argv, message, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tests_viz_factory.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)\n"
        "        self.alpha = nn.Parameter(torch.zeros(2))\n"
        "    def forward(self, x):\n"
        "        w = self.alpha.softmax(0)\n"
        "        return w[0] * self.a(x) + w[1] * self.b(x)\n"
        "def make():\n    return M()\n"
        "def number():\n    return 3\n")
    status = cli.main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("topo-viz: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


_USER_NET = """
import torch
from torch import nn
from user_net_helper import KERNEL  # a neighbour of this file, imported absolutely


class TwoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleDict({"wide": nn.Conv2d(3, 3, KERNEL, padding=1),
                                  "narrow": nn.Conv2d(3, 3, 1)})

    def forward(self, x, alphas):  # the architecture weights come as an argument
        w = alphas.softmax(0)
        if %s and x.sum() > 0:
            pass
        return w[0] * self.ops["wide"](x) + w[1] * self.ops["narrow"](x)


def build():
    return TwoOps(), (torch.randn(2, 3, 8, 8), torch.zeros(2, requires_grad=True))


def model_only():
    return TwoOps()
"""


def _user_files(folder, data_dependent=False):
    folder.mkdir(exist_ok=True)
    (folder / "user_net.py").write_text(_USER_NET % ("True" if data_dependent else "False"))
    (folder / "user_net_helper.py").write_text("KERNEL = 3\n")
    return folder


@pytest.fixture
def _fresh_imports(monkeypatch):
    """The user's modules are imported by the command: forget them after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ("user_net", "user_net_helper"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("spelling", ["module", "relative file", "absolute file"])
def test_user_factory_from_the_current_directory_or_a_file(spelling, tmp_path, monkeypatch,
                                                           capsys, _fresh_imports):
    """``mynet:build`` from mynet's directory and ``./mynet.py:build`` from anywhere work,
    the factory may return (model, example_inputs), and the page is named after the model."""
    src = _user_files(tmp_path / "src")
    monkeypatch.chdir(src if spelling != "absolute file" else tmp_path)
    sys.path[:] = [p for p in sys.path if p not in ("", str(src), ".")]
    target = {"module": "user_net:build", "relative file": "./user_net.py:build",
              "absolute file": str(src / "user_net.py") + ":build"}[spelling]
    out = tmp_path / "out"
    assert cli.main([target, "--format", "dot", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("topo-viz: open ") and "index.html" in first
    page = (out / "index.html").read_text()
    assert "<title>topo-viz: TwoOps (build)</title>" in page


def test_factory_without_inputs_for_a_two_argument_forward_says_what_to_return(
        tmp_path, monkeypatch, capsys, _fresh_imports):
    monkeypatch.chdir(_user_files(tmp_path / "src"))
    status = cli.main(["user_net:model_only", "--input-shape", "2,3,8,8",
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "alphas" in err and "(model, example_inputs)" in err


def test_trace_errors_keep_their_location_and_way_out(tmp_path, monkeypatch, capsys,
                                                      _fresh_imports):
    src = _user_files(tmp_path / "src", data_dependent=True)
    status = cli.main([f"{src / 'user_net.py'}:build", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.startswith("topo-viz: error: TwoOps (build): cannot trace the supernet")
    line = _USER_NET.splitlines().index("        if %s and x.sum() > 0:") + 1
    assert f"at {src / 'user_net.py'}:{line} in forward" in err
    assert "way out:" in err and "does not fit" not in err


def test_missing_module_names_the_directory_searched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["no_such_user_net:build", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "path/to/no_such_user_net.py:factory" in err


def test_without_dot_writes_dot_files_and_says_how_to_install(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    proc = subprocess.run([sys.executable, "-m", "topo_compiler.tools.viz", "nb201", "--C",
                           "4", "--layers", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install graphviz" in proc.stdout
    assert list(tmp_path.glob("*.dot")) and not list(tmp_path.glob("*.svg"))


class Named(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.ops = nn.ModuleDict({n: nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 1))
                                  for n in names})
        self.alpha = nn.Parameter(torch.zeros(len(names)))

    def forward(self, x):
        w = self.alpha.softmax(0)
        return sum(wi * op(x) for wi, op in zip(w, self.ops.values()))


_names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"),
                                        blacklist_characters="."), min_size=1, max_size=8
                 ).filter(lambda n: not hasattr(nn.ModuleDict, n))  # torch refuses 'apply' as a key


@needs_dot
@settings(max_examples=15)
@given(st.lists(_names, min_size=2, max_size=3, unique=True))
def test_dot_escaping_of_user_names(names):
    """Quotes, braces, angle brackets, backslashes and unicode in module names never break
    the DOT: graphviz renders it and the SVG parses."""
    model = Named(names)
    x = torch.randn(1, 2, 3, 3)
    compiled = compile_supernet(model, x, passes=("pms",))
    ir = lift(trace_supernet(compiled, x))
    analyze(ir)
    for graph in (draw(ir, View.full(), title="\\".join(names)), draw(ir, detail=True),
                  draw_network(ir, "<" + names[0] + ">")):
        svg = graph.pipe(format="svg")
        ET.fromstring(svg)


def test_dot_dumps_are_identical_across_runs(tmp_path):
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    for run in ("a", "b"):
        compile_supernet(model, x, dump_dir=tmp_path / run, dump_formats=())
    files = sorted(p.name for p in (tmp_path / "a").glob("*.dot"))
    assert "00-input.dot" in files and "01-pms.dot" in files
    for name in files:
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


@needs_dot
@pytest.mark.slow  # renders 16 SVGs and PNGs of a 14-edge cell: about a minute
def test_dumps_are_identical_across_runs(tmp_path):
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    for run in ("a", "b"):
        compile_supernet(model, x, dump_dir=tmp_path / run, dump_formats=("svg", "png"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "00-input.svg" in files and "01-pms.png" in files and "report.md" in files
    for name in files:
        if name.endswith((".dot", ".svg")):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_views_and_bad_dump_options(tmp_path):
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    with pytest.raises(ValueError, match="dump view"):
        compile_supernet(model, x, dump_dir=tmp_path, dump_view="cells")
    with pytest.raises(ValueError, match="dump formats"):
        compile_supernet(model, x, dump_dir=tmp_path, dump_formats=("gif",))
    ir = lift(trace_supernet(model, x))
    analyze(ir)
    edge = draw(ir, View.edge(edges_of(ir)[0])).source
    assert "w[0, 0]" in edge and "conv / non-conv / total: 6 / 16 / 22" in edge
    assert edge.count("cluster_") == 2  # the edge and the legend
    network = draw_network(ir).source
    assert "14 mixed ops" in network and "cells.2" in network


def test_report_html_says_how_many_decisions_it_leaves_out():
    model = build("darts", C=4, layers=3)
    report = compile_supernet(model, default_input("darts", resolution=8)).report
    total = len(report.decisions)
    assert total > 10
    fragment = report_html(report, max_decisions=10)
    assert fragment.count("<li><b>") == 10
    assert f"{total - 10} more decisions" in fragment and f"decisions ({total})" in fragment
    assert f"more decisions" not in report_html(report, max_decisions=total)


def _dot_edges(source):
    return [tuple(p.strip().split(" ")[0] for p in line.strip().split("->"))
            for line in source.splitlines() if "->" in line]


def test_network_view_has_no_cycles_after_any_stage():
    """Cells are drawn in data-flow order after every pass: kernel normalization's one
    batched call per kernel shape reads kernels of every cell, but kernels are not data
    (5 cells: the smallest DARTS network where the batched call drew c2 -> c1)."""
    import networkx as nx
    model = build("darts", C=4, layers=5)
    x = default_input("darts", resolution=8)
    checked = []

    def check(index, stage, ir):
        g = nx.DiGraph(_dot_edges(draw_network(ir).source))
        assert g.number_of_edges() > 3
        assert {"c0", "c1", "c4"} <= set(g), stage.name
        assert nx.is_directed_acyclic_graph(g), (stage.name, nx.find_cycle(g))
        assert nx.has_path(g, "c0", "c4")
        checked.append(stage.name)

    compile_supernet(model, x, hooks=[check])
    assert "kn" in checked and len(checked) >= 5
