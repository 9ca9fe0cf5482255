"""Passes and the pass manager: order, fixed point, verification, timing and dumps.

A pass is a small object with a ``name`` whose ``run(ir, ctx)`` rewrites the IR in place and
returns True only when it changed it (running it again right after returns False).  The
manager owns everything around passes: it runs them in the pipeline's order, repeats the
module-sharing passes to a fixed point (the paper's Alg. 1), verifies the IR after every
pass, times it, records a :class:`~topo_compiler.report.StageReport`, and calls the hooks
(``dump_dir`` pictures) with each stage.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Callable, ClassVar, Sequence

from .ir import SupernetIR
from .report import Decision, StageReport, stage_counts

__all__ = ["Pass", "PassContext", "PassManager", "FixedPoint", "FixedPointError", "Hook"]


@dataclasses.dataclass
class PassContext:
    """What passes share: the semantics asked for and a log of their decisions."""

    exact: bool = False
    """Only rewrites that keep the function for every input and every weight."""
    decisions: list[Decision] = dataclasses.field(default_factory=list)

    def decide(self, line: str, *, kind: str = "", mixed_op: str = "",
               removed: int = 0) -> None:
        """Record one decision (shown in the report under the running pass): ``line`` in the
        user's words; ``kind`` groups like decisions in the summary, ``mixed_op`` names the
        edge concerned, ``removed`` counts the basic modules the rewrite removed."""
        self.decisions.append(Decision(line, kind, mixed_op, removed))


class Pass(abc.ABC):
    """A rewrite of the IR.  Subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str]
    changes_function: ClassVar[bool] = False
    """Whether the pass changes the supernet's function on purpose (the paper's topology):
    exact mode then skips it, and the report says so."""

    @abc.abstractmethod
    def run(self, ir: SupernetIR, ctx: PassContext) -> bool:
        """Rewrite ``ir`` in place; return True only if it changed."""


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Run ``passes`` in order, again and again, until a whole round changes nothing."""

    passes: tuple[Pass, ...]
    max_rounds: int = 32


class FixedPointError(RuntimeError):
    """A fixed point was not reached within the round cap."""


Hook = Callable[[int, StageReport, SupernetIR], None]
"""Called after the input stage (index 0) and after every pass run."""


class PassManager:
    """Runs a pipeline of passes and fixed-point groups over a :class:`SupernetIR`."""

    def __init__(self, pipeline: Sequence[Pass | FixedPoint], *, exact: bool = False,
                 hooks: Sequence[Hook] = (), verify: bool = True):
        self.pipeline = tuple(pipeline)
        self.exact = exact
        self.hooks = tuple(hooks)
        self.verify = verify

    def run(self, ir: SupernetIR) -> list[StageReport]:
        if self.verify:
            ir.verify("lift")
        stages = [self._stage(ir, "input", False, 0.0, [])]
        self._call_hooks(0, stages[-1], ir)
        for step in self.pipeline:
            if isinstance(step, FixedPoint):
                self._fixed_point(ir, step, stages)
            else:
                self._run_one(ir, step, step.name, stages)
        return stages

    def _fixed_point(self, ir: SupernetIR, group: FixedPoint, stages: list[StageReport]) -> None:
        """Cycle through the passes until each has run once, since the last change, without
        changing anything (the cheapest confirmation that nothing is left to do)."""
        quiet = 0  # passes run in a row without a change
        for round_ in range(1, group.max_rounds + 1):
            changed_in_round = []
            for p in group.passes:
                name = p.name if round_ == 1 else f"{p.name}#{round_}"
                if self._run_one(ir, p, name, stages):
                    changed_in_round.append(p.name)
                    quiet = 0
                else:
                    quiet += 1
                if quiet >= len(group.passes):
                    return
        raise FixedPointError(
            f"no fixed point after {group.max_rounds} rounds: {', '.join(changed_in_round)} "
            f"still changed the IR in the last round (a pass that reports a change it did not "
            f"make, or two passes undoing each other)")

    def _run_one(self, ir: SupernetIR, p: Pass, name: str, stages: list[StageReport]) -> bool:
        if self.exact and p.changes_function:
            if not any(st.name.split("#")[0] == p.name for st in stages):  # once, not per round
                stages.append(self._stage(ir, name, False, 0.0, [],
                                          skipped="exact mode: it changes the function"))
                self._call_hooks(len(stages) - 1, stages[-1], ir)
            return False
        ctx = PassContext(exact=self.exact)
        start = time.perf_counter()
        changed = p.run(ir, ctx)
        seconds = time.perf_counter() - start
        if not isinstance(changed, bool):
            raise TypeError(f"pass {p.name!r} returned {changed!r}; a pass must return True "
                            f"when it changed the IR and False otherwise")
        if self.verify:
            ir.verify(f"pass {name!r}")
        stages.append(self._stage(ir, name, changed, seconds, ctx.decisions))
        self._call_hooks(len(stages) - 1, stages[-1], ir)
        return changed

    @staticmethod
    def _stage(ir: SupernetIR, name: str, changed: bool, seconds: float,
               decisions: list[Decision], skipped: str = "") -> StageReport:
        counts, by_mixed_op = stage_counts(ir)
        return StageReport(name, changed, seconds, counts, len(ir), by_mixed_op,
                           list(decisions), skipped)

    def _call_hooks(self, index: int, stage: StageReport, ir: SupernetIR) -> None:
        for hook in self.hooks:
            hook(index, stage, ir)
