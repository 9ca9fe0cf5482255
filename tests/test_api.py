"""compile_supernet's contract: shared state, same signature, no mutation, a report."""
import copy
import inspect
import json

import pytest
import torch
from torch import nn

from helpers import logits_of
from supernets import FOREIGN
from topo_compiler import (AlreadyCompiledWarning, CompileReport, NoMixedOpWarning, TraceError,
                           compile_supernet)
from topo_compiler.spaces import build, default_input


def _darts(**kw):
    cfg = dict(C=4, layers=3, **kw)
    return build("darts", **cfg), default_input("darts", resolution=8, **cfg)


def _snapshot(model: nn.Module):
    """Everything compile_supernet must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tensors": [id(t) for t in model.state_dict(keep_vars=True).values()],
        "modules": [(n, id(m), m.training, type(m), sorted(m.__dict__))
                    for n, m in model.named_modules()],
        "grads": [p.grad is None for p in model.parameters()],
    }


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now["tensors"] == snap["tensors"]
    assert now["modules"] == snap["modules"]
    assert now["grads"] == snap["grads"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


def test_optimizer_on_model_parameters_trains_compiled():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = compiled(x).detach()
    loss = logits_of(compiled(x)).pow(2).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.weights())
    assert all(a.grad is not None for a in model.arch_parameters())
    opt.step()
    assert not torch.allclose(compiled(x), before)


def test_batchnorm_statistics_update_in_place_and_follow_train_eval():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    compiled.train()
    compiled(x)
    assert not torch.equal(bn.running_mean, stats), "train mode updates the shared BN stats"
    compiled.eval()
    assert not bn.training
    stats = bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert torch.equal(bn.running_mean, stats)


def test_state_dict_loads_both_ways():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    other, _ = _darts()
    compiled.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.state_dict()["cells.0._ops.0._ops.4.op.1.weight"],
                               other.state_dict()["cells.0._ops.0._ops.4.op.1.weight"])
    fresh, _ = _darts()
    fresh.load_state_dict(compiled.state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), compiled(x))


def test_plain_tensor_alphas_stay_out_of_state_dict():
    net = FOREIGN["darts_original"]
    model = net.build()
    compiled = compile_supernet(model, net.example_inputs(), passes=())
    assert list(compiled.state_dict()) == list(model.state_dict())
    model.load_state_dict(compiled.state_dict())


def test_same_signature_and_tuple_outputs():
    model = build("nb201", C=4, layers=1)
    x = default_input("nb201", resolution=8)
    compiled = compile_supernet(model, x, passes=())
    assert list(inspect.signature(compiled.forward).parameters) == \
        list(inspect.signature(model.forward).parameters)
    out = compiled(x)
    assert isinstance(out, tuple) and len(out) == 2


def test_to_dtype_and_device_moves_shared_state():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    compiled.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert compiled(x.double()).dtype == torch.float64
    compiled.to("cpu")


def test_public_methods_of_the_source_model_are_reachable():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    assert compiled.arch_parameters()[0] is model.arch_parameters()[0]
    assert compiled.genotype() == model.genotype()
    assert compiled.source_model is model
    with pytest.raises(AttributeError):
        compiled.no_such_attribute


def test_model_is_never_mutated():
    model, x = _darts()
    model.train()
    snap = _snapshot(model)
    compiled = compile_supernet(model, x)  # default pipeline
    _assert_unchanged(model, snap)
    del compiled


def test_model_is_not_mutated_when_compiling_fails():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.alpha = torch.zeros(2, requires_grad=True)
            self.cache = None

        def forward(self, x):
            self.cache = x                       # attribute writes stay on the shadow
            w = self.alpha.softmax(0)
            y = w[0] * self.conv(x) + w[1] * x
            if y.sum() > 0:                      # value-dependent: refused
                return y
            return -y

    model = Fails()
    snap = _snapshot(model)
    with pytest.raises(TraceError):
        compile_supernet(model, torch.randn(1, 3, 4, 4))
    _assert_unchanged(model, snap)
    assert model.cache is None

    def failing_hook(index, stage, ir):
        if index == 1:
            raise RuntimeError("boom")

    model, x = _darts()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        compile_supernet(model, x, hooks=[failing_hook])
    _assert_unchanged(model, snap)


def test_options_are_validated():
    model, x = _darts()
    with pytest.raises(ValueError, match="unknown pass"):
        compile_supernet(model, x, passes=("pms", "fuse"))
    with pytest.raises(TypeError, match="nn.Module"):
        compile_supernet(lambda x: x, x)
    with pytest.raises(TypeError, match="exact"):
        compile_supernet(model, x, passes=(), exact="yes")


class _Edge(nn.Module):
    """A short mixed op: two ReLU-conv-BN candidates and a skip."""

    def __init__(self, C=4):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, k, padding=k // 2, bias=False),
                          nn.BatchNorm2d(C)) for k in (3, 5)] + [nn.Identity()])
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))

    def forward(self, x):
        w = self.alpha.softmax(0)
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


def test_example_inputs_none_is_one_clear_type_error():
    with pytest.raises(TypeError) as info:
        compile_supernet(_Edge(), None)
    text = str(info.value)
    assert "example_inputs is None" in text and "_Edge.forward(x)" in text
    assert "torch.randn(" in text and "\n" not in text and "conv2d" not in text


def test_numpy_example_input_is_one_clear_type_error_and_the_way_out_works():
    """A numpy batch (data loaders built on numpy) stopped fx's code generation with
    "argument of type: <class 'numpy.ndarray'>"; the error names the argument and the fix."""
    np = pytest.importorskip("numpy")
    model = _Edge()
    array = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"'x' of _Edge.forward holds a numpy array.*"
                                        r"torch.from_numpy\(array\)"):
        compile_supernet(model, array)
    with pytest.raises(TypeError, match="'x' of _Edge.forward"):
        compile_supernet(model, (array,))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.from_numpy(array)
    torch.testing.assert_close(compile_supernet(model, x)(x), model(x))


def test_compiling_a_compiled_supernet_warns_and_compiles_its_source_once():
    model, x = _Edge(), torch.randn(2, 4, 6, 6)
    compiled = compile_supernet(model, x)
    with pytest.warns(AlreadyCompiledWarning, match="compiling its source model .*_Edge"):
        again = compile_supernet(compiled, x)
    assert again.source_model is model
    assert again.report.model == "_Edge"
    modules = lambda gm: sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert modules(again) == modules(compiled)  # nothing rewritten a second time
    assert again.report.final.counts == compiled.report.final.counts
    torch.testing.assert_close(again(x), compiled(x))


# why: importing torch._dynamo makes torch itself call its deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_goes_after_compile_supernet():
    model, x = _Edge(), torch.randn(2, 4, 6, 6)
    with pytest.raises(TypeError, match=r"compile the plain model first, then torch.compile "
                                        r"the result: torch.compile\(compile_supernet"):
        compile_supernet(torch.compile(model), x)
    compiled = compile_supernet(model, x, exact=True)
    fast = torch.compile(compiled, backend="aot_eager")  # inductor works too, and is slower
    out = fast(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model.alpha.grad is not None and model.ops[0][1].weight.grad is not None


def test_model_without_mixed_ops_warns_and_stays_equivalent():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    with pytest.warns(NoMixedOpWarning, match="no mixed op"):
        compiled = compile_supernet(model, x)
    torch.testing.assert_close(compiled(x), model(x))
    assert compiled.report.warnings


def test_report_without_passes():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    report = compiled.report
    assert isinstance(report, CompileReport)
    assert [s.name for s in report.stages] == ["input"]
    assert len(report.mixed_ops) == model.num_mixed_ops == 42
    st = report.stages[0]
    assert st.changed is False and st.seconds >= 0
    assert st.counts.total == st.counts.conv + st.counts.non_conv
    md = report.to_markdown()
    assert "No passes were run" in md and "| input |" in md
    data = json.loads(report.to_json())
    assert data["stages"][0]["counts"]["total"] == st.counts.total
    assert len(data["mixed_ops"]) == 42


@pytest.mark.parametrize("pool_bn,expected", [(False, (6, 14, 20)), (True, (6, 16, 22))])
def test_darts_edge_counts_match_table_ii_input_row(pool_bn, expected):
    """One normal-cell edge of DARTS: the paper's Table II first row (6/14/20), and 6/16/22
    with DARTS's BatchNorm after the pools."""
    model = build("darts", C=4, edge=True, pool_bn=pool_bn)
    x = default_input("darts", C=4, edge=True, resolution=8)
    report = compile_supernet(model, x, passes=()).report
    c = report.stages[0].counts
    assert (c.conv, c.non_conv, c.total) == expected
    (op,) = report.mixed_ops
    assert str(report.stages[0].mixed_op_counts[op.name]) == "/".join(map(str, expected))


def test_dump_dir_writes_the_input_stage_and_report(tmp_path):
    model = build("darts", C=4, edge=True)
    x = default_input("darts", C=4, edge=True, resolution=8)
    compile_supernet(model, x, passes=(), dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "00-input.dot" in names and "report.json" in names and "report.md" in names


def test_compiled_copies_deeply():
    model, x = _darts()
    compiled = compile_supernet(model, x, passes=())
    clone = copy.deepcopy(compiled)
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
