"""Eager-mode tests of the built-in search spaces (topo_compiler.spaces)."""
import re
from collections import Counter

import pytest
import torch
import torch.nn as nn

from topo_compiler import spaces
from topo_compiler.spaces import darts, nb201, wide
from topo_compiler.spaces.ops import OPS, DilConv, FactorizedReduce, SepConv, Zero

# Small configurations that keep every forward pass cheap on a CPU.
SMALL = {
    "darts": dict(C=4, layers=3),
    "nb201": dict(C=4, layers=1),
    "wide": dict(C=4, layers=3),
}
RES = 8
NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def logits_of(out):
    """nb201 returns (features, logits) like AutoDL; the DARTS networks return logits."""
    return out[1] if isinstance(out, tuple) else out


def small_model(name, **kw):
    cfg = dict(SMALL[name], num_classes=NUM_CLASSES, **kw)
    return spaces.build(name, **cfg), spaces.default_input(name, resolution=RES, **cfg)


def edge_model(name, C=4, **kw):
    return (spaces.build(name, C=C, edge=True, **kw),
            spaces.default_input(name, resolution=RES, C=C, edge=True))


def type_counts(module):
    return Counter(type(m).__name__ for m in module.modules())


# --------------------------------------------------------------------------- build API

def test_spaces_tuple():
    assert spaces.SPACES == ("darts", "nb201", "wide")


def test_unknown_space_lists_known_ones():
    with pytest.raises(ValueError, match="darts.*nb201.*wide"):
        spaces.build("nasnet")
    with pytest.raises(ValueError, match="known spaces"):
        spaces.default_input("nasnet")


def test_unknown_kwargs_are_named():
    with pytest.raises(TypeError, match="bogus.*typo"):
        spaces.build("darts", bogus=1, typo=2)
    with pytest.raises(TypeError, match="pool_bn"):
        spaces.build("nb201", pool_bn=False)  # NB201 pools have no BN to drop
    with pytest.raises(TypeError, match="num_ops"):
        spaces.build("darts", num_ops=4)
    with pytest.raises(TypeError, match="bogus"):
        spaces.default_input("wide", bogus=1)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="layers"):
        spaces.build("darts", layers=0)
    with pytest.raises(ValueError, match="unknown primitives"):
        spaces.build("darts", primitives=["sep_conv_3x3", "conv_9x9"])
    with pytest.raises(ValueError, match="duplicate"):
        spaces.build("nb201", primitives=["skip_connect", "skip_connect"])
    with pytest.raises(ValueError, match="other than 'none'"):
        spaces.build("darts", primitives=["none"])
    with pytest.raises(ValueError, match="num_ops"):
        spaces.build("wide", num_ops=17)


def test_default_input_shapes():
    assert spaces.default_input("darts").shape == (2, 3, 32, 32)
    assert spaces.default_input("nb201", batch=3, resolution=16).shape == (3, 3, 16, 16)
    assert spaces.default_input("darts", edge=True, C=16).shape == (2, 16, 32, 32)
    assert spaces.default_input("wide", edge=True).shape == (2, 16, 32, 32)
    assert spaces.default_input("nb201", edge=True, C=8, resolution=5).shape == (2, 8, 5, 5)
    # build's own arguments are accepted and ignored where they don't matter
    assert spaces.default_input("wide", C=4, layers=2, num_classes=3, num_ops=5).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        spaces.default_input("darts", resolution=30)


@pytest.mark.parametrize("name, layers, edges", [
    ("darts", None, 8 * 14),
    ("darts", 5, 5 * 14),
    ("wide", None, 5 * 14),
    ("nb201", None, 15 * 6),
    ("nb201", 5, 15 * 6),
    ("nb201", 2, 6 * 6),
])
def test_num_mixed_ops(name, layers, edges):
    model = spaces.build(name, C=4, layers=layers)
    assert model.num_mixed_ops == edges
    if name == "nb201":
        found = sum(len(cell.edges) for cell in model.cells if isinstance(cell, nb201.SearchCell))
    else:
        found = sum(isinstance(m, darts.MixedOp) for m in model.modules())
    assert found == edges


def test_darts_default_matches_original_size():
    # DARTS' train_search.py reports "param size = 1.930618MB" for the default search network.
    model = spaces.build("darts")
    assert len(model.cells) == 8
    assert sum(p.numel() for p in model.weights()) == 1930618


