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


def test_quick_search_runs_every_configuration_and_exact_matches_eager(tmp_path):
    threads = torch.get_num_threads()
    markdown = tmp_path / "BENCHMARKS.md"
    try:
        search.main(["--quick", "--no-progress", "--out", str(tmp_path),
                     "--markdown", str(markdown)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "search-cpu.json").read_text())
    summary = result["summary"]
    assert list(summary)[:2] == ["eager", "exact"] and "default" in summary
    eager, exact = summary["eager"], summary["exact"]
    assert eager["epoch_ratio"] == pytest.approx(1.0)
    assert eager["peak_ratio"] == pytest.approx(1.0)
    # exact mode keeps the function: the same search, up to float rounding
    assert exact["genotype_same_as_eager"] == [True]
    assert exact["max_alpha_diff_vs_eager"] < 1e-4
    for name, s in summary.items():
        assert len(s["val_acc_mean_per_epoch"]) == 2, name
        assert len(s["entropy_mean_per_epoch"]) == 3, name  # initial alphas + 2 epochs
        assert 0.0 <= s["test_acc_mean"] <= 1.0, name
    run = result["per_seed"]["0"]["default"]
    assert len(run["genotype"]["normal"]) == 8 and run["decisions"]
    text = markdown.read_text()
    assert "benchmarks:search:begin" in text and "| exact |" in text
