"""CUDA-graph execution of a compiled supernet: capture forward and backward once, replay them.

On a GPU the compiled supernet's step is bound by Python and kernel launches (thousands of
small kernels per step), not by arithmetic.  :class:`CudaGraphs` wraps a module's forward:

    before:  out = compiled(x)            # every op launched from Python, every call
    after:   out = compiled(x)            # copy x into a static buffer, replay one CUDA graph;
             loss.backward()              # backward replays a second graph

A *capture* belongs to one :class:`CaptureKey`: training mode, the inputs' shapes, strides,
dtypes, devices and ``requires_grad``, the autocast state, which parameters require grad, the
values of run-time numbers held in CPU scalars, the variant and its generated forward.  Every
variant the guards re-trace (:mod:`~topo_compiler.guards`: a temperature read at run time, a
replaced alpha, another ``model.arch``) runs through the same logic, with keys of its own, in
one :class:`CaptureCache` per compiled supernet: at most ``max_captures`` captures held over all
variants, a stale one (not replayed lately: a variant no longer called) evicted for a new key,
and the variants themselves bounded by ``cache_size_limit``.  A key is
captured the ``capture_on_call``-th time it is seen, after ``warmup`` runs on a side stream,
into a private memory pool of its own.  A call that fits no capture (the first call of a key,
another shape such as the last partial batch, grad disabled, CPU tensors, keyword arguments)
runs the uncaptured forward: the same result, never an error; :class:`CudaGraphStats` counts
captures, replays and fallbacks with their reasons.

What stays correct across replays (the DARTS alternating loop: an architecture step on a
validation batch, a weight step on a training batch, both through the same module):

* parameters, alphas and BatchNorm buffers are read and updated in place by the graph, so
  optimizers stepping outside the graph and running statistics just work; the warm-up's
  buffer updates are undone, so a captured call updates them exactly once, like an eager one;
* gradients are copied out of the graph's static memory into a fresh buffer per backward (one
  copy kernel per dtype) and handed to autograd, so ``.grad`` never aliases memory the next
  replay overwrites: ``zero_grad(set_to_none=True)`` and gradient accumulation both work;
* outputs are copied out of the static memory too, so a caller may keep them;
* a second forward of a key whose previous output still waits for its backward runs
  uncaptured (replaying would overwrite the activations that backward needs).

What cannot be captured: a host sync in the graph (``.item()``, ``.tolist()``, ``.cpu()``,
``nonzero``...) is refused before capturing, naming the node; an opaque call that syncs fails
during capture: that key is then marked refused (reason in the stats) and runs uncaptured.
Parameters must not be replaced by other tensors after a capture (in-place updates, as
optimizers and ``load_state_dict`` do, are fine); a moved storage forces a re-capture.

The device calls (streams, pools, capture, replay) go through a small backend object, so the
bookkeeping is tested on machines without CUDA with an emulating backend.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import time
import warnings
import weakref
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["CudaGraphOptions", "CudaGraphs", "CaptureCache", "CudaGraphStats", "CaptureKey",
           "CaptureRecord", "CudaGraphFallbackWarning", "CudaGraphCaptureError", "host_syncs",
           "install"]


class CudaGraphFallbackWarning(UserWarning):
    """A call ran uncaptured for a reason the user may want to know (said once per reason)."""


class CudaGraphCaptureError(RuntimeError):
    """Capturing failed: the graph syncs with the host or calls something a capture forbids."""


@dataclasses.dataclass(frozen=True)
class CudaGraphOptions:
    """How :class:`CudaGraphs` captures (``compile_supernet(..., cuda_graphs=...)``)."""

    warmup: int = 2
    """Forward-and-backward runs on a side stream before capturing (lazy init, cuDNN)."""
    capture_on_call: int = 2
    """Capture a key the n-th time it is seen; earlier calls run uncaptured (1: at once)."""
    max_captures: int = 4
    """At most this many captures held at once, over all variants of the compiled supernet
    (each holds a memory pool).  When full, a new key evicts the least recently replayed
    capture if that one is stale (not replayed during the last ``max_captures`` capturable
    calls: an old variant, an old shape); otherwise the new key runs uncaptured."""
    guard_values: Callable[[], Hashable] | None = None
    """Extra key part, e.g. the values a re-tracing guard checks: a change recaptures."""
    warn: bool = True
    """Warn once per fallback reason (the stats count them either way)."""

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.capture_on_call < 1 or self.max_captures < 0:
            raise ValueError(f"invalid CudaGraphOptions {self}: warmup >= 0, "
                             f"capture_on_call >= 1, max_captures >= 0")


@dataclasses.dataclass(frozen=True)
class CaptureKey:
    """What a capture is specialized to."""

    training: bool
    submodules_training: tuple[bool, ...]
    """``training`` of every submodule: BatchNorm shared with the source model follows
    ``model.eval()`` even when the compiled module's own flag does not."""
    inputs: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, str, bool], ...]
    """Per positional input: shape, stride, dtype, device, requires_grad."""
    autocast: tuple[bool, torch.dtype]
    grad_flags: tuple[bool, ...]
    """``requires_grad`` of every parameter, in ``module.parameters()`` order."""
    guards: Hashable
    program: tuple[int, int]
    """Identity of the generated forward and its graph: a recompile makes old captures stale."""
    variant: int = 1
    """Which variant of the compiled supernet (1: the first trace; a re-trace adds one, see
    :mod:`~topo_compiler.guards`): each variant has captures of its own."""
    host_scalars: tuple[float, ...] = ()
    """Values of the 0-d CPU tensors the graph reads (a temperature read at run time): a CUDA
    kernel takes them by value, so a capture freezes them and a new value needs its own."""

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) + f" {str(d).replace('torch.', '')}"
                           + (" grad" if g else "") for s, _, d, _, g in self.inputs)
        amp = f", autocast {str(self.autocast[1]).replace('torch.', '')}" \
            if self.autocast[0] else ""
        scalars = f", run-time numbers {list(self.host_scalars)}" if self.host_scalars else ""
        return (f"variant {self.variant} {'train' if self.training else 'eval'}({shapes}{amp}, "
                f"{sum(self.grad_flags)}/{len(self.grad_flags)} params with grad{scalars})")


