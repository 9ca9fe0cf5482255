"""The DARTS alternating search loop, recorded step by step, to compare two ways of running it.

An architecture step on a validation batch (Adam on the alphas), then a weight step on a
training batch (SGD with momentum on the weights), both through the same module, both
optimizers stepping in place outside the module, ``zero_grad(set_to_none=True)`` each.  The
alphas' gradients are not cleared by the weight optimizer, so after the weight step they hold
the sum of both steps' gradients: a run whose ``.grad`` aliased memory that the next step
overwrote would show it there.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from topo_compiler.spaces import build, default_input

from helpers import logits_of

SIZES = {"darts": dict(C=4, layers=3), "nb201": dict(C=4, layers=1)}


def batches(space: str, steps: int, batch: int, resolution: int, device: str,
            extra: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``2 * steps + extra`` batches (validation, training, validation...), fixed by a seed."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2 * steps + extra):
        x = default_input(space, batch=batch, resolution=resolution)
        x = torch.randn(x.shape, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


def fresh_model(space: str, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build(space, **SIZES[space]).to(device).train()


def run_loop(model: nn.Module, module: Callable[..., Any],
             data: list[tuple[torch.Tensor, torch.Tensor]],
             memory_format: torch.memory_format | None = None) -> list[dict[str, Any]]:
    """Alternate arch and weight steps over ``data``; per step, the loss, every ``.grad`` and
    every buffer, copied."""
    w_opt = torch.optim.SGD(model.weights(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-2)
    records = []
    for i in range(0, len(data) - 1, 2):
        for opt, (x, y), kind in ((a_opt, data[i], "arch"), (w_opt, data[i + 1], "weight")):
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            opt.zero_grad(set_to_none=True)
            out = module(x)
            loss = F.cross_entropy(logits_of(out), y)
            loss.backward()
            records.append({
                "step": f"{kind} {i // 2}", "loss": loss.detach().clone(),
                "out": logits_of(out).detach().clone(),
                "grads": {n: None if p.grad is None else p.grad.detach().clone()
                          for n, p in model.named_parameters()},
                "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}})
            opt.step()
    return records


def assert_same_runs(expected: list[dict[str, Any]], actual: list[dict[str, Any]],
                     rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal losses, outputs, gradients (same ones None) and buffers, step by step."""
    assert len(expected) == len(actual) > 0
    for e, a in zip(expected, actual):
        where = e["step"]
        torch.testing.assert_close(a["loss"], e["loss"], rtol=rtol, atol=atol, msg=where)
        torch.testing.assert_close(a["out"], e["out"], rtol=rtol, atol=atol, msg=where)
        assert e["grads"].keys() == a["grads"].keys()
        for name, g in e["grads"].items():
            got = a["grads"][name]
            assert (g is None) == (got is None), f"{where}: {name} grad None mismatch"
            if g is not None:
                torch.testing.assert_close(got, g, rtol=rtol, atol=atol,
                                           msg=lambda m: f"{where} grad {name}: {m}")
        for name, b in e["buffers"].items():
            torch.testing.assert_close(a["buffers"][name], b, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{where} buffer {name}: {m}")
