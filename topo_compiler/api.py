"""``compile_supernet``: trace, lift, rewrite, lower."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import guards, naming
from .analysis import MixedOp, declined_sums
from .cse import eliminate_common_subexpressions
from .cuda_graphs import CudaGraphOptions
from .ir import SupernetIR
from .kernel_batching import batch_kernel_arithmetic
from .lift import lift, tag_mixed_ops
from .lower import CompiledSupernet, lower
from .pass_manager import Hook, PassManager
from .passes import build_pipeline, normalize_names
from .report import CompileReport, MixedOpReport
from .tracer import TraceError, trace_supernet
from .vectorize import drop_identity_arithmetic, vectorize_weights

__all__ = ["compile_supernet", "NoMixedOpWarning", "AlreadyCompiledWarning", "analyze"]

analyze = tag_mixed_ops
"""The former name of :func:`~topo_compiler.lift.tag_mixed_ops` (tests and scripts use it)."""


class NoMixedOpWarning(UserWarning):
    """The model has no mixed op: it compiles to an equivalent graph, nothing to simplify."""


def _candidate_summary(ir: SupernetIR, op: MixedOp) -> tuple[str, ...]:
    lines = []
    for c, name in zip(op.candidates, naming.candidate_names(ir, op)):
        mods = [ir.node(n).desc.op for n in c.branch if ir.node(n).desc.is_module]
        lines.append(f"{name}: {'-'.join(mods)}" if mods else name)
    return tuple(lines)


class AlreadyCompiledWarning(UserWarning):
    """``compile_supernet`` was given a :class:`CompiledSupernet`: it compiles the source
    model instead, so no op is rewritten twice."""


def _check_model(model: Any) -> nn.Module:
    """The module to compile: ``model``, or the source of an already compiled supernet."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_supernet expects an nn.Module, got {type(model).__name__}")
    wrapped = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(wrapped, nn.Module):
        # why: dynamo's wrapper has a (*args, **kwargs) forward and hides the model
        raise TypeError(
            f"compile_supernet got a torch.compile'd module (OptimizedModule wrapping "
            f"{type(wrapped).__name__}); compile the plain model first, then torch.compile "
            f"the result: torch.compile(compile_supernet(model, example_inputs))")
    if isinstance(model, CompiledSupernet):
        source = model.source_model
        warnings.warn(
            f"compile_supernet got an already compiled supernet; compiling its source model "
            f"({type(source).__name__}) with the options given instead, so no op is "
            f"rewritten twice (pass the source model to silence this)",
            AlreadyCompiledWarning, stacklevel=3)
        return source
    return model


