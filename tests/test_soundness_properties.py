"""Pass soundness over generated cells (hypothesis): random candidate sets with random widths
(expand ratios, MBConv blocks), kernel sizes, dilations, strides, zero and identity candidates,
the sum, stack and zero-slot forms, edge normalization on or off.

* every pass, alone and in the pipeline, rewrites into a verified IR or declines;
* exact mode equals eager: outputs and gradients;
* paper mode at every one-hot vertex equals the chosen sub-network.

Marked ``slow``: CI runs them with few examples each (``SOUNDNESS_EXAMPLES``, default 10;
raise it for a longer hunt).
"""
import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies
from helpers import assert_same_step
from topo_compiler import compile_supernet
from topo_compiler.passes import PIPELINE

pytestmark = pytest.mark.slow

VARIANTS = strategies.cell_specs(variants=True)
EXAMPLES = int(os.environ.get("SOUNDNESS_EXAMPLES", "10"))


@settings(max_examples=EXAMPLES)
@given(VARIANTS, st.booleans())
def test_every_pass_rewrites_into_a_verified_ir_or_declines(spec, exact):
    """The pass manager verifies the IR after every pass (meta values recomputed from the
    inputs' shapes): a join of different shapes or dtypes raises there."""
    model, x = strategies.build(spec)
    expected = model(x).shape
    for passes in [(p,) for p in PIPELINE] + [None]:
        compiled = compile_supernet(model, x, passes=passes, exact=exact)
        assert compiled(x).shape == expected


@settings(max_examples=EXAMPLES)
@given(VARIANTS)
def test_exact_mode_equals_eager(spec):
    model, x = strategies.build(spec)
    compiled = compile_supernet(model, x, exact=True)
    assert_same_step(model, compiled, (x,), rtol=1e-4, atol=1e-5)


def _include_pad(spec):
    """Average pools counting the padding: DARTS's count_include_pad=False pool is merged in
    the paper's mode on purpose (inexact at the borders, by design)."""
    def fix(chain):
        return tuple(("avgpool", True) if isinstance(t, tuple) and t[:1] == ("avgpool",)
                     else t for t in chain)
    return dataclasses.replace(spec, candidates=tuple(tuple(fix(c) for c in cands)
                                                      for cands in spec.candidates))


@settings(max_examples=EXAMPLES)
@given(VARIANTS)
def test_paper_mode_at_every_one_hot_vertex_is_the_chosen_subnetwork(spec):
    """PMS, FMS and merge in the paper's mode (KN changes the kernels on purpose): at
    one-hot architecture weights -- the edge weights of edge normalization stay soft --
    the compiled supernet computes the chosen sub-network, forward and backward finite."""
    model, x = strategies.build_with_weights(_include_pad(spec))
    onehots = strategies.one_hot_rows(spec)
    compiled = compile_supernet(model, (x, onehots[0]), passes=("pms", "fms", "merge"))
    for w in onehots:
        w = w.clone().requires_grad_(True)
        out = compiled(x, w)
        torch.testing.assert_close(out, model(x, w), rtol=1e-4, atol=1e-5)
        out.square().sum().backward()
        assert torch.isfinite(w.grad).all()
        model.zero_grad()
