"""Meta values: shapes and dtypes of traced values, computed on the ``meta`` device.

Every IR node carries the value it would have on the example inputs, as a meta tensor (shape,
dtype, no data), a Python value (sizes, flags), a tuple of those, or :data:`UNKNOWN` when it
depends on tensor data.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import _orig_module_call

__all__ = ["UNKNOWN", "to_meta", "meta_clone", "contains_unknown", "run_on_meta", "shape_rule",
           "leaf_function", "LEAF_FUNCTIONS"]


class _Unknown:
    """The meta value of something that depends on tensor data (``.item()``, ``nonzero``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self):
        return (_Unknown, ())


UNKNOWN = _Unknown()


def to_meta(value: Any) -> Any:
    """A meta-device stand-in of ``value`` (tensors anywhere in lists/tuples/dicts)."""
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device="meta")
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def meta_clone(module: nn.Module, cache: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters and buffers are meta tensors.

    Running it computes output shapes without touching data or the user's module state
    (BatchNorm's running statistics update the meta copies only).
    """
    key = id(module)
    if key in cache:
        return cache[key]
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    object.__setattr__(clone, "_parameters", {
        k: (None if p is None else nn.Parameter(to_meta(p), requires_grad=False))
        for k, p in module._parameters.items()})
    object.__setattr__(clone, "_buffers", {
        k: (None if b is None else to_meta(b)) for k, b in module._buffers.items()})
    object.__setattr__(clone, "_modules", {
        k: (None if m is None else meta_clone(m, cache)) for k, m in module._modules.items()})
    cache[key] = clone
    return clone


def contains_unknown(tree: Any) -> bool:
    if tree is UNKNOWN:
        return True
    if isinstance(tree, (list, tuple)):
        return any(contains_unknown(t) for t in tree)
    if isinstance(tree, dict):
        return any(contains_unknown(t) for t in tree.values())
    if isinstance(tree, slice):
        return any(contains_unknown(t) for t in (tree.start, tree.stop, tree.step))
    return False


# Shape rules for the ops supernets are made of.  Running them on meta tensors is exact but
# slow (BatchNorm decomposes in Python: ~6 ms a call), and a DARTS supernet has thousands.
_SAME_SHAPE_MODULES = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd)
_SAME_SHAPE_FUNCTIONS = {
    id(f) for f in (F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.sigmoid, F.tanh,
                    F.hardswish, F.hardsigmoid, F.dropout, F.batch_norm, torch.relu,
                    torch.sigmoid, torch.tanh, torch.nn.functional.mish)}
_SAME_SHAPE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "detach", "neg", "abs", "exp",
                       "sigmoid_", "tanh_"}
_BINARY_FUNCTIONS = {id(f) for f in (operator.add, operator.mul, operator.sub,
                                      operator.truediv, torch.add, torch.mul, torch.sub,
                                      torch.div)}
_BINARY_METHODS = {"add", "mul", "sub", "div"}


_ADDRESSES = {"data_ptr"}
"""Methods whose value is a memory address, known only at run time."""


_SHAPE_RULES: dict[int, Any] = {}
LEAF_FUNCTIONS: list[Any] = []
"""Functions compiled graphs call (kernel arithmetic, conditional weights): tracing a compiled
supernet again records calls to them instead of tracing into them."""


LEAF_MODULES: list[type] = []
"""Module classes compiled graphs call (the weight program): tracing a compiled supernet
again records calls to them instead of tracing into them."""


def leaf_module(cls: type) -> type:
    """Register ``cls`` as a graph-level module class (see :data:`LEAF_MODULES`)."""
    if cls not in LEAF_MODULES:
        LEAF_MODULES.append(cls)
    return cls


def leaf_function(fn):
    """Register ``fn`` as a graph-level function (see :data:`LEAF_FUNCTIONS`)."""
    if fn not in LEAF_FUNCTIONS:
        LEAF_FUNCTIONS.append(fn)
    return fn


def shape_rule(fn):
    """Register ``rule(*args, **kwargs) -> meta value`` for the function ``fn``: faster than
    running it on meta tensors (the compiler's own kernel arithmetic uses this)."""
    def register(rule):
        _SHAPE_RULES[id(fn)] = rule
        leaf_function(fn)
        return rule
    return register


def _fast_value(opcode: str, target: Any, args: tuple, kwargs: dict,
                module: nn.Module | None) -> Any:
    """The op's meta value from a shape rule, or ``NotImplemented`` to run it on meta."""
    first = args[0] if args else None
    if opcode == "call_function" and id(target) in _SHAPE_RULES:
        return _SHAPE_RULES[id(target)](*args, **kwargs)
    if opcode == "call_module":
        if isinstance(module, _SAME_SHAPE_MODULES) and isinstance(first, torch.Tensor) \
                and first.is_floating_point() and len(args) == 1 and not kwargs:
            return first
        return NotImplemented
    binary = (opcode == "call_function" and id(target) in _BINARY_FUNCTIONS) or \
        (opcode == "call_method" and target in _BINARY_METHODS)
    if binary and len(args) == 2 and not kwargs:
        a, b = args
        tensors = [v for v in (a, b) if isinstance(v, torch.Tensor)]
        others_ok = all(isinstance(v, torch.Tensor) or type(v) in (int, float, bool)
                        for v in (a, b))
        if tensors and others_ok and all(t.is_contiguous() for t in tensors):
            dtype = torch.result_type(a, b)
            if not (dtype.is_floating_point or dtype.is_complex):  # why: int / int is float
                return NotImplemented
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
            return torch.empty(shape, dtype=dtype, device="meta")
        return NotImplemented
    same = (opcode == "call_function" and id(target) in _SAME_SHAPE_FUNCTIONS) or \
        (opcode == "call_method" and target in _SAME_SHAPE_METHODS)
    # why floating only: exp or sigmoid of an int tensor is float (the meta kernel knows)
    if same and isinstance(first, torch.Tensor) and first.is_floating_point() and \
            all(k in ("inplace", "p", "training") for k in kwargs):
        return first
    return NotImplemented


def run_on_meta(opcode: str, target: Any, args: tuple, kwargs: dict,
                module: nn.Module | None, cache: dict[int, nn.Module]) -> Any:
    """Run one op on meta values (raises what the op raises)."""
    if contains_unknown(args) or contains_unknown(kwargs):
        return UNKNOWN
    if opcode == "call_method" and target in _ADDRESSES:  # 0 on meta: never decide on it
        return UNKNOWN
    fast = _fast_value(opcode, target, args, kwargs, module)
    if fast is not NotImplemented:
        return fast
    with torch.no_grad():
        if opcode == "call_function":
            return target(*args, **kwargs)
        if opcode == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if opcode == "call_module":
            return _orig_module_call(meta_clone(module, cache), *args, **kwargs)
    raise ValueError(f"cannot run a {opcode} node")


def register_shape_rule(fn: Any, rule: Any) -> None:
    """Register ``rule`` as ``fn``'s meta value without making ``fn`` a graph-level function
    (torch factories recorded while tracing: their rule runs them on the meta device)."""
    _SHAPE_RULES[id(fn)] = rule
