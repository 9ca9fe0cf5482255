"""Fast tests of the benchmark instrument's measuring functions (no timing assertions)."""

import json

import pytest
import torch
from torch import nn

from topo_compiler.passes import PASSES

from benchmarks import run
from benchmarks.configs import CONFIGURATIONS, Configuration, full_method, select
from benchmarks.measure import (
    TrainingStep,
    interleaved_times,
    saved_activation_bytes,
    saved_activations_and_flops,
    step_peak_bytes,
)


class SaveThrice(torch.autograd.Function):
    """``h @ w`` that saves ``h`` three times (itself, again, a view) and the parameter ``w``."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, h, h.view(-1), w)
        return h @ w

    @staticmethod
    def backward(ctx, grad):
        h, _, _, _ = ctx.saved_tensors
        return None, h.t() @ grad


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    w = nn.Parameter(torch.randn(8, 3))
    h = torch.randn(4, 8) * 2                     # 4 * 8 float32 = 128 bytes
    saved = saved_activation_bytes(lambda: SaveThrice.apply(h, w).sum().backward(),
                                   resident=[w])
    assert saved.bytes == 4 * 8 * 4
    assert saved.storages == 1
    assert saved.tensors == 4


def test_saved_bytes_of_a_builtin_op():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    saved = saved_activation_bytes(lambda: torch.sin(x).sum().backward())
    assert saved.bytes == 3 * 5 * 8               # sin saves its input
    assert saved_activation_bytes(lambda: torch.sin(x).sum().backward(), resident=[x]).bytes == 0


def test_flops_of_one_conv_step_match_the_formula():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 3, 8, 8)                   # no grad: backward computes the weight's only
    target = torch.zeros(2, dtype=torch.long)
    n, c_in, c_out, k, h_out, w_out = 2, 3, 4, 3, 6, 6
    forward = 2 * n * c_out * h_out * w_out * c_in * k * k
    _, flops = saved_activations_and_flops(TrainingStep(model, model, x, target))
    assert flops == 2 * forward


def test_peak_sees_an_allocation():
    peak = step_peak_bytes(lambda: torch.ones(1 << 18), torch.device("cpu"))  # 1 MiB
    assert peak is None or peak >= 1 << 20


def test_interleaving_calls_every_configuration_equally():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, rounds=5, warmup=2)
    assert {name: calls.count(name) for name in steps} == {"a": 7, "b": 7, "c": 7}
    assert all(len(samples) == 5 for samples in times.values())
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]     # the starting one rotates


def test_configurations():
    assert select("pms+fms")[0].is_baseline
    assert [c.name for c in select("traced,all[exact]")] == ["baseline", "traced", "all[exact]"]
    with pytest.raises(ValueError, match="unknown configuration"):
        select("nope")
    ready = [Configuration("pms", ("pms",)), Configuration("pms+fms[exact]", ("pms", "fms"), True),
             Configuration("pms+fms", ("pms", "fms"))]
    if {"pms", "fms"} <= set(PASSES):
        assert full_method(ready).name == "pms+fms"
    assert full_method([CONFIGURATIONS[0]]) is None


def test_quick_cli_writes_json_and_markdown(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    threads = torch.get_num_threads()
    try:
            run.main(["--quick", "--spaces", "nb201", "--configs", "traced,pms,all", "--batch", "2",
                  "--C", "4", "--layers", "1", "--resolution", "8", "--out", str(tmp_path),
                  "--markdown", str(markdown)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "benchmarks-cpu.json").read_text())
    rows = {r["config"]: r for r in result["spaces"][0]["rows"]}
    assert rows["baseline"]["saved_bytes"] > 0 and rows["baseline"]["flops"] > 0
    assert rows["traced"]["ratios"]["saved_bytes"] == pytest.approx(1.0)
    assert rows["traced"]["ratios"]["flops"] == pytest.approx(1.0)
    for name in ("pms", "all"):
        missing = [p for p in rows[name]["passes"] if p not in PASSES]
        assert (rows[name]["status"] == "not implemented yet") == bool(missing)
    text = markdown.read_text()
    assert "| nb201 | traced |" in text and "benchmarks:cpu:begin" in text


def test_guard_cost_measures_the_checks_of_an_unchanged_model():
    from benchmarks.guard_cost import guard_cost_line, measure_guard_cost
    from benchmarks.suite import Sizes

    cost = measure_guard_cost(sizes=Sizes(batch=2, C=4, layers=3, resolution=8), calls=20,
                              steps=1)
    assert cost["guards"] > 0 and cost["check_us"] > 0 and cost["eager_step_ms"] > 0
    assert cost["fraction"] == pytest.approx(cost["check_us"] / 1e3 / cost["eager_step_ms"])
    assert f"{cost['guards']} guards" in guard_cost_line(cost)
