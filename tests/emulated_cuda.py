"""A stand-in for the CUDA backend of :mod:`topo_compiler.cuda_graphs`, for CPU tests.

"Capturing" runs the body once and keeps its result as the static memory, "replaying" runs the
body again and copies the fresh values into that memory.  Everything else (static inputs, the
gradient buffer handed to autograd, warm-up undone on BatchNorm buffers, cache keys, eviction,
fallbacks) is the real code.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree


class _Graph:
    def __init__(self, body, result):
        self.body, self.result = body, result


class Emulated:
    """A CUDA backend stand-in that works on CPU tensors; records what it was asked to do."""

    def __init__(self, fail_capture: Exception | None = None):
        self.events: list[str] = []
        self.fail_capture = fail_capture

    def unavailable(self, tensors):
        return None

    def synchronize(self, device):
        self.events.append("sync")

    @contextlib.contextmanager
    def side_stream(self, device):
        self.events.append("side stream")
        yield

    def pool(self, device):
        self.events.append("pool")
        return object()

    def capture(self, body, pool, device):
        self.events.append("capture")
        if self.fail_capture is not None:
            raise self.fail_capture
        with torch.enable_grad():
            result = body()
        return _Graph(body, result), result

    def replay(self, graph):
        self.events.append("replay")
        with torch.enable_grad():
            fresh = graph.body()
        with torch.no_grad():
            for static, new in zip(pytree.tree_leaves(graph.result), pytree.tree_leaves(fresh)):
                if isinstance(static, torch.Tensor):
                    static.copy_(new)
        return fresh
