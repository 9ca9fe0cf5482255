"""Reparameterization (merge) and kernel normalization (kn)."""
import copy
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import strategies
from helpers import assert_same_step
from topo_compiler import compile_supernet, lift, lower
from topo_compiler.api import analyze
from topo_compiler.pass_manager import FixedPoint, PassManager
from topo_compiler.passes import build_pipeline
from topo_compiler.passes.partial_module_sharing import PartialModuleSharing
from topo_compiler.passes.reparameterization import Reparameterization
from topo_compiler.passes.weight_folding import WeightFolding
from topo_compiler.runtime import normalize_kernel
from topo_compiler.spaces import build, default_input
from topo_compiler.tracer import trace_supernet

FORMS = ("dense", "depthwise", "separable", "folded")


def _merged(model, args, form=None, exact=True, passes=("merge",)):
    opts = {"merge": {"form": form}} if form else None
    return compile_supernet(model, args, passes=passes, exact=exact, pass_options=opts)


def _decisions(compiled, stage="merge"):
    return [d for s in compiled.report.stages if s.name == stage for d in s.decisions]


@given(strategies.linear_specs(), st.sampled_from(FORMS))
def test_exact_merge_keeps_outputs_and_gradients(spec, form):
    """Merging random sets of linear candidates (kernel sizes, dilations, groups, bias,
    identity, zero, avg pool with count_include_pad=True, separable pairs) equals the
    unmerged weighted sum: outputs and gradients, fp32 tolerance."""
    model, x = strategies.build_linear(spec)
    compiled = _merged(model, x, form)
    if any("merged" in d for d in _decisions(compiled)):
        assert "merged_conv" in compiled.code or "folded_conv" in compiled.code
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


@settings(max_examples=15)
@given(strategies.linear_specs(), st.sampled_from(FORMS))
def test_exact_merge_in_float64(spec, form):
    model, x = strategies.build_linear(spec, torch.float64)
    compiled = _merged(model, x, form)
    assert_same_step(model, compiled, (x,), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 3])
def test_merge_1d_and_3d_convolutions(dims):
    spec = strategies.LinearSpec(4, 6, 1, dims, (("conv", 3, 1, "full", True),
                                                 ("sep", 3, 2, False), ("identity",),
                                                 ("avgpool", True)), 5)
    model, x = strategies.build_linear(spec)
    compiled = _merged(model, x, "dense")
    assert len(_decisions(compiled)) == 1
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


@given(strategies.linear_specs())
def test_merged_conv_at_one_hot_weights_is_the_chosen_candidate(spec):
    model, x = strategies.build_linear(spec)
    n = len(spec.candidates)
    compiled = _merged(model, (x, torch.eye(n)[0]), "dense", exact=False)
    for k in range(n):
        w = torch.eye(n)[k]
        torch.testing.assert_close(compiled(x, w), model(x, w), rtol=1e-4, atol=1e-5)


def test_count_include_pad_false_is_merged_in_paper_mode_only():
    spec = strategies.LinearSpec(4, 8, 1, 2, (("conv", 3, 1, "depthwise", False),
                                              ("avgpool", False), ("identity",)), 1)
    model, x = strategies.build_linear(spec)
    exact = _merged(model, x, "depthwise", exact=True)
    paper = _merged(model, x, "depthwise", exact=False)
    assert "avg_pool2d" not in " ".join(_decisions(exact))
    (decision,) = _decisions(paper)
    assert "avg_pool2d" in decision and "paper's mode only" in decision
    assert_same_step(model, exact, (x,), rtol=1e-4, atol=1e-5)


def test_misaligned_candidates_are_never_merged():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 2)               # taps at offsets 0, 1
            self.b = nn.Conv2d(4, 4, 1)               # reads x shifted by one pixel
            self.alpha = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            w = self.alpha.softmax(0)
            return w[0] * self.a(x) + w[1] * self.b(x[:, :, 1:, 1:])

    x = torch.randn(2, 4, 6, 6)
    model = Shifted()
    compiled = _merged(model, x, "dense")
    assert not any("merged" in d for d in _decisions(compiled))
    torch.testing.assert_close(compiled(x), model(x))


