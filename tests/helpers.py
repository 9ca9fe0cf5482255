"""Helpers the tests share: run a model and its compiled twin on one step and compare."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn


def logits_of(out: Any) -> torch.Tensor:
    """The last tensor of an output (``(features, logits)`` tuples, dicts, tensors)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return logits_of(out[-1])
    return out


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flat_outputs(o)]


def clone_inputs(args: Sequence[Any]) -> tuple:
    """Fresh leaf copies of the tensor inputs that require grad (to get input gradients)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().clone().requires_grad_(True)
        out.append(a)
    return tuple(out)


def arch_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's architecture weights however they are held (method, attribute list)."""
    if hasattr(model, "arch_parameters"):
        got = model.arch_parameters()
        return list(got) if not isinstance(got, torch.Tensor) else [got]
    return []


def step(model: nn.Module, args: Sequence[Any], extra: Sequence[torch.Tensor] = ()):
    """One forward + backward of ``sum(out * fixed random weights)``.

    Returns (outputs, {name: grad}) for the model's parameters, the input tensors and the
    ``extra`` tensors (alphas held outside ``parameters()``).  Gradients are zeroed first and
    BatchNorm's state is restored afterwards, so two calls see the same statistics.
    """
    args = clone_inputs(args)
    state = copy.deepcopy({k: v for k, v in model.state_dict().items()})
    tensors = dict(model.named_parameters())
    tensors.update({f"extra{i}": t for i, t in enumerate(extra)})
    tensors.update({f"input{i}": a for i, a in enumerate(args)
                    if isinstance(a, torch.Tensor) and a.requires_grad})
    for t in tensors.values():
        t.grad = None
    outs = flat_outputs(model(*args))
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {k: (None if t.grad is None else t.grad.detach().clone())
             for k, t in tensors.items()}
    with torch.no_grad():
        model.load_state_dict(state)
    for t in tensors.values():
        t.grad = None
    return [o.detach() for o in outs], grads


def assert_same_step(original: nn.Module, compiled: nn.Module, args: Sequence[Any],
                     extra: Sequence[torch.Tensor] = (), rtol: float = 1e-5,
                     atol: float = 1e-6) -> None:
    """Outputs and gradients (weights, inputs, alphas) of one step agree."""
    out_a, grads_a = step(original, args, extra)
    # compiled shares the parameters: name them from the original model
    out_b, grads_b = step(_Named(original, compiled), args, extra)
    assert len(out_a) == len(out_b)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    missing = [k for k, g in grads_a.items() if (g is None) != (grads_b[k] is None)]
    assert not missing, f"gradient reached only one side for {missing}"
    for k, g in grads_a.items():
        if g is not None:
            torch.testing.assert_close(grads_b[k], g, rtol=rtol, atol=atol, msg=k)


class _Named(nn.Module):
    """Calls ``compiled`` but names parameters and state like ``original`` (shared tensors)."""

    def __init__(self, original: nn.Module, compiled: nn.Module):
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "compiled", compiled)

    def named_parameters(self, *args, **kwargs):
        return self.original.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.original.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.original.load_state_dict(*args, **kwargs)

    def forward(self, *args):
        return self.compiled(*args)


def restored_step(model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(logits, parameter gradients) of one cross-entropy step of ``module`` (the model or a
    compilation of it), with the model's state dict (BatchNorm statistics) restored after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    out = logits_of(module(x))
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.load_state_dict(state)
    return out.detach(), grads


def assert_gradients_close(expected: Sequence, actual: Sequence, rtol: float,
                           atol: float) -> None:
    """Two :func:`restored_step` gradient lists agree: the same parameters reached, close
    values."""
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


class Reseeding(nn.Module):
    """Calls ``module`` from one RNG state every time, so forwards that sample (Dropout,
    Gumbel noise, Dirichlet draws, sampled paths) compare between eager and compiled."""

    def __init__(self, module: nn.Module, seed: int = 99):
        super().__init__()
        self.module = module
        self.seed = seed

    def forward(self, *args):
        torch.manual_seed(self.seed)
        return self.module(*args)