@dataclasses.dataclass
class CaptureRecord:
    """One capture attempt."""

    key: str
    status: str
    """'captured' or 'refused'."""
    seconds: float
    note: str = ""


@dataclasses.dataclass
class CudaGraphStats:
    """Counts of one :class:`CudaGraphs`: captures, replays, uncaptured calls with reasons."""

    captures: list[CaptureRecord] = dataclasses.field(default_factory=list)
    replays: int = 0
    """Captured forwards replayed (each backward replays its own graph as well)."""
    backward_replays: int = 0
    dropped: int = 0
    """Times a variant's captures were dropped because a parameter or buffer storage moved."""
    evicted: int = 0
    """Stale captures freed to make room for a new key (see ``CudaGraphOptions.max_captures``)."""
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """Reason -> calls that ran uncaptured for it."""

    @property
    def captured(self) -> int:
        return sum(r.status == "captured" for r in self.captures)

    def as_dict(self) -> dict[str, Any]:
        return {"captures": [dataclasses.asdict(r) for r in self.captures],
                "replays": self.replays, "backward_replays": self.backward_replays,
                "dropped": self.dropped, "evicted": self.evicted,
                "fallbacks": dict(self.fallbacks)}

    def summary(self) -> list[str]:
        lines = [f"{self.captured} capture(s), {self.replays} forward and "
                 f"{self.backward_replays} backward replay(s), "
                 f"{sum(self.fallbacks.values())} uncaptured call(s)"
                 + (f", {self.evicted} stale capture(s) evicted" if self.evicted else "")]
        lines += [f"{r.status} {r.key} in {r.seconds:.2f} s" + (f": {r.note}" if r.note else "")
                  for r in self.captures]
        lines += [f"uncaptured x{n}: {reason}" for reason, n in self.fallbacks.most_common()]
        return lines


# Ops that wait for the device (or read device memory on the host): never capturable.
_SYNC_METHODS = frozenset({"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__",
                           "__float__", "__index__", "masked_select", "unique"})
_SYNC_FUNCTIONS = frozenset({torch.nonzero, torch.masked_select, torch.unique, torch.argwhere,
                             torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu,
                             torch.Tensor.numpy, bool, int, float})


