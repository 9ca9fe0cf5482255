"""Canonical descriptors: what an IR node computes, independent of how the user wrote it.

``F.relu(x)``, ``x.relu()``, ``torch.relu(x)`` and ``nn.ReLU()(x)`` all describe as
``OpDesc(kind="act", op="relu")``; ``nn.AvgPool2d(3, 1, 1)`` and ``F.avg_pool2d(x, 3, 1, 1)``
describe alike with their hyperparameters normalised (ints to tuples, ``stride=None`` to the
kernel size).  Two nodes compute the same function of the same inputs when their descriptors'
:attr:`OpDesc.signature` and their data inputs are equal.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import operator
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OpDesc", "Kind", "Ref", "describe_module", "describe_call", "freeze"]


class Kind(str, enum.Enum):
    """What a node is, in the paper's vocabulary of basic modules (Table I)."""

    INPUT = "input"
    OUTPUT = "output"
    PARAM = "param"          # a parameter / buffer / tensor attribute read (get_attr)
    CONV = "conv"            # convolutions (a "conv" basic module)
    LINEAR = "linear"        # fully connected layers (counted with convs: a linear map)
    NORM = "norm"            # BatchNorm & co.
    ACT = "act"              # activations
    POOL = "pool"            # max / average / adaptive pooling
    DROPOUT = "dropout"
    IDENTITY = "identity"
    ZERO = "zero"            # the `none` candidate: x * 0, zeros_like(x), ...
    ARITH = "arith"          # elementwise arithmetic and reductions (weight arithmetic)
    LAYOUT = "layout"        # view / cat / stack / slicing / transpose: moves data around
    SHAPE = "shape"          # size(), shape, dim(): Python values about shapes
    MODULE = "module"        # an opaque module (user leaf or unknown torch.nn module)
    OTHER = "other"          # any other function

    def __str__(self) -> str:  # pragma: no cover - readable reprs
        return self.value


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to another IR node, used inside ordered arguments."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclasses.dataclass(frozen=True)
class OpDesc:
    """A typed, canonical description of one node's computation.

    ``params`` are the learnable tensors a module reads (qualified names), or the attribute
    tensors a function is passed; ``state`` the buffers a module reads and may update
    (BatchNorm's running statistics).  ``inplace`` is kept
    for lowering but never makes two computations different.
    """

    kind: Kind
    op: str
    hparams: tuple[tuple[str, Any], ...] = ()
    params: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    inplace: bool = dataclasses.field(default=False, compare=False)

    @property
    def signature(self) -> tuple[Any, ...]:
        """Equal signatures (and equal inputs) mean the same function: state is ignored."""
        return (self.kind, self.op, self.hparams, self.params)

    def hparam(self, key: str, default: Any = None) -> Any:
        for k, v in self.hparams:
            if k == key:
                return v
        return default

    @property
    def is_module(self) -> bool:
        """A basic module in the paper's sense (counted in the conv / non-conv table)."""
        return self.kind in (Kind.CONV, Kind.LINEAR, Kind.NORM, Kind.ACT, Kind.POOL,
                             Kind.DROPOUT, Kind.MODULE)

    def label(self) -> str:
        """Short human-readable label, e.g. ``conv2d 3x3 d2 g16`` or ``avg_pool2d 3x3``."""
        parts = [self.op]
        k = self.hparam("kernel_size")
        if isinstance(k, tuple) and k:
            parts.append("x".join(str(v) for v in k))
        s = self.hparam("stride")
        if isinstance(s, tuple) and any(v != 1 for v in s):
            parts.append("s" + "x".join(str(v) for v in s))
        d = self.hparam("dilation")
        if isinstance(d, tuple) and any(v != 1 for v in d):
            parts.append("d" + "x".join(str(v) for v in d))
        g = self.hparam("groups")
        if isinstance(g, int) and g != 1:
            parts.append(f"g{g}")
        return " ".join(parts)


def freeze(value: Any) -> Any:
    """A hashable, comparable form of an argument value (lists -> tuples, ...)."""
    if isinstance(value, (list, tuple)):
        if hasattr(value, "_fields"):
            return (type(value).__name__,) + tuple(freeze(v) for v in value)
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", freeze(value.start), freeze(value.stop), freeze(value.step))
    if value is Ellipsis:
        return "..."
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), id(value))
    try:
        hash(value)
    except TypeError:
        return ("unhashable", type(value).__name__, id(value))
    return value