def test_table_ii_last_row_and_table_v_ablations():
    """DARTS normal edge (Table I op set): reparameterization reaches 3/6/9; the paper's
    Table V rows compile by name."""
    model = build("darts", C=16, edge=True, pool_bn=False)
    x = default_input("darts", C=16, edge=True, resolution=16)
    rows = {"+sharing": ("pms", "fms"), "+sharing+KN": ("pms", "fms", "kn"),
            "+sharing+reparam": ("pms", "fms", "merge"), "+all": None}
    counts = {row: str(compile_supernet(model, x, passes=p).report.final.counts)
              for row, p in rows.items()}
    assert counts == {"+sharing": "6/6/12", "+sharing+KN": "6/6/12",
                      "+sharing+reparam": "3/6/9", "+all": "3/6/9"}


@pytest.mark.slow  # compiles and runs a 3-cell DARTS network three ways
def test_merge_is_exact_relative_to_the_shared_graph_including_factorized_reduce():
    """In the paper's mode merge is exact with respect to the graph PMS+FMS produced, also on
    reduction edges where FactorizedReduce's linear core joins the merged convolution."""
    model = build("darts", C=4, layers=3)
    x = default_input("darts", resolution=8)
    shared = compile_supernet(model, x, passes=("pms", "fms"))
    merged = compile_supernet(model, x, passes=("pms", "fms", "merge"),
                              pass_options={"merge": {"form": "dense"}})
    assert any("factorized reduce" in d for d in _decisions(merged))
    assert_same_step(shared, merged, (x,), rtol=1e-4, atol=1e-5)


def test_cost_model_keeps_expensive_dense_merges_apart():
    """Wide channels and large dilated kernels: a dense kernel would multiply FLOPs, so the
    cost model picks another form or keeps candidates apart -- never a costlier step."""
    spec = strategies.LinearSpec(64, 16, 1, 2, (("sep", 5, 2, False), ("sep", 3, 1, False),
                                                ("identity",)), 3)
    model, x = strategies.build_linear(spec)
    compiled = compile_supernet(model, x, passes=("merge",))
    for d in _decisions(compiled):
        if "merged" in d:
            assert "dense" not in d
            assert "est. step time -" in d or "est. step time +0%" in d
    declined = [d for d in _decisions(compiled) if "apart:" in d]
    assert declined, "a merge the cost model declines is reported, with its estimate"
    for d in declined:  # in the model's words, grouped by kind in the summary
        assert d.kind.startswith("kept ") and " apart: " in d.kind and "est. step" in d
    ir = lift(trace_supernet(model, x))
    analyze(ir)
    PassManager([Reparameterization(form="dense")]).run(ir)  # forced: still correct
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


def test_depthwise_form_for_per_channel_candidates():
    """Per-channel candidates (depthwise convs, identity, pooling) merge into one depthwise
    kernel when channels are many: cheaper than both keeping them apart and a dense kernel."""
    spec = strategies.LinearSpec(32, 32, 1, 2, (("conv", 3, 1, "depthwise", False),
                                                ("conv", 5, 1, "depthwise", True),
                                                ("identity",), ("avgpool", True), ("zero",)), 2)
    model, x = strategies.build_linear(spec)
    for device in ("cpu", "cuda"):
        compiled = compile_supernet(model, x, passes=("merge",), exact=True,
                                    pass_options={"merge": {"device": device, "batch": 64}})
        (decision,) = _decisions(compiled)
        assert ("merged Conv2d 3x3, Conv2d 5x5, skip (identity), AvgPool2d 3x3, zero into one "
                "depthwise 5x5 conv") in decision
    assert compiled.report.final.counts.conv == 3  # stem, merged conv, linear head
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


def test_merge_options_are_validated():
    model = build("nb201", C=4, edge=True)
    x = default_input("nb201", C=4, edge=True, resolution=8)
    with pytest.raises(ValueError, match="form"):
        compile_supernet(model, x, pass_options={"merge": {"form": "fused"}})
    with pytest.raises(TypeError, match="no option"):
        compile_supernet(model, x, pass_options={"merge": {"speed": 1}})
    with pytest.raises(ValueError, match="not run"):
        compile_supernet(model, x, passes=("pms",), pass_options={"merge": {}})


