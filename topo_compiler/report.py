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

__all__ = ["ModuleCounts", "count_modules", "Decision", "summarize", "StageReport",
           "MixedOpReport", "CompileReport"]

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


def stage_counts(ir: SupernetIR) -> tuple[ModuleCounts, dict[str, ModuleCounts]]:
    """``(count_modules(ir), counts_by_mixed_op(ir))`` in one walk over the graph (the pass
    manager records both after every pass)."""
    nodes, succ = ir.graph.nodes, ir.graph.succ
    convs: dict[str, str | None] = {}  # conv -> its mixed op
    groups: dict[str, list[int]] = {}  # mixed op -> [convs, chained convs, non-conv]
    non_conv = 0
    for name, data in nodes.items():
        node = data["node"]
        tag = node.notes.mixed_op
        if tag is not None and tag not in groups:
            groups[tag] = [0, 0, 0]
        if node.notes.is_weight:
            continue
        if node.desc.kind in _CONV_KINDS:
            convs[name] = tag
            if tag is not None:
                groups[tag][0] += 1
        elif node.desc.kind in _NON_CONV_KINDS:
            non_conv += 1
            if tag is not None:
                groups[tag][2] += 1
    chained = 0
    for name, tag in convs.items():
        for r in nodes[name]["node"].inputs:  # as in count_modules
            source = nodes[r]["node"]
            if source.is_tensor and source.opcode != "get_attr":
                if r in convs and len(succ[r]) == 1:
                    chained += 1
                    if tag is not None and convs[r] == tag:
                        groups[tag][1] += 1
                break
    return (ModuleCounts(len(convs) - chained, non_conv),
            {tag: ModuleCounts(c - k, n) for tag, (c, k, n) in groups.items()})


class Decision(str):
    """One thing a pass did or declined, and why, in the user's words (a ``str``: its text).

    ``kind`` is what like decisions share ("shared the leading module of candidates"); the
    report's summary gives one line per pass and kind, counting mixed ops and modules removed.
    ``mixed_op`` is the edge concerned ('' for a decision about the whole graph) and
    ``removed`` the basic modules the rewrite removed.
    """

    kind: str
    mixed_op: str
    removed: int

    def __new__(cls, text: str, kind: str = "", mixed_op: str = "",
                removed: int = 0) -> "Decision":
        self = super().__new__(cls, text)
        self.kind, self.mixed_op, self.removed = kind, mixed_op, removed
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"text": str(self), "kind": self.kind, "mixed_op": self.mixed_op,
                "removed": self.removed}


def summarize(decisions: Iterable[str]) -> list[str]:
    """One line per kind of decision (in order of first appearance); decisions without a
    kind are kept as they are.  ``shared ...: 84 mixed ops, 504 modules removed``."""
    groups: dict[str, list[Decision]] = {}
    order: list[tuple[bool, str]] = []  # (is a kind, text or kind)
    for d in decisions:
        kind = getattr(d, "kind", "")
        if kind and kind not in groups:
            order.append((True, kind))
        if kind:
            groups.setdefault(kind, []).append(d)
        else:
            order.append((False, str(d)))
    out = []
    for is_kind, text in order:
        if not is_kind:
            out.append(text)
            continue
        group = groups[text]
        edges = len({d.mixed_op for d in group if d.mixed_op})
        what = f"{edges} mixed op{'s' if edges != 1 else ''}" if edges else ""
        if len(group) != edges:
            what += f"{', ' if what else ''}{len(group)} time{'s' if len(group) != 1 else ''}"
        removed = sum(d.removed for d in group)
        each = {d.removed for d in group}
        if removed and len(each) == 1 and len(group) > 1:
            what += f", {removed} modules removed ({each.pop()} each)"
        elif removed:
            what += f", {removed} modules removed"
        out.append(f"{text}: {what}")
    return out