# --------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("name", spaces.SPACES)
def test_forward_backward(name):
    model, x = small_model(name)
    out = model(x)
    if name == "nb201":
        features, logits = out
        assert features.shape == (2, 4 * SMALL[name]["C"])
    else:
        logits = out
    assert logits.shape == (2, NUM_CLASSES)
    logits.square().sum().backward()
    for alpha in model.arch_parameters():
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.weights())


@pytest.mark.parametrize("name", spaces.SPACES)
def test_edge_forward_backward(name):
    model, x = edge_model(name)
    assert x.shape == (2, 4, RES, RES)
    y = model(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert model.num_mixed_ops == 1
    assert model.arch_parameters() == [model.alpha]
    assert isinstance(model.alpha, nn.Parameter)
    assert model.alpha.shape == (len(model.primitives),)
    assert model.alpha.grad is not None and model.alpha.grad.abs().sum() > 0
    assert model.genotype() in model.primitives


def test_edge_primitives_per_space():
    assert spaces.build("darts", edge=True).primitives == darts.PRIMITIVES
    assert spaces.build("nb201", edge=True).primitives == nb201.PRIMITIVES
    assert spaces.build("wide", edge=True, num_ops=4).primitives == wide.primitives_for(4)
    assert isinstance(spaces.build("darts", edge=True).op, darts.MixedOp)


def test_edge_genotype_is_argmax():
    model = spaces.build("nb201", C=4, edge=True)
    with torch.no_grad():
        model.alpha.zero_()
        model.alpha[nb201.PRIMITIVES.index("nor_conv_3x3")] = 1.0
    assert model.genotype() == "nor_conv_3x3"


@pytest.mark.parametrize("name", spaces.SPACES)
@pytest.mark.parametrize("edge", [False, True])
def test_alpha_change_changes_output(name, edge):
    model, x = edge_model(name) if edge else small_model(name)
    model.eval()
    with torch.no_grad():
        before = logits_of(model(x))
        for alpha in model.arch_parameters():
            alpha.add_(torch.randn_like(alpha))
        after = logits_of(model(x))
    assert not torch.allclose(before, after)


def test_softmax_weights_edge_matches_manual_sum():
    model, x = edge_model("darts")
    model.eval()
    with torch.no_grad():
        weights = torch.softmax(model.alpha, dim=-1)
        expected = sum(w * op(x) for w, op in zip(weights, model.op._ops))
        torch.testing.assert_close(model(x), expected)


# --------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("name", spaces.SPACES)
@pytest.mark.parametrize("edge", [False, True])
def test_weights_and_arch_parameters_partition_parameters(name, edge):
    model = spaces.build(name, C=4, layers=2, edge=edge)
    arch, weights = model.arch_parameters(), model.weights()
    assert all(isinstance(a, nn.Parameter) for a in arch)
    arch_ids, weight_ids = {id(p) for p in arch}, {id(p) for p in weights}
    assert not arch_ids & weight_ids
    assert arch_ids | weight_ids == {id(p) for p in model.parameters()}
    assert len(arch) + len(weights) == len(list(model.parameters()))


@pytest.mark.parametrize("name, shapes", [
    ("darts", [(14, 8), (14, 8)]),
    ("wide", [(14, 16), (14, 16)]),
    ("nb201", [(6, 5)]),
])
def test_alpha_shapes_and_init(name, shapes):
    model = spaces.build(name, C=4, layers=2)
    assert [tuple(a.shape) for a in model.arch_parameters()] == shapes
    for alpha in model.arch_parameters():
        assert alpha.abs().max() < 1e-2  # 1e-3 * randn


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("layers, positions", [(8, [2, 5]), (5, [1, 3]), (3, [1, 2]), (1, [0])])
def test_darts_reduction_positions(layers, positions):
    model = spaces.build("darts", C=4, layers=layers)
    assert [i for i, cell in enumerate(model.cells) if cell.reduction] == positions
    for i, cell in enumerate(model.cells):
        prev_reduction = i > 0 and model.cells[i - 1].reduction
        assert isinstance(cell.preprocess0, FactorizedReduce) == prev_reduction


def test_darts_channels_and_strides():
    model = spaces.build("darts", C=4, layers=5)
    assert model.stem[0].out_channels == 12  # stem_multiplier * C
    assert model.classifier.in_features == 4 * 16  # multiplier * C * 2 * 2
    reduce_cell = model.cells[1]
    strides = [2 if isinstance(op._ops[3], FactorizedReduce) else 1 for op in reduce_cell._ops]
    assert strides == [2, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1]  # j < 2 edges reduce


def test_nb201_structure():
    model = spaces.build("nb201", C=4, layers=2)
    kinds = [type(cell).__name__ for cell in model.cells]
    assert kinds == ["SearchCell"] * 2 + ["ResNetBasicblock"] + ["SearchCell"] * 2 \
        + ["ResNetBasicblock"] + ["SearchCell"] * 2
    cell = model.cells[0]
    assert list(cell.edges.keys()) == ["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    assert cell.edge2index == {k: i for i, k in enumerate(sorted(cell.edges.keys()))}
    assert model.classifier.in_features == 16
    for module in cell.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.affine and module.track_running_stats


def test_darts_mixed_op_module_counts():
    with_bn = type_counts(darts.MixedOp(4, 1))
    assert with_bn["Zero"] == 1 and with_bn["Identity"] == 1
    assert with_bn["MaxPool2d"] == 1 and with_bn["AvgPool2d"] == 1
    assert with_bn["SepConv"] == 2 and with_bn["DilConv"] == 2
    assert with_bn["Conv2d"] == 2 * 4 + 2 * 2
    assert with_bn["ReLU"] == 2 * 2 + 2 * 1
    assert with_bn["BatchNorm2d"] == 2 * 2 + 2 * 1 + 2  # the 2 pool BNs of DARTS

    without_bn = type_counts(darts.MixedOp(4, 1, pool_bn=False))
    assert without_bn["BatchNorm2d"] == with_bn["BatchNorm2d"] - 2
    assert without_bn["Sequential"] == with_bn["Sequential"] - 2

    reduce = type_counts(darts.MixedOp(4, 2))
    assert reduce["Identity"] == 0 and reduce["FactorizedReduce"] == 1
    assert reduce["Conv2d"] == with_bn["Conv2d"] + 2
    assert reduce["BatchNorm2d"] == with_bn["BatchNorm2d"] + 1
    for module in darts.MixedOp(4, 2).modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.affine
        if isinstance(module, nn.ReLU):
            assert not module.inplace
        if isinstance(module, nn.Conv2d):
            assert module.bias is None


def test_pool_bn_flag_in_network():
    base = type_counts(spaces.build("darts", C=4, layers=3))
    bare = type_counts(spaces.build("darts", C=4, layers=3, pool_bn=False))
    assert base["BatchNorm2d"] - bare["BatchNorm2d"] == 2 * 3 * 14


@pytest.mark.parametrize("name", spaces.SPACES)
def test_avg_pool_excludes_padding(name):
    model = spaces.build(name, C=4, layers=1)
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d) and m.kernel_size == 3]
    assert pools and all(not p.count_include_pad for p in pools)