# --------------------------------------------------------------------------------------
# Canonical op names and kinds
# --------------------------------------------------------------------------------------

_ALIASES = {
    "concat": "cat", "concatenate": "cat", "multiply": "mul", "true_divide": "div",
    "divide": "div", "truediv": "div", "subtract": "sub", "absolute": "abs",
    "iadd": "add", "imul": "mul", "isub": "sub", "itruediv": "div", "radd": "add",
    "rmul": "mul", "negative": "neg", "clip": "clamp", "swapaxes": "transpose",
    "_max_pool1d": "max_pool1d", "_max_pool2d": "max_pool2d", "_max_pool3d": "max_pool3d",
    "max_pool1d_with_indices": "max_pool1d", "max_pool2d_with_indices": "max_pool2d",
    "max_pool3d_with_indices": "max_pool3d",
    "_adaptive_max_pool1d": "adaptive_max_pool1d", "_adaptive_max_pool2d": "adaptive_max_pool2d",
    "_adaptive_max_pool3d": "adaptive_max_pool3d",
}

_CONV_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d"}
_NORM_OPS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "local_response_norm",
             "rms_norm", "scaled_batch_norm"}
_ACT_OPS = {"relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
            "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign",
            "prelu", "glu", "logsigmoid", "softmax", "log_softmax", "softmin", "threshold",
            "rrelu", "tanhshrink", "hardshrink", "softshrink"}
_POOL_OPS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
             "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
             "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
             "lp_pool2d", "fractional_max_pool2d"}
_DROPOUT_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                "feature_alpha_dropout"}
_ARITH_OPS = {"add", "sub", "mul", "div", "neg", "pos", "floordiv", "mod", "pow", "abs",
              "sum", "mean", "exp", "log", "sqrt", "rsqrt", "reciprocal", "clamp", "max",
              "min", "std", "var", "addcmul", "addcdiv", "lerp", "where", "matmul",
              "bmm", "mm", "einsum", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_",
              "not_", "invert", "sign", "square", "prod", "amax", "amin", "argmax", "argmin",
              "log_softmax_", "exponential", "uniform", "normal", "bernoulli", "isinf",
              "isnan", "any", "all", "detach", "float", "half", "double", "to", "type_as",
              "clone", "fill", "masked_fill", "scatter", "gather", "scatter_add", "cumsum"}
_LAYOUT_OPS = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous",
               "cat", "stack", "chunk", "split", "split_with_sizes", "squeeze", "unsqueeze",
               "expand", "expand_as", "repeat", "getitem", "narrow", "select", "index_select",
               "pad", "interpolate", "pixel_shuffle", "pixel_unshuffle", "t", "view_as",
               "reshape_as", "movedim", "unbind", "roll", "flip", "tile", "channel_shuffle",
               "upsample", "unfold", "fold"}
_SHAPE_OPS = {"size", "dim", "numel", "getattr", "len", "shape", "ndimension", "nelement"}
_ZERO_OPS = {"zeros_like", "new_zeros", "zeros"}
_IDENTITY_OPS = {"identity"}


def kind_of(op: str) -> Kind:
    if op in _CONV_OPS:
        return Kind.CONV
    if op == "linear":
        return Kind.LINEAR
    if op in _NORM_OPS:
        return Kind.NORM
    if op in _ACT_OPS:
        return Kind.ACT
    if op in _POOL_OPS:
        return Kind.POOL
    if op in _DROPOUT_OPS:
        return Kind.DROPOUT
    if op in _ZERO_OPS:
        return Kind.ZERO
    if op in _IDENTITY_OPS:
        return Kind.IDENTITY
    if op in _ARITH_OPS:
        return Kind.ARITH
    if op in _LAYOUT_OPS:
        return Kind.LAYOUT
    if op in _SHAPE_OPS:
        return Kind.SHAPE
    return Kind.OTHER


def _build_function_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for namespace in (operator, torch, F, torch._C._nn, torch.Tensor):
        for name in dir(namespace):
            if name.startswith("__") and namespace is not operator:
                continue
            try:
                obj = getattr(namespace, name)
            except Exception:  # noqa: BLE001 - some attributes raise on access
                continue
            if callable(obj):
                names.setdefault(id(obj), name.strip("_") if namespace is operator else name)
    return names