@dataclasses.dataclass
class StageReport:
    """One row of the report: the input, or one run of one pass.

    ``name`` is the pass's name for its first run (``"pms"``) and ``pass#k`` for its k-th run
    inside the module-sharing fixed point (``"pms#2"``, the paper's Alg. 1 repeating PMS and
    FMS until neither changes the graph).
    """

    name: str
    changed: bool
    """Whether the pass changed the graph (a skipped pass did not)."""
    seconds: float
    """Wall time of the pass, in seconds (0 for the input and for skipped passes)."""
    counts: ModuleCounts
    """Basic modules of the whole graph after this stage (Table II's conv / non-conv)."""
    nodes: int
    """IR nodes after this stage (every op, including weight arithmetic)."""
    mixed_op_counts: dict[str, ModuleCounts] = dataclasses.field(default_factory=dict)
    """Basic modules of each mixed op (by its name, e.g. ``cells.0._ops.3``) after it."""
    decisions: list[str] = dataclasses.field(default_factory=list)
    """What the pass did and why, one :class:`Decision` (a ``str``) each."""
    skipped: str = ""
    """Why the pass did not run ('' when it ran), e.g. in exact mode a pass that changes
    the function on purpose."""

    @property
    def pass_name(self) -> str:
        """The pass this stage ran (``"pms"`` for ``"pms#2"``; ``"input"`` for the input)."""
        return self.name.split("#")[0]

    @property
    def run(self) -> int:
        """Which run of its pass this is: 1, 2... (``pms#2`` is 2)."""
        _, sep, k = self.name.partition("#")
        return int(k) if sep else 1

    def summary(self) -> list[str]:
        """One line per kind of decision: see :func:`summarize`."""
        return summarize(self.decisions)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "seconds": self.seconds,
                "skipped": self.skipped,
                "counts": self.counts.as_dict(), "nodes": self.nodes,
                "mixed_op_counts": {k: v.as_dict() for k, v in self.mixed_op_counts.items()},
                "decisions": [d.as_dict() if isinstance(d, Decision) else
                              {"text": str(d), "kind": "", "mixed_op": "", "removed": 0}
                              for d in self.decisions]}