def test_op_shapes_and_kernel_names():
    x = torch.randn(2, 4, 8, 8)
    for name, factory in OPS.items():
        for stride in (1, 2):
            op = factory(4, stride, False).eval()
            assert op(x).shape == (2, 4, 8 // stride, 8 // stride), (name, stride)
        match = re.fullmatch(r"(sep|dil)_conv_(\d+)x\2(?:_d(\d+))?", name)
        if match:
            kind, k, d = match.group(1), int(match.group(2)), match.group(3)
            op = factory(4, 1, False)
            assert isinstance(op, SepConv if kind == "sep" else DilConv)
            depthwise = [m for m in op.modules() if isinstance(m, nn.Conv2d) and m.groups == 4]
            expected_d = 1 if kind == "sep" else int(d or 2)
            assert all(m.kernel_size == (k, k) and m.dilation == (expected_d,) * 2 for m in depthwise)
    assert torch.equal(Zero(2)(x), torch.zeros(2, 4, 4, 4))


# --------------------------------------------------------------------------- genotypes

def test_darts_genotype_well_formed():
    model = spaces.build("darts", C=4, layers=2)
    geno = model.genotype()
    assert isinstance(geno, darts.Genotype)
    assert geno.normal_concat == geno.reduce_concat == [2, 3, 4, 5]
    for gene in (geno.normal, geno.reduce):
        assert len(gene) == 8
        for node in range(4):
            (op_a, j_a), (op_b, j_b) = gene[2 * node: 2 * node + 2]
            assert j_a != j_b and max(j_a, j_b) < node + 2
            assert {op_a, op_b} <= set(darts.PRIMITIVES) - {"none"}


def test_darts_genotype_follows_alphas():
    model = spaces.build("darts", C=4, layers=2)
    sep = darts.PRIMITIVES.index("sep_conv_3x3")
    none = darts.PRIMITIVES.index("none")
    with torch.no_grad():
        model.alphas_normal.zero_()
        model.alphas_normal[:, none] = 10.0  # 'none' never wins
        # edge rows per node: 0-1, 2-4, 5-8, 9-13; ties keep the lower input first
        model.alphas_normal[[0, 1, 3, 4, 5, 8, 12, 13], sep] = 1.0
    normal = model.genotype().normal
    assert [j for _, j in normal] == [0, 1, 1, 2, 0, 3, 3, 4]
    assert all(op == "sep_conv_3x3" for op, _ in normal)


def test_nb201_genotype_string():
    model = spaces.build("nb201", C=4, layers=1)
    pattern = r"\|\w+~0\|\+\|\w+~0\|\w+~1\|\+\|\w+~0\|\w+~1\|\w+~2\|"
    assert re.fullmatch(pattern, model.genotype())
    choice = ["nor_conv_3x3", "skip_connect", "nor_conv_1x1", "none", "avg_pool_3x3", "skip_connect"]
    with torch.no_grad():
        model.arch_alphas.zero_()
        for key, op in zip(["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"], choice):
            model.arch_alphas[model.edge2index[key], nb201.PRIMITIVES.index(op)] = 1.0
    assert model.genotype() == ("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|"
                                "+|none~0|avg_pool_3x3~1|skip_connect~2|")


# --------------------------------------------------------------------------- wide

def test_wide_primitives():
    assert len(wide.PRIMITIVES) == 16
    assert wide.PRIMITIVES[:4] == darts.PRIMITIVES[:4]
    assert sum(p.startswith("dil_conv") for p in wide.PRIMITIVES) == 5
    assert sum(p.startswith("sep_conv") for p in wide.PRIMITIVES) == 7
    assert all(p in OPS for p in wide.PRIMITIVES)
    assert spaces.build("wide", C=4, layers=1).primitives == wide.PRIMITIVES


def test_wide_scaling_order():
    order = wide.SCALING_ORDER
    assert sorted(order) == sorted(wide.PRIMITIVES)
    assert set(order[:3]) == {"skip_connect", "max_pool_3x3", "avg_pool_3x3"}
    assert order[-1] == "none"
    convs = [p[:3] for p in order[3:13]]
    assert convs == ["dil", "sep"] * 5
    assert wide.primitives_for(4) == ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "dil_conv_3x3"]
    assert wide.primitives_for(16) == wide.primitives_for() == wide.PRIMITIVES
    assert "none" not in wide.primitives_for(15)
    for k in range(2, 17):
        added = set(wide.primitives_for(k)) - set(wide.primitives_for(k - 1))
        assert added == {order[k - 1]}
        assert wide.primitives_for(k) == [p for p in wide.PRIMITIVES if p in wide.primitives_for(k)]


