"""The compile report: module counts per stage (the paper's Table II) and what each pass did.

A *basic module* is what the paper's Table I lists: convolutions, norms, activations, pools.
Counts follow Table II:

* ``conv`` -- conv units: a maximal chain of convolutions (or linear layers) with nothing
  non-linear between them, so a DARTS dil conv (depthwise then pointwise) is one unit and a
  sep conv two;
* ``non_conv`` -- norms, activations, pools, dropout and opaque modules;
* identity, zero and weight arithmetic (``softmax(alpha)``, its rows, the sums and products
  of architecture weights: nodes whose ``notes.is_weight``) are not counted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

from .descriptors import Kind
from .ir import SupernetIR

__all__ = ["ModuleCounts", "count_modules", "StageReport", "MixedOpReport", "CompileReport"]

_CONV_KINDS = (Kind.CONV, Kind.LINEAR)
_NON_CONV_KINDS = (Kind.NORM, Kind.ACT, Kind.POOL, Kind.DROPOUT, Kind.MODULE)


@dataclasses.dataclass(frozen=True)
class ModuleCounts:
    """Basic modules in the paper's Table II sense."""

    conv: int
    non_conv: int

    @property
    def total(self) -> int:
        return self.conv + self.non_conv

    def as_dict(self) -> dict[str, int]:
        return {"conv": self.conv, "non_conv": self.non_conv, "total": self.total}

    def __str__(self) -> str:
        return f"{self.conv}/{self.non_conv}/{self.total}"


def count_modules(ir: SupernetIR, names: Iterable[str] | None = None) -> ModuleCounts:
    """Count conv units and non-conv modules among ``names`` (default: the whole graph)."""
    selected = {n for n in (ir.graph.nodes if names is None else names)
                if not ir.node(n).notes.is_weight}
    convs = {n for n in selected if ir.node(n).kind in _CONV_KINDS}
    chained = 0
    for name in convs:
        node = ir.node(name)
        data = [r for r in node.inputs if ir.node(r).is_tensor and
                ir.node(r).opcode != "get_attr"]
        if data and data[0] in convs and ir.users(data[0]) == [name]:
            chained += 1
    non_conv = sum(1 for n in selected if ir.node(n).kind in _NON_CONV_KINDS)
    return ModuleCounts(len(convs) - chained, non_conv)


def counts_by_mixed_op(ir: SupernetIR) -> dict[str, ModuleCounts]:
    """Counts over the nodes tagged with each mixed op (``notes.mixed_op``)."""
    groups: dict[str, list[str]] = {}
    for name in ir.graph.nodes:
        tag = ir.node(name).notes.mixed_op
        if tag is not None:
            groups.setdefault(tag, []).append(name)
    return {tag: count_modules(ir, names) for tag, names in groups.items()}


