"""``compile_supernet``: trace, lift, rewrite, lower."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import guards
from .analysis import MixedOp, declined_sums
from .cuda_graphs import CudaGraphOptions
from .ir import SupernetIR
from .lift import lift, tag_mixed_ops
from .lower import CompiledSupernet, lower
from .pass_manager import Hook, PassManager
from .passes import build_pipeline, normalize_names
from .report import CompileReport, MixedOpReport
from .tracer import TraceError, trace_supernet
from .vectorize import drop_identity_arithmetic, vectorize_weights

__all__ = ["compile_supernet", "NoMixedOpWarning", "analyze"]

analyze = tag_mixed_ops
"""The former name of :func:`~topo_compiler.lift.tag_mixed_ops` (tests and scripts use it)."""


class NoMixedOpWarning(UserWarning):
    """The model has no mixed op: it compiles to an equivalent graph, nothing to simplify."""


def _candidate_summary(ir: SupernetIR, op: MixedOp) -> tuple[str, ...]:
    lines = []
    for c in op.candidates:
        mods = [ir.node(n).desc.op for n in c.branch if ir.node(n).desc.is_module]
        lines.append(f"{c.kind}: {'-'.join(mods)}" if mods else c.kind)
    return tuple(lines)


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
    """Compile a one-shot NAS supernet into a cheaper, equivalent-by-design GraphModule.

    Args:
        model: the supernet; it is only read, never modified (also when compiling fails).
        example_inputs: a tensor or a tuple of the forward's positional arguments; shapes
            come from them (the batch size stays symbolic).  Non-tensor arguments are
            guarded: a call with other values re-traces (see ``cache_size_limit``).
        passes: pass names to run, in the pipeline's order (``"pms"``, ``"fms"``,
            ``"merge"``, ``"fold"``, ``"kn"``; ``"merge"`` brings ``"fold"`` along);
            ``None`` runs the paper's full pipeline, ``()`` none.
        exact: apply only rewrites that keep the function for every input and every
            architecture weight.
        dump_dir: write the IR before the first pass and after each pass (``00-input.dot``,
            ``01-pms.svg``...) and the report (JSON, Markdown) there.
        dump_formats: picture formats besides DOT ("svg", "png", "pdf"; needs graphviz's dot).
        dump_view: what the pictures show: "cell" (the first cell with mixed ops), "edge"
            (the first mixed op) or "full".
        leaf_modules: extra module classes or qualified names to keep opaque.
        pass_options: per-pass options, e.g. ``{"merge": {"device": "cuda"}}`` (the cost
            model's machine) or ``{"merge": {"form": "dense"}}``.
        hooks: extra callables ``hook(stage_index, stage_report, ir)`` run after each stage.
        example_kwargs: keyword arguments of the example call (keyword-only ones too), e.g.
            ``compile_supernet(model, (x,), example_kwargs={"tau": 1.0})``.
        cache_size_limit: how many variants (the first trace and re-traces) a compiled
            supernet keeps; past it a call raises :class:`~topo_compiler.guards.
            RecompileLimitError` naming the value that keeps changing.
        partial: when the forward cannot be traced, compile the submodules that can and run
            the rest eagerly (:mod:`~topo_compiler.partial`; ``.report`` is then a
            :class:`~topo_compiler.partial.PartialReport`; ``dump_dir`` and ``hooks`` are
            not applied to the submodules); ``False`` raises the
            :class:`~topo_compiler.tracer.TraceError` instead.
        cuda_graphs: run forward and backward as captured CUDA graphs (``True``, or a
            :class:`~topo_compiler.cuda_graphs.CudaGraphOptions`); calls that do not fit a
            capture (CPU tensors, grad disabled, a new shape's first call...) run uncaptured.
            ``compiled.cuda_graphs.stats`` (also ``report.cuda_graphs``) counts both.

    Returns:
        A :class:`~topo_compiler.lower.CompiledSupernet` sharing ``model``'s parameters and
        buffers, with the same forward signature and outputs, and ``.report``.  Each call
        checks the guards (what the trace assumed about arguments, the model's attributes
        and mode, globals, input shapes, mask tensors) and re-traces when one fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_supernet expects an nn.Module, got {type(model).__name__}")
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
    mixed_reports = [MixedOpReport(m.name, m.input, m.output, m.form, _candidate_summary(ir, m))
                     for m in mixed]
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
        dropped = drop_identity_arithmetic(ir)
        if dropped:
            lowering.append(f"{dropped} additions of 0 / multiplications by 1 dropped")
        vectorized = vectorize_weights(ir)
        if vectorized:
            lowering.append(vectorized)
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
        guards=[_describe_guard(g, traced.argument_names) for g in traced.guards],
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
                                      cache_size_limit=cache_size_limit)
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


def recompile(model: nn.Module, compile_call: tuple, dynamic: Iterable[tuple] = ()
              ) -> CompiledSupernet:
    """Compile ``model`` again the way ``compile_call`` says (unpickling a compiled supernet)."""
    settings, inputs, kwargs = compile_call
    with warnings.catch_warnings(), guards.trace_options(
            guards.TraceOptions(frozenset(dynamic), retrace=False)):
        warnings.simplefilter("ignore")
        return compile_supernet(model, _from_spec(inputs), example_kwargs=_from_spec(kwargs),
                                cache_size_limit=settings.cache_size_limit, **settings.kwargs())