@pytest.mark.parametrize("num_ops", [4, 9])
def test_wide_num_ops_model(num_ops):
    model = spaces.build("wide", C=4, layers=1, num_ops=num_ops)
    assert model.primitives == wide.primitives_for(num_ops)
    assert model.alphas_normal.shape == (14, num_ops)
    assert len(model.cells[0]._ops[0]._ops) == num_ops
    geno = model.genotype()  # works without a 'none' candidate
    assert all(op in model.primitives for op, _ in geno.normal + geno.reduce)


def test_darts_custom_primitives():
    prims = ["skip_connect", "sep_conv_7x7", "nor_conv_3x3"]
    model, x = small_model("darts", primitives=prims)
    assert model.primitives == prims
    assert model.alphas_reduce.shape == (14, 3)
    assert model(x).shape == (2, NUM_CLASSES)


def test_guards_on_a_built_in_space_name_its_source_line():
    """The built-in supernets are model code: a guard on ``cells.0._steps`` names the line of
    ``spaces/darts.py`` that read it (it named the caller's ``compile_supernet`` line, since
    frames in the package were skipped as the compiler's own)."""
    import warnings

    from topo_compiler import compile_supernet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_supernet(spaces.build("darts", C=4, layers=1),
                                    spaces.default_input("darts", resolution=8))
    steps = [g for g in compiled.report.guards if g.startswith("`cells.0._steps`")]
    assert len(steps) == 1
    assert re.search(r"spaces[/\\]darts\.py:\d+: `for i in range\(self\._steps\):`", steps[0])