def host_syncs(graph: fx.Graph) -> list[str]:
    """The nodes of ``graph`` that sync with the host (``'node: x.item()'`` each)."""
    found = []
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _SYNC_METHODS:
            found.append(f"{node.name}: .{node.target}()")
        elif node.op == "call_function" and node.target in _SYNC_FUNCTIONS:
            found.append(f"{node.name}: {getattr(node.target, '__name__', node.target)}()")
    return found


class CudaBackend:
    """The CUDA calls a capture makes (replaced by an emulation in the CPU tests)."""

    def unavailable(self, tensors: Sequence[torch.Tensor]) -> str | None:
        """Why these tensors cannot go through a CUDA graph (None: they can)."""
        if not torch.cuda.is_available():
            return "CUDA is not available"
        devices = {t.device for t in tensors}
        if any(d.type != "cuda" for d in devices):
            kinds = ", ".join(sorted({d.type for d in devices}))
            return f"tensors on {kinds}, not CUDA"
        if len(devices) > 1:
            return f"tensors on {len(devices)} devices"
        return None

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator[None]:
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield
        current.wait_stream(stream)

    def pool(self, device: torch.device) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, body: Callable[[], Any], pool: Any,
                device: torch.device) -> tuple[Any, Any]:
        """Record ``body``'s device work as a graph; returns the graph and ``body``'s result,
        whose tensors live in ``pool`` and are rewritten by every replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool):
            result = body()
        return graph, result

    def replay(self, graph: Any) -> Any:
        """Run a captured graph.  ``None``; an emulating backend returns a fresh result."""
        graph.replay()
        return None


def _dense_strides(t: torch.Tensor) -> bool:
    """``t`` covers its storage span without holes or overlaps (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class _GradBuffer:
    """One flat buffer per dtype holding the gradients of the differentiable inputs.

    The backward graph copies its gradients into ``static`` views (in the graph); each
    backward then clones the flat buffers once and hands autograd views of the clones with
    the strides of the tensors they belong to, so ``.grad`` owns memory no replay touches.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], used: Sequence[bool]):
        self.layout: list[tuple[torch.dtype, int, tuple[int, ...], tuple[int, ...]] | None] = []
        sizes: dict[torch.dtype, int] = collections.Counter()
        device = tensors[0].device if tensors else torch.device("cpu")
        for t, u in zip(tensors, used):
            if not u:
                self.layout.append(None)
                continue
            stride = t.stride() if _dense_strides(t) else _contiguous_strides(t.shape)
            self.layout.append((t.dtype, sizes[t.dtype], tuple(t.shape), tuple(stride)))
            sizes[t.dtype] += t.numel()
        self.flat = {dtype: torch.empty(n, dtype=dtype, device=device)
                     for dtype, n in sizes.items()}
        self.static = self.views(self.flat)

    def views(self, flat: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor | None]:
        return [None if lay is None else flat[lay[0]].as_strided(lay[2], lay[3], lay[1])
                for lay in self.layout]

    def fresh(self) -> list[torch.Tensor | None]:
        return self.views({dtype: buf.clone() for dtype, buf in self.flat.items()})


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


@contextlib.contextmanager
def _autocast_as(state: tuple[bool, torch.dtype], device_type: str) -> Iterator[None]:
    """The caller's autocast state, with the cast cache off (a cache entry made during a
    capture would point into the graph's pool)."""
    enabled, dtype = state
    if not enabled:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, enabled=True, cache_enabled=False):
        yield


