"""The report a newcomer reads: short by default, decisions in the user's words, stages that
mean what they say."""
import json

import pytest

from topo_compiler import compile_supernet
from topo_compiler.__main__ import main
from topo_compiler.spaces import build, default_input


@pytest.fixture(scope="module")
def darts():
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    return compile_supernet(model, x).report, compile_supernet(model, x, exact=True).report


def test_stage_is_the_first_working_run_and_repeats_are_explicit(darts):
    report, _ = darts
    runs = report.runs("pms")
    assert [s.name for s in runs] == ["pms", "pms#2", "pms#3"]
    assert report.stage("pms") is runs[0] and runs[0].changed and runs[0].decisions
    assert report.stage("pms#3") is runs[2] and not runs[2].changed
    assert report.stage("input") is report.input
    with pytest.raises(KeyError, match="stages"):
        report.stage("pms#9")


def test_exact_mode_shows_skipped_passes_as_skipped(darts):
    _, exact = darts
    fms, kn = exact.stage("fms"), exact.stage("kn")
    assert fms.skipped and kn.skipped and not fms.changed and not kn.changed
    assert [s.name for s in exact.runs("fms")] == ["fms"]  # once, not once per round
    md = exact.to_markdown()
    assert "| fms | skipped: exact mode" in md and "| kn | skipped: exact mode" in md
    assert "fms: skipped (exact mode" in exact.summary()
    assert json.loads(exact.to_json())["stages"][2]["skipped"]


def test_summary_is_one_line_per_pass_and_kind(darts):
    report, _ = darts
    lines = report.summary().splitlines()
    assert len(lines) < 20 < len(report.decisions)
    pms = [line for line in lines if line.startswith("pms: ")]
    assert pms[0] == ("pms: SepConv 3x3, SepConv 5x5, DilConv 3x3 d2, DilConv 5x5 d2 share "
                      "their leading and trailing module: 26 mixed ops, 156 modules removed "
                      "(6 each)")
    assert sum(d.removed for _, d in report.decisions if _ == "pms") == \
        report.input.counts.total - report.stage("pms").counts.total
    for _, d in report.decisions:  # no fx node names, no bare candidate indices
        assert "add_" not in d and "[4, 5, 6, 7]" not in d


def test_to_markdown_says_how_much_it_leaves_out(darts):
    report, _ = darts
    n = len(report.decisions)
    md = report.to_markdown(max_mixed_ops=5, max_decisions=7)
    section = md.split("### Decisions\n\n")[1].split("\n\n")[0]
    assert len(section.splitlines()) == 7
    assert f"{n - 7} more decisions" in md and "37 more mixed ops" in md
    full = report.to_markdown(max_mixed_ops=None, max_decisions=None)
    assert "more decisions" not in full and "more mixed ops" not in full
    assert all(str(d) in full for _, d in report.decisions)


def test_nothing_merged_is_not_reported_as_merged():
    """A toy whose merge the cost model declines: kn does not claim merged convolutions."""
    import torch
    from torch import nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            w = self.alpha.softmax(0)
            return w[0] * self.a(x) + w[1] * self.b(x)

    report = compile_supernet(Two(), torch.randn(2, 3, 8, 8)).report
    summary = report.summary()
    assert not report.stage("merge").changed
    assert ("kept a (Conv2d 3x3), b (Conv2d 1x1) apart: merging them would make the step "
            "costlier") in summary
    assert "merged convolutions" not in summary
    assert "normalized the kernels of 2 convolutions in linear candidates" in summary


def test_cli_is_short_by_default(capsys):
    args = ["darts", "--C", "4", "--layers", "3", "--batch", "2"]
    assert main(args) == 0
    short = capsys.readouterr().out
    assert main(args + ["--verbose"]) == 0
    verbose = capsys.readouterr().out
    assert main(args + ["--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert len(short.splitlines()) < 60 < 250 < len(verbose.splitlines())
    assert "### Summary" in short and "### Decisions" not in short
    assert "decisions in all" in short and "### Decisions" in verbose
    assert quiet.count("\n") == 1 and quiet.startswith("darts: 42 mixed ops")