@dataclasses.dataclass(frozen=True)
class MixedOpReport:
    """A mixed op found in the input supernet."""

    name: str
    """Its place in the network: the module path of the edge (``cells.0._ops.3``)."""
    input: str
    """What it reads, named by the module that produced it (``cells.0.preprocess0.op.2
    (BatchNorm2d)``, ``cells.0._ops.0 + cells.0._ops.1``, ``input x``)."""
    output: str
    """The fx node holding its weighted sum in the traced graph."""
    form: str
    """``sum`` (``sum(w_i * o_i(x))``) or ``stack`` (NNI's stacked candidates)."""
    candidates: tuple[str, ...]
    """One line per candidate: its name and basic modules, e.g.
    ``SepConv 3x3: relu-conv2d-conv2d-batch_norm-relu-conv2d-conv2d-batch_norm``."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompileReport:
    """What ``compile_supernet`` did: ``compiled.report``.

    ``print(report)`` gives the Markdown report (:meth:`to_markdown`); :meth:`summary` one
    line per pass and kind of decision; :meth:`to_json` / :meth:`as_dict` everything.

    Counts are *basic modules* in the paper's Table II sense (see the module docstring):
    ``conv`` units, ``non_conv`` modules (norms, activations, pools...) and their ``total``;
    the architecture-weight arithmetic is not counted.

    Example::

        report = compile_supernet(model, x).report
        report.input.counts, report.final.counts   # ModuleCounts(conv=724, non_conv=1858)...
        report.stage("pms").decisions[:3]          # what the first PMS run did, and why
        [s.name for s in report.runs("pms")]       # ['pms', 'pms#2', 'pms#3']
    """

    model: str
    """The model's class name."""
    passes: tuple[str, ...]
    """The passes asked for, in pipeline order."""
    exact: bool
    """Whether only function-keeping rewrites were applied (``compile_supernet(exact=...)``)."""
    stages: list[StageReport]
    """``input`` (the traced supernet), then one stage per pass run, in order."""
    mixed_ops: list[MixedOpReport]
    """The mixed ops found in the input, in program order."""
    timings: dict[str, float]
    """Seconds spent in each phase: trace, lift+analyze, passes, lower."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    specializations: list[str] = dataclasses.field(default_factory=list)
    """Python branches taken on shapes: the graph holds for inputs of these shapes."""
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
        """The traced supernet before any pass (``stages[0]``)."""
        return self.stages[0]

    @property
    def final(self) -> StageReport:
        """The last stage: what the compiled module computes (``stages[-1]``)."""
        return self.stages[-1]

    def runs(self, name: str) -> list[StageReport]:
        """Every run of pass ``name`` in order (``pms``, ``pms#2``...)."""
        return [st for st in self.stages if st.pass_name == name]

    def stage(self, name: str) -> StageReport:
        """The stage called ``name``: ``"pms#2"`` is that run; a pass name (``"pms"``) gives
        its first run that changed the graph (its first run when none did), not the
        fixed point's closing no-op runs, which :meth:`runs` lists."""
        runs = [st for st in self.stages if st.name == name] if "#" in name else \
            self.runs(name)
        if not runs:
            raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")
        return next((st for st in runs if st.changed), runs[0])

    @property
    def decisions(self) -> list[tuple[str, str]]:
        """Every decision as ``(stage name, decision)``, in order (:class:`Decision`\\ s)."""
        return [(st.name, d) for st in self.stages for d in st.decisions]

    def summary(self) -> str:
        """One line per pass run and kind of decision, e.g.
        ``pms: shared the leading and trailing module: 84 mixed ops, 504 modules removed``."""
        lines = []
        for st in self.stages[1:]:
            if st.skipped:
                lines.append(f"{st.name}: skipped ({st.skipped})")
            elif not st.decisions and st.changed:
                lines.append(f"{st.name}: changed the graph")
            lines += [f"{st.name}: {line}" for line in st.summary()]
        if not lines:
            lines.append("no pass changed the graph" if self.passes else "no passes were run")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready builtins (seconds for times, Table II counts)."""
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
        """:meth:`as_dict` as JSON text."""
        return json.dumps(self.as_dict(), indent=indent)

    def to_markdown(self, max_mixed_ops: int | None = 16,
                    max_decisions: int | None = 20, max_guards: int | None = 32) -> str:
        """The report as Markdown: the stage table, the summary, the first ``max_decisions``
        decisions, the first ``max_mixed_ops`` mixed ops with their counts at each stage and
        the first ``max_guards`` guards (``None``: all; ``0``: that section is one line
        saying how many there are).  Truncated lists end with "N more"."""
        lines = [f"## topo-compiler report: `{self.model}`", ""]
        passes = ", ".join(self.passes) if self.passes else "none"
        mode = "exact (keeps the function)" if self.exact else \
            "the paper's (changes the function on purpose)"
        lines.append(f"Passes: {passes}; mode: {mode}; mixed ops found: "
                     f"{len(self.mixed_ops)}.")
        if not self.passes:
            lines.append("")
            lines.append("No passes were run: the compiled module is the traced supernet, "
                         "regenerated as is.")
        lines += ["", "| stage | changed | time (ms) | nodes | conv | non-conv | total |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for st in self.stages:
            c = st.counts
            changed = f"skipped: {st.skipped}" if st.skipped else \
                "yes" if st.changed else "no"
            lines.append(f"| {st.name} | {changed} | {st.seconds * 1e3:.1f} | {st.nodes} | "
                         f"{c.conv} | {c.non_conv} | {c.total} |")
        repeats = [st.pass_name for st in self.stages if st.run > 1]
        if repeats:
            lines += ["", f"`{repeats[0]}#2` is {repeats[0]}'s second run: PMS and FMS repeat "
                          f"until neither changes the graph (the paper's Alg. 1)."]
        timing = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.timings.items())
        lines += ["", f"Timings: {timing}."]
        lines += ["", "### Summary", ""] + [f"- {s}" for s in self.summary().splitlines()]
        decisions = self.decisions
        if decisions:
            shown = decisions if max_decisions is None else decisions[:max_decisions]
            if shown:
                lines += ["", "### Decisions", ""]
                lines += [f"- {name}: {d}" for name, d in shown]
            if len(shown) < len(decisions):
                left = f"{len(decisions) - len(shown)} more decisions" if shown else \
                    f"{len(decisions)} decisions in all"
                lines += ["", f"{left}: `report.decisions`, "
                              f"`python -m topo_compiler --verbose`."]
        if self.mixed_ops:
            shown_ops = self.mixed_ops if max_mixed_ops is None else \
                self.mixed_ops[:max_mixed_ops]
            if shown_ops:
                lines += ["", "### Mixed ops", "",
                          "| mixed op | reads | form | candidates | "
                          + " | ".join(st.name for st in self.stages) + " |",
                          "|---|---|---|---:|" + "---:|" * len(self.stages)]
                for m in shown_ops:
                    per_stage = " | ".join(str(st.mixed_op_counts.get(m.name, "-"))
                                           for st in self.stages)
                    lines.append(f"| `{m.name}` | `{m.input}` | {m.form} | "
                                 f"{len(m.candidates)} | {per_stage} |")
                lines += ["", "Per mixed op: conv/non-conv/total basic modules at each stage."]
            if len(shown_ops) < len(self.mixed_ops):
                left = f"{len(self.mixed_ops) - len(shown_ops)} more mixed ops" if shown_ops \
                    else f"{len(self.mixed_ops)} mixed ops, with their counts at each stage"
                lines += ["", f"{left}: `report.mixed_ops`, `--all-mixed-ops`."]
        if self.specializations:
            lines += ["", "### Shape specializations", ""]
            lines += [f"- {s}" for s in self.specializations]
        if self.baked_inputs:
            lines += ["", "### Non-tensor inputs (guarded)", ""]
            lines += [f"- `{k}` = {v}" for k, v in self.baked_inputs.items()]
        if self.captured:
            lines += ["", "### Captured and dropped", ""]
            lines += [f"- {c}" for c in self.captured]
        if self.guards and max_guards == 0:
            lines += ["", f"{len(self.guards)} guards, checked on every call: "
                          f"`report.guards`, `--verbose`."]
        elif self.guards:
            shown_guards = self.guards if max_guards is None else self.guards[:max_guards]
            lines += ["", f"### Guards ({len(self.guards)}, checked on every call)", ""]
            lines += [f"- {g}" for g in shown_guards]
            if len(shown_guards) < len(self.guards):
                lines.append(f"- ... {len(self.guards) - len(shown_guards)} more")
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