_FUNCTION_NAMES = _build_function_names()


def canonical_name(target: Any, opcode: str) -> tuple[str, bool]:
    """(canonical op name, is in-place) of a call_function / call_method target."""
    if opcode == "call_method":
        name = str(target)
    else:
        name = _FUNCTION_NAMES.get(id(target)) or getattr(target, "__name__", repr(target))
    inplace = False
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
    elif name.endswith("_") and not name.startswith("_"):
        name, inplace = name[:-1], True
    if name.startswith("i") and name[1:] in ("add", "mul", "sub", "truediv") and \
            opcode == "call_function" and target in (operator.iadd, operator.imul,
                                                      operator.isub, operator.itruediv):
        inplace = True
    name = _ALIASES.get(name, name)
    return name, inplace


# --------------------------------------------------------------------------------------
# Hyperparameter normalisation shared by module and functional forms
# --------------------------------------------------------------------------------------

def _ntuple(value: Any, n: int) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple, torch.Size)):
        return tuple(value)
    if isinstance(value, (int, float)):
        return (value,) * n
    return value


def _spatial_dims(op: str) -> int:
    for n in (1, 2, 3):
        if op.endswith(f"{n}d"):
            return n
    return 2


def _pool_hparams(op: str, hp: dict[str, Any]) -> dict[str, Any]:
    n = _spatial_dims(op)
    out = dict(hp)
    if "kernel_size" in out:
        out["kernel_size"] = _ntuple(out["kernel_size"], n)
        stride = out.get("stride")
        out["stride"] = out["kernel_size"] if stride in (None, [], ()) else _ntuple(stride, n)
        out["padding"] = _ntuple(out.get("padding", 0), n)
    if op.startswith("max_pool"):
        out["dilation"] = _ntuple(out.get("dilation", 1), n)
        out.setdefault("ceil_mode", False)
        out.setdefault("return_indices", False)
    if op.startswith("avg_pool"):
        out.setdefault("ceil_mode", False)
        out.setdefault("count_include_pad", True)
        if n > 1:
            out.setdefault("divisor_override", None)
    if op.startswith("adaptive"):
        out["output_size"] = _ntuple(out.get("output_size"), n)
        out.pop("return_indices", None) if not out.get("return_indices") else None
    return out


def _conv_hparams(op: str, hp: dict[str, Any]) -> dict[str, Any]:
    n = _spatial_dims(op)
    out = dict(hp)
    out["stride"] = _ntuple(out.get("stride", 1), n)
    padding = out.get("padding", 0)
    out["padding"] = padding if isinstance(padding, str) else _ntuple(padding, n)
    out["dilation"] = _ntuple(out.get("dilation", 1), n)
    out.setdefault("groups", 1)
    return out


