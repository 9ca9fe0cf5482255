"""Measuring one search step: saved-activation bytes, peak memory, FLOPs and interleaved time.

A *search step* is what a one-shot NAS search repeats: forward through the supernet,
cross-entropy on the logits, backward reaching the weights and the architecture weights
(alphas).  Every function here takes the step as a callable, so the same code measures the
eager supernet, a compiled one and a ``torch.compile``-d one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from topo_compiler import compile_supernet

from .configs import Configuration

__all__ = ["logits_of", "TrainingStep", "SavedActivations", "SavedActivationCounter",
           "saved_activation_bytes", "saved_activations_and_flops", "resident_tensors",
           "unique_storage_bytes", "step_peak_bytes",
           "synchronizer", "interleaved_times", "timed_compiles", "gradients_reached"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a supernet's output: NB201 returns ``(features, logits)``, DARTS logits."""
    return output[-1] if isinstance(output, (tuple, list)) else output


@dataclasses.dataclass
class TrainingStep:
    """One search step of ``module``; ``model`` owns the parameters every configuration shares."""

    module: Callable[..., Any]
    model: nn.Module
    inputs: torch.Tensor
    target: torch.Tensor

    def clear_gradients(self) -> None:
        """Drop the gradients of the previous step (``set_to_none``, as optimizers do)."""
        self.model.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.clear_gradients()
        loss = F.cross_entropy(logits_of(self.module(self.inputs)), self.target)
        loss.backward()


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (views and aliases counted once)."""
    sizes = {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())


def resident_tensors(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """What lives on the device whatever the configuration: parameters, buffers, the batch."""
    return [*model.parameters(), *model.buffers(), *inputs]


@dataclasses.dataclass(frozen=True)
class SavedActivations:
    """What autograd kept for backward during one step."""

    bytes: int
    """Bytes of the distinct storages saved, resident tensors excluded."""
    storages: int
    """How many distinct storages that is."""
    tensors: int
    """How many tensors autograd packed (all of them: repeats, views and resident ones)."""


class SavedActivationCounter:
    """Counts the tensors autograd saves for backward inside a ``with`` block, once per storage.

    A ``saved_tensors_hooks`` pack hook sees every tensor an autograd node saves; a storage
    saved twice (or a view of it) counts once, with its whole size, and storages of
    ``resident`` tensors (parameters, buffers, the batch) do not count: they are held anyway.
    The hook keeps each saved tensor alive until the block ends, so no storage address can be
    reused by another one during the count.  ``result`` is set on exit.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in resident}
        self._kept: dict[tuple[str, int], torch.Tensor] = {}
        self._packed = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.result: SavedActivations | None = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._packed += 1
        key = _storage_key(t)
        if key not in self._excluded:
            self._kept.setdefault(key, t)
        return t

    def __enter__(self) -> SavedActivationCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._hooks.__exit__(*exc_info)
        self.result = SavedActivations(unique_storage_bytes(self._kept.values()),
                                       len(self._kept), self._packed)
        self._kept.clear()


def saved_activation_bytes(step: Callable[[], None],
                           resident: Iterable[torch.Tensor] = ()) -> SavedActivations:
    """What autograd saves during ``step`` (see :class:`SavedActivationCounter`)."""
    with SavedActivationCounter(resident) as counter:
        step()
    return counter.result


def saved_activations_and_flops(step: Callable[[], None], resident: Iterable[torch.Tensor] = ()
                                ) -> tuple[SavedActivations, int]:
    """Saved activations and FLOPs of one run of ``step``.

    FLOPs are ``FlopCounterMode``'s over forward and backward: the ops it has formulas for
    (convolutions, matrix products, attention) at 2 FLOPs per multiply-add; element-wise ops,
    norms and pooling are not counted.
    """
    with SavedActivationCounter(resident) as counter, \
            FlopCounterMode(display=False) as flops:
        step()
    return counter.result, flops.get_total_flops()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during ``step`` above those allocated when it starts.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.  CPU: the
    peak of the running sum of the allocations and frees the profiler records through
    PyTorch's CPU allocator (``profile_memory=True``); ``None`` when the profiler gives none.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _cpu_peak_bytes(step)


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs its start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(step: Callable[[], None]) -> int | None:
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        step()
    finally:
        with _quiet_fd2():
            prof.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def interleaved_times(steps: Mapping[str, Callable[[], None]], rounds: int, warmup: int,
                      synchronize: Callable[[], None] = lambda: None,
                      tick: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Wall time of every step, round-robin: one call of each per round, in one process.

    Round ``r`` starts at the ``r``-th step (the order rotates), so no configuration always
    runs right after the same other one; the first ``warmup`` rounds are not recorded.
    ``tick`` is called after each round (progress).  Returns seconds per recorded round.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            steps[name]()
            synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        tick()
    return times


def timed_compiles(model: nn.Module, example_inputs: Any, config: Configuration,
                   repeats: int, budget_s: float = float("inf"),
                   synchronize: Callable[[], None] = lambda: None
                   ) -> tuple[nn.Module, list[float]]:
    """Compile ``model`` under ``config`` up to ``repeats`` times, no more once the compiles
    add up to ``budget_s``; the last result and the seconds of each compile."""
    seconds: list[float] = []
    while len(seconds) < repeats and sum(seconds) < budget_s:
        synchronize()
        start = time.perf_counter()
        compiled = compile_supernet(model, example_inputs, passes=config.passes,
                                    exact=config.exact)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return compiled, seconds


def gradients_reached(model: nn.Module) -> dict[str, list[int]]:
    """``[reached, total]`` of the alphas and of the weights whose ``.grad`` the step set."""
    if hasattr(model, "arch_parameters"):
        groups = {"alphas": list(model.arch_parameters()), "weights": list(model.weights())}
    else:
        groups = {"parameters": list(model.parameters())}
    return {name: [sum(p.grad is not None for p in params), len(params)]
            for name, params in groups.items()}
