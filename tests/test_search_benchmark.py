"""The search-fidelity benchmark (``python -m benchmarks.search``): its quick run end to end,
and the discrete network it retrains."""

import json

import pytest
import torch

from topo_compiler import spaces

pytest.importorskip("sklearn", reason="benchmarks.search needs scikit-learn "
                                      "(pip install 'topo-compiler[test]')")

from benchmarks import search  # noqa: E402


def test_discrete_network_follows_the_genotype():
    torch.manual_seed(0)
    model = spaces.build("darts", C=4, layers=3)
    genotype = model.genotype()
    net = search.DiscreteNetwork(genotype, C=4, layers=3)
    assert [len(cell._ops) for cell in net.cells] == [8, 8, 8]
    reduction = net.cells[1]
    assert reduction.reduction
    ops = [type(op).__name__ for op in reduction._ops]
    expected = [type(spaces.OPS[name](4, 2 if j < 2 else 1, True)).__name__
                for name, j in genotype.reduce]
    assert ops == expected
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_edge_agreement_counts_shared_edges_per_node():
    a = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce": []}
    b = {"normal": [["skip_connect", 1], ["sep_conv_5x5", 0]], "reduce": []}
    assert search.edge_agreement(a, b) == (1, 2)
    assert search.edge_agreement(a, a) == (2, 2)


def test_decisions_and_their_margins_follow_the_genotype_rule():
    torch.manual_seed(0)
    model = spaces.build("darts", C=4, layers=3)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.copy_(torch.randn_like(a))
    primitives = model.primitives
    made = search.decisions(model.arch_parameters(), primitives)
    # per cell type: an edge decision for nodes 1-3 (3, 4, 5 inputs), an op for 8 kept edges
    assert len(made) == 2 * (3 + 8)
    genotype = model.genotype()
    for cell, gene in (("normal", genotype.normal), ("reduce", genotype.reduce)):
        ops = [(primitives[d.choice[0]], d.edge) for d in made
               if d.cell == cell and d.kind == "op"]
        assert sorted(ops) == sorted(gene)
    assert all(d.margin >= 0 for d in made)
    assert search.flipped(made, model.arch_parameters(), primitives) == []
    # swap the best and runner-up op of one kept edge: exactly that op decision flips
    d = min((d for d in made if d.kind == "op" and d.cell == "normal"),
            key=lambda d: d.margin)
    row = sum(n + 2 for n in range(d.node)) + d.edge
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    keep = [k for k in range(len(primitives)) if primitives[k] != "none"]
    top2 = alphas[0][row, keep].topk(2).indices
    i, j = keep[int(top2[0])], keep[int(top2[1])]
    alphas[0][row, i], alphas[0][row, j] = alphas[0][row, j].item(), alphas[0][row, i].item()
    assert search.flipped(made, alphas, primitives) == [d]


def test_quick_search_runs_every_configuration_and_exact_matches_eager(tmp_path):
    threads = torch.get_num_threads()
    markdown = tmp_path / "BENCHMARKS.md"
    try:
        search.main(["--quick", "--dtype", "float64", "--no-progress", "--out", str(tmp_path),
                     "--markdown", str(markdown)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "search-cpu.json").read_text())
    summary = result["summary"]
    assert list(summary)[:3] == ["eager", "eager-rev", "exact"] and "default" in summary
    assert "pms+fms+kn" not in summary  # optional: only when --configs names it
    eager, exact = summary["eager"], summary["exact"]
    assert eager["epoch_ratio"] == pytest.approx(1.0)
    assert eager["peak_ratio"] == pytest.approx(1.0)
    # exact mode keeps the function: in float64 (no float32 rounding to amplify, see
    # BENCHMARKS.md) the same search as eager up to rounding, as eager-rev's
    for name in ("eager-rev", "exact"):
        assert summary[name]["genotype_same_as_eager"] == [True], name
        assert summary[name]["flipped_per_seed"] == [0], name
        assert 0 < summary[name]["max_alpha_diff_vs_eager"] < 1e-10, name
    # the paper's pipelines search another function: their alphas part from eager's
    assert summary["default"]["max_alpha_diff_vs_eager"] > 1e-3
    steps = 2 * (64 // 32)  # two epochs of two architecture steps
    a_lr = result["settings"]["a_lr"]
    for name, s in summary.items():
        assert len(s["val_acc_mean_per_epoch"]) == 2, name
        assert len(s["entropy_mean_per_epoch"]) == 3, name  # initial alphas + 2 epochs
        # Adam moves an alpha by about lr per step: the alphas did move, by no more than that
        assert s["movement_mean_per_epoch"][0] == 0.0
        assert 0.5 * a_lr < s["movement_mean_per_epoch"][-1] < 2 * steps * a_lr, name
        assert s["entropy_mean_per_epoch"][-1] < s["entropy_mean_per_epoch"][0], name
        assert 0.0 <= s["test_acc_mean"] <= 1.0, name
    run = result["per_seed"]["0"]["default"]
    assert len(run["genotype"]["normal"]) == 8 and run["compiler"]
    assert run["n_decisions"] == 22 and run["min_margin"] >= 0
    text = markdown.read_text()
    assert "benchmarks:search:begin" in text and "| exact |" in text