@dataclasses.dataclass
class StageReport:
    """One row of the report: the input, or one run of one pass."""

    name: str
    changed: bool
    seconds: float
    counts: ModuleCounts
    nodes: int
    mixed_op_counts: dict[str, ModuleCounts] = dataclasses.field(default_factory=dict)
    decisions: list[str] = dataclasses.field(default_factory=list)
    """What the pass did and why (one line each)."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "seconds": self.seconds,
                "counts": self.counts.as_dict(), "nodes": self.nodes,
                "mixed_op_counts": {k: v.as_dict() for k, v in self.mixed_op_counts.items()},
                "decisions": list(self.decisions)}


@dataclasses.dataclass(frozen=True)
class MixedOpReport:
    """A mixed op found in the input supernet."""

    name: str
    input: str
    output: str
    form: str
    candidates: tuple[str, ...]
    """One line per candidate: its kind and its basic modules, e.g. ``op: relu-conv-conv-bn``."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompileReport:
    """What ``compile_supernet`` did: stages, mixed ops, timings, warnings."""

    model: str
    passes: tuple[str, ...]
    exact: bool
    stages: list[StageReport]
    mixed_ops: list[MixedOpReport]
    timings: dict[str, float]
    warnings: list[str] = dataclasses.field(default_factory=list)
    specializations: list[str] = dataclasses.field(default_factory=list)
    baked_inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Non-tensor forward arguments the first trace was made with (guarded, see ``guards``)."""
    captured: list[str] = dataclasses.field(default_factory=list)
    """Calls recorded as opaque nodes or factories, and bookkeeping dropped from the graph
    (one line each, with the source line; see :mod:`topo_compiler.capture`)."""
    guards: list[str] = dataclasses.field(default_factory=list)
    """What the first trace assumed, each checked on every call (``guards.Guard``)."""
    baked_values: list[str] = dataclasses.field(default_factory=list)
    """Python numbers held as constants that no guard watches, with their source line."""
    variants: list[str] = dataclasses.field(default_factory=list)
    """One line per traced variant (the first trace, then each re-trace and why)."""
    lowering: list[str] = dataclasses.field(default_factory=list)
    """What lowering preparation did (the weight program, dropped identities)."""
    cuda_graphs: Any = None
    """The live :class:`~topo_compiler.cuda_graphs.CudaGraphStats` with ``cuda_graphs=True``."""

    @property
    def input(self) -> StageReport:
        return self.stages[0]

    @property
    def final(self) -> StageReport:
        return self.stages[-1]

    def stage(self, name: str) -> StageReport:
        """The last stage called ``name`` (e.g. ``"pms"``)."""
        for st in reversed(self.stages):
            if st.name == name or st.name.split("#")[0] == name:
                return st
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passes": list(self.passes), "exact": self.exact,
                "stages": [s.as_dict() for s in self.stages],
                "mixed_ops": [m.as_dict() for m in self.mixed_ops],
                "timings": dict(self.timings), "warnings": list(self.warnings),
                "specializations": list(self.specializations),
                "baked_inputs": dict(self.baked_inputs), "captured": list(self.captured),
                "guards": list(self.guards),
                "baked_values": list(self.baked_values), "variants": list(self.variants),
                "lowering": list(self.lowering),
                "cuda_graphs": None if self.cuda_graphs is None else
                self.cuda_graphs.as_dict()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def to_markdown(self, max_mixed_ops: int | None = 16) -> str:
        lines = [f"## topo-compiler report: `{self.model}`", ""]
        passes = ", ".join(self.passes) if self.passes else "none"
        lines.append(f"Passes: {passes}; exact: {self.exact}; "
                     f"mixed ops found: {len(self.mixed_ops)}.")
        if not self.passes:
            lines.append("")
            lines.append("No passes were run: the compiled module is the traced supernet, "
                         "regenerated as is.")
        lines += ["", "| stage | changed | time (ms) | nodes | conv | non-conv | total |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for st in self.stages:
            c = st.counts
            lines.append(f"| {st.name} | {'yes' if st.changed else 'no'} | "
                         f"{st.seconds * 1e3:.1f} | {st.nodes} | {c.conv} | {c.non_conv} | "
                         f"{c.total} |")
        timing = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.timings.items())
        lines += ["", f"Timings: {timing}."]
        decisions = [(st.name, d) for st in self.stages for d in st.decisions]
        if decisions:
            lines += ["", "### Decisions", ""]
            lines += [f"- {name}: {d}" for name, d in decisions]
        if self.mixed_ops:
            lines += ["", "### Mixed ops", "",
                      "| mixed op | input | form | candidates | "
                      + " | ".join(st.name for st in self.stages) + " |",
                      "|---|---|---|---:|" + "---:|" * len(self.stages)]
            shown = self.mixed_ops if max_mixed_ops is None else \
                self.mixed_ops[:max_mixed_ops]
            for m in shown:
                per_stage = " | ".join(str(st.mixed_op_counts.get(m.name, "-"))
                                       for st in self.stages)
                lines.append(f"| `{m.name}` | `{m.input}` | {m.form} | {len(m.candidates)} | "
                             f"{per_stage} |")
            if len(shown) < len(self.mixed_ops):
                lines.append(f"| ... {len(self.mixed_ops) - len(shown)} more | | | | "
                             + " | ".join("" for _ in self.stages) + " |")
            lines += ["", "Per mixed op: conv/non-conv/total basic modules at each stage."]
        if self.specializations:
            lines += ["", "### Shape specializations", ""]
            lines += [f"- {s}" for s in self.specializations]
        if self.baked_inputs:
            lines += ["", "### Non-tensor inputs (guarded)", ""]
            lines += [f"- `{k}` = {v}" for k, v in self.baked_inputs.items()]
        if self.captured:
            lines += ["", "### Captured and dropped", ""]
            lines += [f"- {c}" for c in self.captured]
        if self.guards:
            lines += ["", f"### Guards ({len(self.guards)}, checked on every call)", ""]
            lines += [f"- {g}" for g in self.guards[:32]]
            if len(self.guards) > 32:
                lines.append(f"- ... {len(self.guards) - 32} more")
        if self.variants:
            lines += ["", "### Variants", ""]
            lines += [f"- {v}" for v in self.variants]
        if self.baked_values:
            lines += ["", "### Baked values (constants no guard watches)", ""]
            lines += [f"- {b}" for b in self.baked_values]
        if self.lowering:
            lines += ["", "### Lowering", ""]
            lines += [f"- {line}" for line in self.lowering]
        if self.cuda_graphs is not None:
            lines += ["", "### CUDA graphs", ""]
            lines += [f"- {line}" for line in self.cuda_graphs.summary()]
        if self.warnings:
            lines += ["", "### Warnings", ""]
            lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()
