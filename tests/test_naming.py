"""Names in the user's words: candidates by ModuleDict key or class and kernel, values by
the module that produced them, sums of mixed ops by their terms."""
import torch
from torch import nn

from topo_compiler import lift, trace_supernet
from topo_compiler.api import analyze
from topo_compiler.naming import candidate_names, value_name
from topo_compiler.spaces import build, default_input


def _ir(model, x):
    ir = lift(trace_supernet(model, x))
    return ir, analyze(ir)


def test_darts_candidates_are_named_by_class_and_kernel():
    ir, ops = _ir(build("darts", C=4, layers=3), default_input("darts", resolution=8))
    names = candidate_names(ir, ops[0])
    assert names == ["zero", "MaxPool2d 3x3", "AvgPool2d 3x3", "skip (identity)",
                     "SepConv 3x3", "SepConv 5x5", "DilConv 3x3 d2", "DilConv 5x5 d2"]
    assert value_name(ir, ops[0].input) == "cells.0.preprocess0.op.2 (BatchNorm2d)"
    # the fifth edge reads the cell's first intermediate node: the sum of two edges
    assert value_name(ir, ops[4].input) == "cells.0._ops.0 + cells.0._ops.1"
    reduce_names = candidate_names(ir, ops[28])  # cells.2 is a reduction cell
    assert "FactorizedReduce 1x1" in reduce_names


class _Keyed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleDict({"wide": nn.Conv2d(2, 2, 3, padding=1),
                                  "narrow": nn.Conv2d(2, 2, 1),
                                  "again": nn.Conv2d(2, 2, 1)})
        self.alpha = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        w = self.alpha.softmax(0)
        ops = self.ops.values() if isinstance(self.ops, nn.ModuleDict) else self.ops
        return sum(wi * op(x) for wi, op in zip(w, ops))


class _Listed(_Keyed):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList(self.ops.values())


def test_moduledict_keys_name_candidates_and_repeats_get_an_index():
    ir, (op,) = _ir(_Keyed(), torch.randn(1, 2, 5, 5))
    assert candidate_names(ir, op) == ["wide", "narrow", "again"]
    assert value_name(ir, op.input) == "input x"
    ir, (op,) = _ir(_Listed(), torch.randn(1, 2, 5, 5))
    assert candidate_names(ir, op) == ["Conv2d 3x3", "Conv2d 1x1 [1]", "Conv2d 1x1 [2]"]


def test_merge_decisions_name_candidates_after_kn_batched_their_kernels():
    """``kn`` runs before ``merge`` and reads every kernel of one shape through one
    ``normalize_kernels([...])[i]`` call: merge's decisions still name the candidates by class
    and kernel (they said ``getitem [0], getitem [1]``), as without ``kn``."""
    import warnings

    from topo_compiler import compile_supernet

    model, x = build("darts", C=4, layers=2), default_input("darts", resolution=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lines = {passes: [(str(d), d.kind) for stage, d in compile_supernet(
            model, x, passes=passes).report.decisions if stage == "merge"]
                 for passes in (("pms", "fms", "merge"), ("pms", "fms", "kn", "merge"))}
    assert lines[("pms", "fms", "kn", "merge")] == lines[("pms", "fms", "merge")]
    assert any("SepConv 3x3, SepConv 5x5" in kind for _, kind in lines[("pms", "fms", "merge")])
    assert any("[conv2d 3x3 s2x2 g8 + conv2d 1x1" in text
               for text, _ in lines[("pms", "fms", "merge")])