def _finish(op: str, hp: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    if op in _POOL_OPS:
        hp = _pool_hparams(op, hp)
    elif op in _CONV_OPS:
        hp = _conv_hparams(op, hp)
    hp.pop("inplace", None)
    hp.pop("_stacklevel", None)
    return tuple(sorted((k, freeze(v)) for k, v in hp.items()))


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------

def _module_op(module: nn.Module) -> str | None:
    """Canonical op of a standard torch.nn module, e.g. Conv2d -> conv2d, ReLU -> relu."""
    for cls, name in _MODULE_OPS:
        if type(module) is cls:
            return name
    return None


_MODULE_OPS: list[tuple[type, str]] = [
    (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"),
    (nn.ConvTranspose1d, "conv_transpose1d"), (nn.ConvTranspose2d, "conv_transpose2d"),
    (nn.ConvTranspose3d, "conv_transpose3d"), (nn.Linear, "linear"),
    (nn.BatchNorm1d, "batch_norm"), (nn.BatchNorm2d, "batch_norm"),
    (nn.BatchNorm3d, "batch_norm"), (nn.SyncBatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"), (nn.GroupNorm, "group_norm"),
    (nn.InstanceNorm1d, "instance_norm"), (nn.InstanceNorm2d, "instance_norm"),
    (nn.InstanceNorm3d, "instance_norm"),
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"),
    (nn.SELU, "selu"), (nn.CELU, "celu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"),
    (nn.Mish, "mish"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.Hardtanh, "hardtanh"), (nn.Softplus, "softplus"),
    (nn.PReLU, "prelu"), (nn.Softmax, "softmax"), (nn.LogSoftmax, "log_softmax"),
    (nn.MaxPool1d, "max_pool1d"), (nn.MaxPool2d, "max_pool2d"), (nn.MaxPool3d, "max_pool3d"),
    (nn.AvgPool1d, "avg_pool1d"), (nn.AvgPool2d, "avg_pool2d"), (nn.AvgPool3d, "avg_pool3d"),
    (nn.AdaptiveAvgPool1d, "adaptive_avg_pool1d"), (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
    (nn.AdaptiveAvgPool3d, "adaptive_avg_pool3d"),
    (nn.AdaptiveMaxPool1d, "adaptive_max_pool1d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.AdaptiveMaxPool3d, "adaptive_max_pool3d"),
    (nn.Dropout, "dropout"), (nn.Dropout1d, "dropout1d"), (nn.Dropout2d, "dropout2d"),
    (nn.Dropout3d, "dropout3d"), (nn.AlphaDropout, "alpha_dropout"),
    (nn.Identity, "identity"), (nn.Flatten, "flatten"), (nn.ZeroPad2d, "pad"),
    (nn.ConstantPad2d, "pad"), (nn.Upsample, "interpolate"), (nn.PixelShuffle, "pixel_shuffle"),
]

# Constructor arguments that define each standard module's function (besides its tensors).
_MODULE_FIELDS = {
    "conv": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "padding_mode", "output_padding", "transposed"),
    "linear": ("in_features", "out_features"),
    "batch_norm": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "instance_norm": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "layer_norm": ("normalized_shape", "eps", "elementwise_affine"),
    "group_norm": ("num_groups", "num_channels", "eps", "affine"),
    "pool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad",
             "divisor_override", "return_indices", "output_size"),
    "act": ("negative_slope", "alpha", "approximate", "beta", "threshold", "min_val",
            "max_val", "dim", "lambd"),
    "dropout": ("p",),
    "flatten": ("start_dim", "end_dim"),
    "pad": ("padding", "value"),
    "interpolate": ("size", "scale_factor", "mode", "align_corners"),
    "pixel_shuffle": ("upscale_factor",),
}


def describe_module(module: nn.Module, path: str) -> OpDesc:
    """The descriptor of ``module`` called at qualified name ``path``."""
    op = _module_op(module)
    params = tuple(f"{path}.{n}" for n, p in module.named_parameters() if p is not None)
    state = tuple(f"{path}.{n}" for n, b in module.named_buffers() if b is not None)
    if op is None:
        # Opaque: a user leaf or an uncommon layer.  Only the very same module instance
        # computes the same function.
        return OpDesc(Kind.MODULE, f"{type(module).__module__}.{type(module).__qualname__}",
                      (("instance", path),), params, state)
    kind = kind_of(op)
    group = {Kind.CONV: "conv", Kind.LINEAR: "linear", Kind.POOL: "pool", Kind.ACT: "act",
             Kind.DROPOUT: "dropout"}.get(kind, op)
    fields = _MODULE_FIELDS.get(group, ())
    hp = {f: getattr(module, f) for f in fields if hasattr(module, f)}
    if kind in (Kind.CONV, Kind.LINEAR):
        hp["bias"] = module.bias is not None
    if op == "batch_norm":
        hp["spatial_dims"] = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}.get(type(module), 2)
    inplace = bool(getattr(module, "inplace", False))
    return OpDesc(kind, op, _finish(op, hp), params, state, inplace)


# --------------------------------------------------------------------------------------
# Functions and methods
# --------------------------------------------------------------------------------------

_BINARY = {"add", "sub", "mul", "div", "floordiv", "mod", "pow", "eq", "ne", "lt", "le", "gt",
           "ge", "and_", "or_", "matmul"}


@functools.lru_cache(maxsize=None)
def _python_signature(fn: Any) -> inspect.Signature | None:
    if not inspect.isfunction(fn):
        return None  # builtins and C functions: torch.fx's schema matching below
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None  # a dispatching wrapper (F.max_pool2d): torch.fx knows its schema
    return sig


def _bind(target: Any, opcode: str, name: str, args: tuple, kwargs: dict,
          arg_types: tuple | None) -> dict[str, Any]:
    """Arguments bound to parameter names (through torch.fx's normalize_function)."""
    fn = target
    call_args = args
    if opcode == "call_method":
        fn = getattr(torch, str(target), None) or getattr(F, str(target), None)
        if fn is None:
            return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    sig = _python_signature(fn)
    if sig is not None:  # plain Python functions (F.relu, F.avg_pool2d, ours): bind directly
        try:
            bound = sig.bind(*call_args, **kwargs)
        except TypeError:
            return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        bound.apply_defaults()
        return dict(bound.arguments)
    key = (fn, len(call_args), tuple(kwargs), arg_types)
    try:
        template = _schema_template(*key)
    except TypeError:  # an unhashable target: not cached
        template = _schema_template.__wrapped__(*key)
    if template is None:
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    return {name: (call_args[v.key] if isinstance(v.key, int) else kwargs[v.key])
            if type(v) is _Slot else v for name, v in template}


class _Slot:
    """Stands for argument ``key`` (a position or a keyword) in :func:`_schema_template`."""

    __slots__ = ("key",)

    def __init__(self, key: int | str):
        self.key = key


@functools.lru_cache(maxsize=None)
def _schema_template(fn: Any, positional: int, keywords: tuple[str, ...],
                     arg_types: tuple | None) -> tuple[tuple[str, Any], ...] | None:
    """``(parameter, _Slot or default)`` pairs of torch.fx's ``normalize_function`` for a call
    of ``fn`` with that many positional arguments, those keywords and ``arg_types``; None when
    it cannot normalize the call.

    why: normalizing looks at the number and names of the arguments and at ``arg_types``,
    never at the values, and it is slow (schema matching per call, thousands of calls).
    torch.fx's schema matching warns 'Does not support nested parametric types ... Please
    file a bug.' about its own ``List[t]`` annotation (``torch.tensor([t], dtype=...)``):
    silenced here, where we call it; the call is still matched or left unbound as before.
    """
    from torch.fx.operator_schemas import normalize_function

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Does not support nested parametric",
                                    category=UserWarning)
            pair = normalize_function(fn, tuple(_Slot(i) for i in range(positional)),
                                      {k: _Slot(k) for k in keywords}, arg_types=arg_types,
                                      normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - ambiguous or unknown schema: fall back
        return None
    return None if pair is None else tuple(pair.kwargs.items())


def describe_call(target: Any, opcode: str, args: tuple, kwargs: dict,
                  is_data: Callable[[Any], bool], arg_types: tuple | None = None) -> OpDesc:
    """Descriptor of a call_function / call_method node.

    ``is_data(value)`` tells whether an argument is a reference to another node (an input)
    rather than a literal hyperparameter; inputs never enter ``hparams`` (they are compared
    through the node's ordered arguments), literals do.
    """
    name, inplace = canonical_name(target, opcode)
    kind = kind_of(name)
    if name in _BINARY or (name in ("neg", "pos", "abs") and len(args) == 1):
        literals = tuple(("operand", i, freeze(a)) for i, a in enumerate(args)
                         if not is_data(a))
        if name == "mul" and any(a == 0 for _, _, a in literals
                                 if isinstance(a, (int, float)) and not isinstance(a, bool)):
            kind = Kind.ZERO
        extra = tuple(sorted((k, freeze(v)) for k, v in kwargs.items()))
        return OpDesc(kind, name, tuple((f"operand{i}", v) for _, i, v in literals) + extra,
                      inplace=inplace)
    bound = _bind(target, opcode, name, args, kwargs, arg_types)
    inplace = inplace or bound.get("inplace") is True  # F.relu(x, inplace=True), as modules
    hp = {k: v for k, v in bound.items() if not _contains_data(v, is_data)}
    for k, v in bound.items():
        if k not in hp and not is_data(v):
            # a structure mixing literals and references (e.g. slices using a size()):
            # keep it with the references visible, so only equal structures compare equal
            hp[k] = v
    return OpDesc(kind, name, _finish(name, hp), inplace=inplace)


def _contains_data(value: Any, is_data: Callable[[Any], bool]) -> bool:
    if is_data(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_data(v, is_data) for v in value)
    if isinstance(value, dict):
        return any(_contains_data(v, is_data) for v in value.values())
    if isinstance(value, slice):
        return any(_contains_data(v, is_data) for v in (value.start, value.stop, value.step))
    return False