def test_pass_options_are_validated_before_any_pass_runs(monkeypatch):
    """A bad option value raises when the pipeline is built: nothing is traced first."""
    import topo_compiler.api as api

    def trace_first(*args, **kwargs):
        raise AssertionError("traced before the pass options were checked")

    monkeypatch.setattr(api, "trace_supernet", trace_first)
    model = build("nb201", C=4, edge=True)
    x = default_input("nb201", C=4, edge=True, resolution=8)
    with pytest.raises(ValueError, match="merge form 'fused'"):
        compile_supernet(model, x, pass_options={"merge": {"form": "fused"}})
    with pytest.raises(ValueError, match="merge device 'tpu'"):
        build_pipeline(None, {"merge": {"device": "tpu"}})


def test_fold_is_a_pass_of_its_own_with_its_own_stage():
    """merge no longer folds; fold does, once (a second run changes nothing); naming merge
    runs fold too."""
    model = build("nb201", C=8, edge=True)
    x = default_input("nb201", C=8, edge=True, resolution=8)
    ir = lift(trace_supernet(model, x))
    analyze(ir)
    stages = PassManager([FixedPoint((PartialModuleSharing(),)), Reparameterization(),
                          WeightFolding(), WeightFolding()]).run(ir)
    assert [s.name for s in stages] == ["input", "pms", "pms#2", "merge", "fold", "fold"]
    assert [s.changed for s in stages[3:]] == [True, True, False]
    assert not any(re.search(r"folded \d+ weight", d) for d in stages[3].decisions)
    assert any("folded 3 weights" in d for d in stages[4].decisions)
    compiled = lower(ir)
    assert "scaled_batch_norm" in compiled.code
    torch.testing.assert_close(compiled(x), compile_supernet(model, x, passes=("pms",))(x),
                               rtol=1e-5, atol=1e-6)
    assert compile_supernet(model, x, passes=("merge",)).report.passes == ("merge", "fold")


# --- kernel normalization ----------------------------------------------------------------

@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from((1, 3)),
       st.floats(0.1, 10.0), st.floats(-5.0, 5.0), st.integers(0, 1000))
def test_normalized_kernel_ignores_scale_and_shift(c_out, c_in, k, a, b, seed):
    torch.manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k)
    assume(c_in * k * k > 1)
    torch.testing.assert_close(normalize_kernel(a * w + b), normalize_kernel(w),
                               rtol=1e-4, atol=1e-4)


def test_constant_and_low_precision_kernels_stay_finite():
    const = torch.full((3, 2, 3, 3), 0.7, requires_grad=True)
    out = normalize_kernel(const)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(const.grad).all()
    for dtype in (torch.float16, torch.bfloat16):
        big = (torch.randn(4, 4, 3, 3) * 2e4).clamp(-6e4, 6e4).to(dtype)  # squares overflow
        assert normalize_kernel(big).dtype == dtype
        assert torch.isfinite(normalize_kernel(big)).all()
        assert torch.isfinite(normalize_kernel(torch.ones(2, 2, 1, 1, dtype=dtype))).all()