def _no_inputs_message(model: nn.Module) -> str:
    try:
        params = list(inspect.signature(type(model).forward).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    args = ", ".join(params) or "x"
    return (f"compile_supernet(model, example_inputs): example_inputs is None; pass example "
            f"values for {type(model).__name__}.forward({args}): one tensor, or a tuple "
            f"with one value per argument, e.g. torch.randn(64, 3, 32, 32) for an image "
            f"batch (use your training batch size and the model's device)")


def _check_no_arrays(model: nn.Module, example_inputs: Any, example_kwargs: Any) -> None:
    """A numpy array among the example inputs would be guarded as a constant and then stop
    fx's code generation with "argument of type: <class 'numpy.ndarray'>": say which argument
    and how to pass it."""
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        names = list(inspect.signature(type(model).forward).parameters)[1:]
    except (TypeError, ValueError):
        names = []
    named = [(names[i] if i < len(names) else f"#{i}", v) for i, v in enumerate(args)]
    named += list((example_kwargs or {}).items())
    for name, value in named:
        leaves = pytree.tree_leaves(value)
        if any(type(v).__module__ == "numpy" and hasattr(v, "__array__") and
               getattr(v, "ndim", 0) > 0 for v in leaves):
            raise TypeError(
                f"example input {name!r} of {type(model).__name__}.forward holds a numpy "
                f"array; the compiled graph takes tensors: pass torch.from_numpy(array) (moved "
                f"to the model's device), as the model's own layers need")


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off while compiling, as it was afterwards.

    why: compiling allocates a few hundred thousand long-lived objects (IR nodes, meta
    tensors, fx nodes), so the collector's full passes, each over every object of the
    process (torch's included), cost about a fifth of the compile time; the cyclic garbage
    a compile leaves is a few MB and is collected after it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _pausing_gc(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _gc_paused():
            return fn(*args, **kwargs)
    return wrapper


@_pausing_gc
def compile_supernet(model: nn.Module, example_inputs: Any, *,
                     passes: Sequence[str] | str | None = None, exact: bool = False,
                     dump_dir: str | os.PathLike | None = None,
                     dump_formats: Sequence[str] = ("svg",), dump_view: str = "cell",
                     leaf_modules: Iterable[type | str] = (),
                     pass_options: Mapping[str, Mapping[str, Any]] | None = None,
                     hooks: Sequence[Hook] = (),
                     example_kwargs: Mapping[str, Any] | None = None,
                     cache_size_limit: int = guards.DEFAULT_CACHE_SIZE_LIMIT,
                     partial: bool = True,
                     cuda_graphs: bool | CudaGraphOptions = False
                     ) -> CompiledSupernet:
    """Compile a one-shot NAS supernet into a cheaper fx ``GraphModule``, same signature.

    The default mode builds the paper's topology, which **changes the supernet's outputs on
    purpose**: a trailing BatchNorm shared by several candidates normalizes their mixture,
    floating modules are shared, kernels entering a merge are standardized (KN).  At a
    one-hot architecture (each mixed op's weights a vertex of the simplex) the shared graph
    computes the chosen sub-network (with KN, with its standardized kernels).
    ``exact=True`` keeps the function for every input and architecture weight (outputs and
    gradients equal the model's up to float rounding) and simplifies less.

    Move the model to its device (and dtype) first, and compile with your training batch
    size: tracing only reads shapes (the batch size stays symbolic in the graph), but the
    merge cost model weighs activations of that size against kernels.

    Args:
        model: the supernet, an ``nn.Module``; only read, never modified (also when
            compiling fails).  An already compiled supernet warns and its source model is
            compiled instead; a ``torch.compile``'d module is refused (compile the plain
            model first, then ``torch.compile`` the result).
        example_inputs: a tensor, or a tuple with one value per positional forward argument
            (e.g. ``(x, alphas)``); tensors give the shapes and dtypes, the batch size
            (dimension 0) stays free; non-tensor values are guarded: a call with other
            values re-traces (see ``cache_size_limit``).
        passes: pass names to run, in the pipeline's order (``"pms"``, ``"fms"``,
            ``"kn"``, ``"merge"``, ``"fold"``; ``"merge"`` brings ``"fold"`` along) as a
            sequence or a comma-separated string; ``None`` runs the paper's full pipeline,
            ``()`` none (the model regenerated as it is).
        exact: apply only rewrites that keep the function for every input and every
            architecture weight (no FMS, no KN, only exact merges).
        dump_dir: write the IR before the first pass and after each pass (``00-input.dot``,
            ``01-pms.svg``...) and the report (``report.json``, ``report.md``) there.
        dump_formats: picture formats besides DOT ("svg", "png", "pdf"; needs graphviz's dot).
        dump_view: what the pictures show: "cell" (the first cell with mixed ops), "edge"
            (the first mixed op) or "full".
        leaf_modules: extra module classes or qualified names (``"cells.0.sampler"``) to
            keep opaque: what a :class:`~topo_compiler.tracer.TraceError` asks for.
        pass_options: per-pass options, e.g. ``{"merge": {"device": "cuda"}}`` (the cost
            model's machine) or ``{"merge": {"form": "dense"}}``.
        hooks: extra callables ``hook(stage_index, stage_report, ir)`` run after the input
            stage (index 0) and after every pass run.
        example_kwargs: keyword arguments of the example call (keyword-only ones too), e.g.
            ``compile_supernet(model, (x,), example_kwargs={"tau": 1.0})``.
        cache_size_limit: how many variants (the first trace and re-traces) a compiled
            supernet keeps; past it a call raises :class:`~topo_compiler.guards.
            RecompileLimitError` naming the value that keeps changing.
        partial: when the forward cannot be traced, compile the submodules that can and run
            the rest eagerly (:mod:`~topo_compiler.partial`; ``.report`` is then a
            :class:`~topo_compiler.partial.PartialReport`; ``dump_dir`` and ``hooks`` are
            not applied to the submodules; the returned module's modules are views of
            the model's, so Python state set on the model later is followed).  A re-trace
            that meets an untraceable forward falls back the same way (a
            ``PartialCompileWarning``, listed in ``report.variants``).  ``False`` raises
            the :class:`~topo_compiler.tracer.TraceError` instead (from the call, for a
            re-trace).
        cuda_graphs: run forward and backward as captured CUDA graphs (``True``, or a
            :class:`~topo_compiler.cuda_graphs.CudaGraphOptions`); calls that do not fit a
            capture (CPU tensors, grad disabled, a new shape's first call...) run uncaptured.
            ``compiled.cuda_graphs.stats`` (also ``report.cuda_graphs``) counts both.

    Returns:
        A :class:`~topo_compiler.lower.CompiledSupernet`: call it like the model (same
        forward signature, same output structure and shapes).  It shares the model's
        parameters, buffers and leaf modules (an optimizer built on ``model.parameters()``
        trains it; ``state_dict()`` keys are the model's), follows ``train()``/``eval()``,
        reaches the model's public methods (``arch_parameters()``, ``genotype()``), and
        carries ``.report``, a :class:`~topo_compiler.report.CompileReport` (stages, module
        counts, decisions, timings in seconds).  Each call checks the guards (what the
        trace assumed about arguments, the model's attributes and mode, globals, input
        shapes, mask tensors) and re-traces when one fails.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is a ``torch.compile``'d module;
            ``example_inputs`` is ``None`` or does not match the forward's arguments;
            ``exact`` is not a bool.
        ValueError: an unknown pass name, pass option, dump format or dump view.
        TraceError: with ``partial=False``, a construct the tracer cannot follow
            (data-dependent control flow, random sampling in ``forward``); the message names
            the module, the source line and the way out (usually ``leaf_modules=[...]``).
            By default the untraceable forwards run eagerly instead (see ``partial``).

    Warns:
        NoMixedOpWarning: the model has no mixed op (it compiles to an equivalent graph).
        AlreadyCompiledWarning: ``model`` is a ``CompiledSupernet``.

    Example::

        model = spaces.build("darts").cuda()            # the model on its device first
        x = torch.randn(64, 3, 32, 32, device="cuda")   # your training batch size
        compiled = compile_supernet(model, x)
        w_opt = torch.optim.SGD(model.weights(), lr=0.025)
        loss = F.cross_entropy(compiled(x), y)          # (64, 10) logits, like model(x)
        loss.backward(); w_opt.step()
        print(compiled.report.summary())                # one line per pass and decision
    """
    model = _check_model(model)
    if example_inputs is None:
        raise TypeError(_no_inputs_message(model))
    _check_no_arrays(model, example_inputs, example_kwargs)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False, got {exact!r}")
    if not isinstance(cuda_graphs, (bool, CudaGraphOptions)):
        raise TypeError(f"cuda_graphs must be a bool or CudaGraphOptions, got {cuda_graphs!r}")
    if not isinstance(cache_size_limit, int) or cache_size_limit < 1:
        raise ValueError(f"cache_size_limit must be a positive int, got {cache_size_limit!r}")
    options = guards.pending_options()  # set while a compiled supernet re-traces
    names = normalize_names(passes)
    pipeline = build_pipeline(names, pass_options)
    all_hooks = list(hooks)
    if dump_dir is not None:
        from .viz import DumpHook
        dump = DumpHook(dump_dir, formats=dump_formats, view=dump_view)
        all_hooks.append(dump)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        traced = trace_supernet(model, example_inputs, leaf_modules,
                                example_kwargs=example_kwargs, options=options)
    except TraceError as error:
        # a re-trace raises (its dispatcher reports it); keyword examples need the whole call
        if not partial or options is not None or example_kwargs:
            raise
        if cuda_graphs:
            warnings.warn("cuda_graphs is not applied to a partially compiled model: its "
                          "compiled submodules run uncaptured", stacklevel=2)
        return _compile_partially(model, example_inputs, error, passes=passes, exact=exact,
                                  leaf_modules=leaf_modules, pass_options=pass_options,
                                  cache_size_limit=cache_size_limit)
    timings["trace"] = time.perf_counter() - start

    start = time.perf_counter()
    ir = lift(traced)
    mixed = tag_mixed_ops(ir)
    declined = [d.describe() for d in declined_sums(ir)]  # for the report, not the console
    mixed_reports = [MixedOpReport(m.name, naming.value_name(ir, m.input), m.output, m.form,
                                   _candidate_summary(ir, m)) for m in mixed]
    timings["lift+analyze"] = time.perf_counter() - start

    report_warnings: list[str] = []
    if not mixed:
        msg = (f"{type(model).__name__} has no mixed op (no weighted sum of candidates reading "
               f"one input); it compiles to an equivalent graph with nothing to simplify")
        warnings.warn(msg, NoMixedOpWarning, stacklevel=2)
        report_warnings.append(msg)

    start = time.perf_counter()
    stages = PassManager(pipeline, exact=exact, hooks=all_hooks).run(ir)
    stages[0].decisions.extend(declined)
    timings["passes"] = time.perf_counter() - start

    lowering: list[str] = []
    if names:  # why: with no pass, the compiled graph is the traced one, regenerated as is
        start = time.perf_counter()
        merged = eliminate_common_subexpressions(ir)
        if merged:
            lowering.append(f"{merged} repeated pure computations merged (common "
                            f"subexpressions)")
        dropped = drop_identity_arithmetic(ir)
        if dropped:
            lowering.append(f"{dropped} additions of 0 / multiplications by 1 dropped")
        vectorized = vectorize_weights(ir)
        if vectorized:
            lowering.append(vectorized)
        batched = batch_kernel_arithmetic(ir)
        if batched:
            lowering.append(batched)
        timings["vectorize"] = time.perf_counter() - start

    start = time.perf_counter()
    compiled = lower(ir)
    timings["lower"] = time.perf_counter() - start

    compiled.report = CompileReport(
        model=type(model).__name__, passes=names, exact=exact, stages=stages,
        mixed_ops=mixed_reports,
        timings=timings, warnings=report_warnings,
        specializations=traced.specializations,
        baked_inputs={k: repr(v) for k, v in traced.baked_inputs.items()},
        captured=list(traced.capture_notes), lowering=lowering,
        guards=_describe_guards(traced.guards, traced.argument_names),
        baked_values=[str(b) for b in traced.baked_values],
        variants=["variant 1: first trace"])
    if traced.baked_values:
        msg = (f"{type(model).__name__}: {len(traced.baked_values)} Python value(s) are "
               f"constants in the compiled graph and no guard can check them; the compiled "
               f"supernet goes stale if they change: "
               + "; ".join(str(b) for b in traced.baked_values)
               + ". Way out: keep them as module attributes or globals (guarded), or pass "
                 "them as forward arguments.")
        warnings.warn(msg, guards.BakedValueWarning, stacklevel=2)
        compiled.report.warnings.append(msg)
    if cuda_graphs:
        from .cuda_graphs import install
        graph_options = cuda_graphs if isinstance(cuda_graphs, CudaGraphOptions) else None
        install(compiled, graph_options)  # also sets report.cuda_graphs
    if dump_dir is not None:
        dump.write_report(compiled.report)
    settings = guards.CompileSettings(passes=passes, exact=exact,
                                      leaf_modules=tuple(leaf_modules),
                                      pass_options=pass_options,
                                      cache_size_limit=cache_size_limit,
                                      partial=partial)
    compiled.__dict__["_compile_call"] = (settings, _example_spec(example_inputs),
                                          _example_spec(dict(example_kwargs or {})))
    if options is not None and options.retrace:  # the dispatcher that asked keeps the guards
        compiled.__dict__["_trace_guards"] = traced.guards
        return compiled
    compiled.__dict__["_dispatch"] = guards.Dispatch(
        compiled, model, settings, traced.guards, report=compiled.report,
        holders=options.holders if options else None,
        dynamic=options.dynamic if options else ())
    return compiled


def _compile_partially(model: nn.Module, example_inputs: Any, error: TraceError,
                       **options: Any) -> nn.Module:
    """The model with its untraceable forwards eager and its traceable submodules compiled
    with the same options (see :mod:`~topo_compiler.partial`)."""
    from .partial import compile_partially

    def compile_one(module: nn.Module, args: tuple) -> CompiledSupernet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoMixedOpWarning)  # a candidate op has none
            return compile_supernet(module, args, partial=False, **options)

    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs,
                                                                  (tuple, list)):
        example_inputs = (example_inputs,)
    return compile_partially(model, tuple(example_inputs), error, compile_one)
def _describe_guards(found: Sequence[guards.Guard], names: Sequence[str]) -> list[str]:
    lines = [_describe_guard(g, names) for g in found if g.access[0] != "ident"]
    same = sum(g.access[0] == "ident" for g in found)
    if same:
        lines.append(f"the {same} parameters, buffers, tensor attributes and submodules the "
                     f"graph reads are the same objects (replacing one re-traces)")
    return lines


def _describe_guard(g: guards.Guard, names: Sequence[str]) -> str:
    if g.dynamic:
        return f"{g.label(names)} is a number, read at run time"
    value = guards._short(g.expected)
    return f"{g.label(names)} == {value}" + (f" ({g.source})" if g.source else "")


class _TensorSpec:
    """An example tensor's shape, dtype and device (what a recompile on load needs)."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, str(t.device)

    def make(self) -> torch.Tensor:
        try:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        except (RuntimeError, AssertionError):  # that device is not here
            return torch.zeros(self.shape, dtype=self.dtype)


def _example_spec(example: Any) -> Any:
    return pytree.tree_map(lambda v: _TensorSpec(v) if isinstance(v, torch.Tensor) else v,
                           example)


def _from_spec(spec: Any) -> Any:
    return pytree.tree_map(lambda v: v.make() if isinstance(v, _TensorSpec) else v, spec)


def recompile(model: nn.Module, compile_call: tuple, dynamic: Iterable[tuple] = (),
              cuda_graphs: tuple[CudaGraphOptions, Any] | None = None) -> CompiledSupernet:
    """Compile ``model`` again the way ``compile_call`` says (unpickling a compiled supernet),
    with a CUDA-graph runner of these ``(options, backend)`` when the pickled one had one."""
    settings, inputs, kwargs = compile_call
    with warnings.catch_warnings(), guards.trace_options(
            guards.TraceOptions(frozenset(dynamic), retrace=False)):
        warnings.simplefilter("ignore")
        compiled = compile_supernet(model, _from_spec(inputs),
                                    example_kwargs=_from_spec(kwargs),
                                    cache_size_limit=settings.cache_size_limit,
                                    **settings.kwargs())
    if cuda_graphs is not None:
        from .cuda_graphs import install
        install(compiled, *cuda_graphs)
    return compiled