class _Capture:
    """The captured forward and backward of one key, with their static memory."""

    def __init__(self, runner: CudaGraphs, key: CaptureKey, args: tuple[torch.Tensor, ...],
                 params: list[nn.Parameter]):
        backend, device = runner.backend, args[0].device
        self.backend, self.key, self.stats = backend, key, runner.stats
        self.static_inputs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        self.diff_inputs = [a for a in self.static_inputs if a.requires_grad] + \
            [p for p in params if p.requires_grad]
        self.user_diff = [i for i, a in enumerate(args) if a.requires_grad]
        self.params = [p for p in params if p.requires_grad]
        self.last_node: weakref.ref | None = None
        """The autograd node of the latest replay (its ``done`` says whether backward ran)."""
        self.pool = backend.pool(device)
        forward = runner.uncaptured

        def forward_body() -> list[torch.Tensor]:
            with _autocast_as(key.autocast, device.type):
                out = forward(*self.static_inputs)
            leaves, self.spec = pytree.tree_flatten(out)
            if not all(isinstance(v, torch.Tensor) for v in leaves):
                raise CudaGraphCaptureError("the forward returns non-tensor values")
            return leaves

        self.fwd_graph, self.graph_outputs = backend.capture(forward_body, self.pool, device)
        self.static_outputs = list(self.graph_outputs)
        self.diff_outputs = [i for i, o in enumerate(self.static_outputs) if o.requires_grad]
        if not self.diff_outputs:
            raise CudaGraphCaptureError("no output requires grad")
        self.static_grad_outputs = [torch.empty_like(self.static_outputs[i])
                                    for i in self.diff_outputs]
        self.used: list[bool] = []
        """Which differentiable inputs get a gradient (unused ones stay None, as in eager)."""
        self.grads: _GradBuffer | None = None

        def backward_body() -> None:
            grads = torch.autograd.grad([self.graph_outputs[i] for i in self.diff_outputs],
                                        self.diff_inputs, self.static_grad_outputs,
                                        allow_unused=True)
            if self.grads is None:
                self.used = [g is not None for g in grads]
                self.grads = _GradBuffer(self.diff_inputs, self.used)
            pairs = [(s, g) for s, g in zip(self.grads.static, grads) if g is not None]
            if pairs:
                torch._foreach_copy_([s for s, _ in pairs], [g for _, g in pairs])

        self.bwd_graph, _ = backend.capture(backward_body, self.pool, device)

    def backward_pending(self) -> bool:
        """A replay's outputs still wait for their backward (a replay now would overwrite the
        activations it reads)."""
        node = self.last_node() if self.last_node is not None else None
        return node is not None and not node.done

    def forward(self, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for static, arg in zip(self.static_inputs, args):
            if static.data_ptr() != arg.data_ptr():
                static.detach().copy_(arg)
        fresh = self.backend.replay(self.fwd_graph)
        if fresh is not None:  # an emulating backend re-ran the body: its autograd history
            self.graph_outputs = fresh
        return [o.detach().clone() for o in self.static_outputs]

    def backward(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        for static, i in zip(self.static_grad_outputs, self.diff_outputs):
            g = grads[i]
            if g is None:
                static.zero_()
            elif static.data_ptr() != g.data_ptr():
                static.copy_(g)
        self.backend.replay(self.bwd_graph)
        self.stats.backward_replays += 1
        return self.grads.fresh()


class _Replay(torch.autograd.Function):
    """One autograd node for the whole captured forward; its backward replays the other graph.

    Inputs: the capture, then the user's tensors, then the parameters that require grad.
    """

    @staticmethod
    def forward(ctx: Any, capture: _Capture, n_args: int, *tensors: torch.Tensor):
        outputs = capture.forward(tensors[:n_args])
        ctx.capture, ctx.n_args, ctx.done = capture, n_args, False
        capture.last_node = weakref.ref(ctx)
        ctx.mark_non_differentiable(*[o for i, o in enumerate(outputs)
                                      if i not in capture.diff_outputs])
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        capture: _Capture = ctx.capture
        diff = capture.backward(grads)
        ctx.done = True
        n_user = len(capture.user_diff)
        user = [None] * ctx.n_args
        for slot, i in enumerate(capture.user_diff):
            user[i] = diff[slot]
        return (None, None, *user, *diff[n_user:])


class CaptureCache:
    """The captures of one compiled supernet, over all its variants (shared by their
    :class:`CudaGraphs`): at most ``options.max_captures`` held, stale ones evicted first."""

    _SEEN_LIMIT = 256
    """Keys remembered for ``capture_on_call`` (a value that never repeats must not pile up)."""

    def __init__(self, options: CudaGraphOptions, backend: Any):
        self.options, self.backend = options, backend
        self.stats = CudaGraphStats()
        self.captures: collections.OrderedDict[CaptureKey, _Capture] = \
            collections.OrderedDict()
        """Least recently replayed first."""
        self.last_used: dict[CaptureKey, int] = {}
        self.refused: dict[CaptureKey, str] = {}
        self.seen: collections.OrderedDict[CaptureKey, int] = collections.OrderedDict()
        self.warned: set[str] = set()
        self.clock = 0
        """Capturable calls so far (the age of a capture is counted in them)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> CaptureCache:
        """An empty cache for a copied module (graphs are not copied); the copied report's
        stats, if copied first, become the new cache's, cleared."""
        new = CaptureCache(self.options, self.backend)
        memo[id(self)] = new
        if id(self.stats) in memo:
            new.stats = memo[id(self.stats)]
            new.stats.__init__()
        else:
            memo[id(self.stats)] = new.stats
        return new

    def see(self, key: CaptureKey) -> int:
        """Count a sighting of ``key``; returns how many there were."""
        n = self.seen.pop(key, 0) + 1
        self.seen[key] = n
        while len(self.seen) > self._SEEN_LIMIT:
            self.seen.popitem(last=False)
        return n

    def use(self, key: CaptureKey) -> None:
        self.captures.move_to_end(key)
        self.last_used[key] = self.clock

    def make_room(self) -> bool:
        """Room for one more capture (evicting the least recently replayed one if stale)."""
        if len(self.captures) < self.options.max_captures:
            return True
        if not self.captures:
            return False
        oldest = next(iter(self.captures))
        if self.clock - self.last_used[oldest] <= self.options.max_captures:
            return False  # why: all in use; evicting would recapture over and over
        self.drop([oldest])
        self.stats.evicted += 1
        return True

    def drop(self, keys: Sequence[CaptureKey]) -> None:
        for key in keys:
            self.captures.pop(key, None)  # its graphs and memory pool go with it
            self.last_used.pop(key, None)
            self.refused.pop(key, None)


class CudaGraphs:
    """Wraps a module's forward with lazily captured CUDA graphs (see the module docstring).

    ``uncaptured`` is the forward it wraps; ``stats`` counts what happened.  The variants a
    compiled supernet re-traces (see :mod:`~topo_compiler.guards`) each get one of their own
    through :meth:`adopt`, sharing this one's :class:`CaptureCache` (captures, budget, stats).
    """

    def __init__(self, module: nn.Module, uncaptured: Callable[..., Any] | None = None,
                 options: CudaGraphOptions | None = None, backend: Any = None,
                 cache: CaptureCache | None = None, variant: int = 1):
        self.module = module
        self._inner = uncaptured
        """The forward wrapped; None: the module class's forward, looked up at every call
        (so a recompile is honoured)."""
        self.cache = cache or CaptureCache(options or CudaGraphOptions(),
                                           backend or CudaBackend())
        self.options, self.backend = self.cache.options, self.cache.backend
        self.variant = variant
        self._surface: tuple[list[nn.Parameter], list[torch.Tensor]] | None = None
        self._scalars: list[torch.Tensor] | None = None
        self._submodules: list[nn.Module] | None = None
        self._pointers: tuple[int, ...] = ()

    @property
    def stats(self) -> CudaGraphStats:
        return self.cache.stats

    @property
    def _captures(self) -> collections.OrderedDict[CaptureKey, _Capture]:
        """Every capture held (all variants), least recently replayed first."""
        return self.cache.captures

    def adopt(self, module: nn.Module, variant: int) -> CudaGraphs:
        """Route another variant's calls through the same captures and budget (its keys
        carry ``variant``); returns its runner (also ``module.cuda_graphs``)."""
        entry = _entry(module)
        runner = CudaGraphs(module, module.__dict__.get(entry), cache=self.cache,
                            variant=variant)
        module.__dict__[entry] = runner
        module.__dict__["cuda_graphs"] = runner
        return runner

    def uncaptured(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped forward, run as it is."""
        if self._inner is not None:
            return self._inner(*args, **kwargs)
        return getattr(type(self.module), _entry(self.module))(self.module, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> CudaGraphs:
        """A copy for the copied module: same options, no captures (graphs are not copied);
        the variants of one copied supernet share one new cache."""
        module = copy.deepcopy(self.module, memo)
        inner = None if self._inner is None else copy.deepcopy(self._inner, memo)
        new = CudaGraphs(module, inner, cache=copy.deepcopy(self.cache, memo),
                         variant=self.variant)
        memo[id(self)] = new
        return new

    # -- bookkeeping -------------------------------------------------------------------------
    def _tensors(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """The parameters and buffers (cached; storages checked on every call)."""
        if self._surface is None:
            self._surface = (list(self.module.parameters()), list(self.module.buffers()))
            self._pointers = self._storage_pointers()
        return self._surface

    def _storage_pointers(self) -> tuple[int, ...]:
        params, buffers = self._surface
        return tuple(t.data_ptr() for t in (*params, *buffers))

    def _host_scalars(self) -> list[torch.Tensor]:
        """0-d CPU tensors the graph reads besides parameters and buffers (the holders of
        run-time numbers, see :mod:`~topo_compiler.guards`)."""
        if self._scalars is None:
            graph = getattr(self.module, "graph", None)
            params, buffers = self._tensors()
            owned = {id(t) for t in (*params, *buffers)}
            found: dict[int, torch.Tensor] = {}
            for node in graph.nodes if isinstance(graph, fx.Graph) else ():
                if node.op != "get_attr":
                    continue
                try:
                    value = _attr(self.module, node.target)
                except AttributeError:
                    continue
                if isinstance(value, torch.Tensor) and id(value) not in owned and \
                        value.dim() == 0 and value.device.type == "cpu":
                    found[id(value)] = value
            self._scalars = list(found.values())
        return self._scalars

    def key(self, args: Sequence[Any], kwargs: dict[str, Any]) -> CaptureKey | str:
        """The call's capture key, or why the call cannot be captured."""
        if kwargs:
            return "keyword arguments"
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return "a non-tensor (or no) positional argument"
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return "grad disabled (only training-style calls are captured)"
        params, buffers = self._tensors()
        reason = self.backend.unavailable([*args, *params, *buffers])
        if reason is not None:
            return reason
        device = args[0].device
        autocast = (torch.is_autocast_enabled(device.type),
                    torch.get_autocast_dtype(device.type))
        if not autocast[0]:
            autocast = (False, torch.float32)
        grad_flags = tuple(p.requires_grad for p in params)
        if not any(grad_flags) and not any(a.requires_grad for a in args):
            return "nothing requires grad"
        guards = self.options.guard_values() if self.options.guard_values else None
        program = (id(getattr(type(self.module), _entry(self.module))),
                   id(getattr(self.module, "graph", None)))
        if self._submodules is None:
            self._submodules = list(self.module.modules())
        return CaptureKey(bool(self.module.training),
                          tuple(m.training for m in self._submodules),
                          tuple((tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device),
                                 a.requires_grad) for a in args),
                          autocast, grad_flags, guards, program, self.variant,
                          tuple(float(t) for t in self._host_scalars()))

    def _fallback(self, reason: str, args: tuple, kwargs: dict) -> Any:
        self.stats.fallbacks[reason] += 1
        if self.options.warn and reason not in self.cache.warned:
            self.cache.warned.add(reason)
            warnings.warn(f"CUDA graphs: running uncaptured: {reason}", CudaGraphFallbackWarning,
                          stacklevel=3)
        return self.uncaptured(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key(args, kwargs)
        if isinstance(key, str):
            return self._fallback(key, args, kwargs)
        cache = self.cache
        cache.clock += 1
        if self._storage_pointers() != self._pointers:
            # why: a graph reads parameters and buffers at the addresses it was captured with
            cache.drop([k for k in (*cache.captures, *cache.refused)
                        if k.variant == self.variant])
            self._pointers = self._storage_pointers()
            self.stats.dropped += 1
        capture = cache.captures.get(key)
        if capture is None:
            if key in cache.refused:
                return self._fallback(f"refused: {cache.refused[key]}", args, kwargs)
            seen = cache.see(key)
            if seen < self.options.capture_on_call:
                return self._fallback(f"key seen {seen} time(s), captured on call "
                                      f"{self.options.capture_on_call}", args, kwargs)
            if not cache.make_room():
                return self._fallback(f"max_captures={self.options.max_captures} keys "
                                      f"captured and in use", args, kwargs)
            capture = self._capture(key, args)
            if capture is None:
                return self._fallback(f"refused: {cache.refused[key]}", args, kwargs)
        if capture.backward_pending():
            return self._fallback("the previous captured call's backward has not run yet",
                                  args, kwargs)
        cache.use(key)
        params = capture.params
        outputs = _Replay.apply(capture, len(args), *args, *params)
        self.stats.replays += 1
        return pytree.tree_unflatten(list(outputs), capture.spec)

    def _capture(self, key: CaptureKey, args: tuple[torch.Tensor, ...]) -> _Capture | None:
        start = time.perf_counter()
        syncs = host_syncs(self.module.graph) if isinstance(
            getattr(self.module, "graph", None), fx.Graph) else []
        if syncs:
            self._refuse(key, start, f"host sync in the graph ({'; '.join(syncs[:3])})")
            return None
        params, buffers = self._tensors()
        saved = [b.detach().clone() for b in buffers]
        device = args[0].device
        try:
            self._warm_up(key, args, params)
            capture = _Capture(self, key, args, params)
        except Exception as error:  # why: a capture that fails is a fallback, not a crash
            lines = str(error).strip().splitlines()
            self._refuse(key, start, f"{type(error).__name__}: {lines[0] if lines else ''}")
            capture = None
        finally:
            with torch.no_grad():  # why: warm-up (and an emulated capture) ran BatchNorm
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            self.backend.synchronize(device)
        if capture is not None:
            self.cache.captures[key] = capture
            self.cache.last_used[key] = self.cache.clock
            self.stats.captures.append(CaptureRecord(key.describe(), "captured",
                                                     time.perf_counter() - start))
        return capture

    def _refuse(self, key: CaptureKey, start: float, reason: str) -> None:
        self.cache.refused[key] = reason
        self.stats.captures.append(CaptureRecord(key.describe(), "refused",
                                                 time.perf_counter() - start, reason))

    def _warm_up(self, key: CaptureKey, args: tuple[torch.Tensor, ...],
                 params: list[nn.Parameter]) -> None:
        """Run forward and backward on a side stream (gradients through ``autograd.grad``,
        so no ``.grad`` is touched)."""
        device = args[0].device
        self.backend.synchronize(device)
        with self.backend.side_stream(device):
            for _ in range(self.options.warmup):
                inputs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
                with _autocast_as(key.autocast, device.type):
                    out = self.uncaptured(*inputs)
                leaves = [o for o in pytree.tree_leaves(out)
                          if isinstance(o, torch.Tensor) and o.requires_grad]
                wrt = [i for i in inputs if i.requires_grad] + \
                    [p for p in params if p.requires_grad]
                if leaves:
                    torch.autograd.grad(leaves, wrt, [torch.ones_like(o) for o in leaves],
                                        allow_unused=True)
        self.backend.synchronize(device)


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _entry(module: nn.Module) -> str:
    """The attribute a module runs its computation by, which a runner replaces on the instance:
    a compiled supernet's generated code ``graph_forward`` (see
    :meth:`~topo_compiler.lower.CompiledSupernet.recompile`), any other module's ``forward``.
    why: below a compiled supernet's guarded ``forward``, so a capture replays only once the
    guards of its variant hold, whether the call came as ``compiled(x)`` or
    ``compiled.forward(x)``."""
    return "graph_forward" if hasattr(type(module), "graph_forward") else "forward"


def install(module: nn.Module, options: CudaGraphOptions | None = None,
            backend: Any = None) -> CudaGraphs:
    """Route ``module``'s calls through :class:`CudaGraphs`; returns it (also
    ``module.cuda_graphs``, and its stats as ``module.report.cuda_graphs``).  The runner
    takes the place of the module's ``forward`` (a compiled supernet's ``graph_forward``, under
    its guards) on the instance; the code it wraps is looked up at every uncaptured call, so a
    recompile (or another layer's instance-level forward) is honoured.  Variants the module's
    guards re-trace later are routed through the same captures (:meth:`CudaGraphs.adopt`)."""
    entry = _entry(module)
    runner = CudaGraphs(module, module.__dict__.get(entry), options, backend)
    report = module.__dict__.get("report")
    if report is not None and hasattr(report, "cuda_graphs"):
        report.cuda_graphs = runner.stats
    module.__dict__[entry] = runner
    module.__dict__["cuda_graphs"] = runner
    return runner