def _normalized_copy(model):
    """The reference of Eq. 28: every learnable kernel of a linear candidate normalized."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for op in ref._ops:
            for m in op.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    m.weight.copy_(normalize_kernel(m.weight))
    return ref


@given(strategies.linear_specs(), st.sampled_from((None, "dense", "separable", "folded")))
def test_kn_equals_the_model_with_normalized_kernels(spec, form):
    model, x = strategies.build_linear(spec)
    opts = {"merge": {"form": form}} if form else None
    compiled = compile_supernet(model, x, passes=("merge", "kn"), pass_options=opts)
    model.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _normalized_copy(model)(x), rtol=1e-4,
                                   atol=1e-5)


def test_kn_is_skipped_in_exact_mode_and_runs_once():
    spec = strategies.LinearSpec(4, 8, 1, 2, (("conv", 3, 1, "full", False),
                                              ("sep", 3, 1, False), ("identity",)), 4)
    model, x = strategies.build_linear(spec)
    exact = compile_supernet(model, x, passes=("merge", "kn"), exact=True)
    assert not exact.report.stage("kn").changed
    paper = compile_supernet(model, x, passes=("merge", "kn"))
    assert paper.report.stage("kn").changed
    retraced = lift(trace_supernet(paper, x))
    analyze(retraced)
    again = PassManager(build_pipeline(("merge", "kn"))).run(retraced)
    assert not any(s.changed for s in again)  # nothing left to merge or normalize


def test_kn_run_in_bfloat16_has_no_nan():
    spec = strategies.LinearSpec(4, 8, 1, 2, (("conv", 3, 1, "full", False),
                                              ("conv", 1, 1, "full", True), ("zero",)), 6)
    model, x = strategies.build_linear(spec, torch.bfloat16)
    with torch.no_grad():
        model._ops[0].weight.fill_(0.25)  # a constant kernel
    compiled = compile_supernet(model, x, passes=("merge", "kn"))
    out = compiled(x)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters()
               if p.grad is not None)


@given(strategies.cell_specs())
def test_exact_pipeline_with_weight_folding_keeps_function_and_statistics(spec):
    """Folding a weight into the conv or BatchNorm computing its term is exact: outputs,
    gradients and the running statistics one training step leaves behind."""
    model, x = strategies.build(spec)
    twin = copy.deepcopy(model)
    compiled = compile_supernet(model, x, passes=("pms", "fms", "merge"), exact=True)
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)
    compiled.train(), twin.train()
    with torch.no_grad():
        compiled(x), twin(x)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_weights_fold_into_batchnorm_and_convs():
    model = build("nb201", C=8, edge=True)
    x = default_input("nb201", C=8, edge=True, resolution=8)
    compiled = compile_supernet(model, x, passes=("pms", "merge"))  # merge implies fold
    assert any("folded" in d for d in _decisions(compiled, "fold"))
    assert "scaled_batch_norm" in compiled.code
    assert compiled.report.final.counts.non_conv == 3  # shared ReLU and BatchNorm, pool
    torch.testing.assert_close(compiled(x), compile_supernet(model, x, passes=("pms",))(x),
                               rtol=1e-5, atol=1e-6)


@settings(max_examples=15)
@given(strategies.cell_specs())
def test_kn_runs_before_merge_and_fold_so_their_decisions_keep_the_function(spec):
    """Which kernels kn normalizes must not depend on memory decisions: the default pipeline
    computes what sharing plus kn computes, whether fold folds everything (a large batch) or
    nothing (batch 1) and whatever the merge cost model decides."""
    model, x = strategies.build(spec)
    reference = compile_supernet(model, x, passes=("pms", "fms", "kn"))
    for batch in (1, 4096):
        compiled = compile_supernet(model, x, pass_options={"fold": {"batch": batch}})
        assert_same_step(reference, compiled, (x,), rtol=1e-4, atol=1e-5)


def _kn_counts(report) -> list[str]:
    return [d for d in report.stage("kn").decisions if "kernels normalized" in d]


def test_darts_kn_normalizes_the_same_kernels_at_every_batch():
    """DARTS's separable convolutions: fold declines the pointwise products at a small batch
    and takes them at a large one; kn's kernels and the function stay the same."""
    torch.manual_seed(0)
    model = build("darts", C=4, layers=2)
    x = torch.randn(2, 3, 8, 8)
    small = compile_supernet(model, (x,), pass_options={"fold": {"batch": 2}})
    large = compile_supernet(model, (x,), pass_options={"fold": {"batch": 4096}})
    folded = [d for d in small.report.stage("fold").decisions if d.startswith("folded")]
    assert folded != [d for d in large.report.stage("fold").decisions
                      if d.startswith("folded")], "fold should decide differently"
    assert _kn_counts(small.report) == _kn_counts(large.report) != []
    assert_same_step(small, large, (x,), rtol=1e-4, atol=1e-5)


def test_kernel_normalization_keeps_each_filters_mean():
    """Whole-kernel statistics: a depthwise filter keeps its response to a local average
    (per-filter standardization made every filter sum to zero), and the whole kernel's scale
    and shift, which an architecture weight couples with, are gone."""
    torch.manual_seed(0)
    kernel = torch.randn(8, 1, 3, 3) + torch.linspace(-2, 2, 8).view(8, 1, 1, 1)
    out = normalize_kernel(kernel)
    filter_means = out.mean(dim=(1, 2, 3))
    assert filter_means.abs().max() > 0.5
    torch.testing.assert_close(out.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
