"""Mixed-op analysis: find the weighted sums of candidate branches that read one input.

What a mixed op is
------------------
The paper's Eq. 1-2: one edge of the supernet reads a tensor ``x`` and returns
``o(x) = sum_i w_i * o_i(x)`` over its candidate operations ``o_i``, with one architecture
weight ``w_i`` per candidate.  In a traced supernet a node computes a mixed op when:

1. **It is a weighted sum** of two or more terms, in one of three forms:

   * *sum form* -- a tree of ``add`` nodes (``sum(...)`` starts it with a literal ``0``)
     whose leaves are terms ``w_i * o_i`` (either operand order)::

         add(add(add(0, mul(w0, o0)), mul(w1, o1)), mul(o2, w2))

   * *stack form* -- ``sum(stack([o_0, ..., o_n]) * w.view(-1, 1, 1, 1, 1), 0)``;
   * *stack-plus-slot form* -- the stack with a block of zeros appended for the ``none``
     candidate, ``cat([stack(o...), zeros_like(stack[:1])], 0)``, weighted by ``n + 1``
     weights; each zero row is a candidate (a *slot*: it has no tensor of its own).

2. **Each weight is an architecture weight**: a one-element tensor (or element ``i`` of a
   weight vector) that does not depend on the data the candidates compute on.

3. **Every candidate reads the same single input x.**  A candidate's *branch* is the set of
   nodes only it uses, found by walking back from its output while every user of a node
   lies in the branch; what the branch reads is the candidate's input.  An identity
   candidate is ``x`` itself.  A candidate that is constant zero in any form counts: the
   ``Zero`` op ``x.mul(0.)`` (strided or not), ``zeros_like(x)``, ``x.new_zeros(...)``, a
   zero slot.  A selection nested inside a branch whose weights derive from other
   architecture weights than the sum's own is an edge of its own: the walk stops at its
   input (where that edge starts), however far back the branch would otherwise reach.

4. **It chooses among candidates, not among edges**: at most one term may hold a mixed op
   over other architecture weights.  Two or more such terms make the sum a combination of
   edges -- PC-DARTS's edge normalization ``b0 * bn0(mixed0(s0)) + b1 * bn1(mixed1(s1))``,
   whose weights stay soft in the final network -- and never a mixed op, even when both
   edges read one tensor.

Nested selections built from the sum's own weights (the cascaded selections of Eq. 7-8 the
sharing passes create, ``w'_i = w_i / w_S``) are part of their candidate, so a rewritten
mixed op is found again, whole, by the next round.

Not mixed ops: residual adds (unweighted), a cell's sum over edges and DARTS's node sums
(over different inputs), edge normalization (rule 4), data-dependent gates (rule 2), sums
with a term not weighted by one element.  Every weighted sum of two or more terms that is
not taken is listed by :func:`declined_sums` with the reason and its source line (for the
report), e.g. ``branches read different inputs``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import networkx as nx
import torch

from .descriptors import Kind, Ref
from .ir import SupernetIR

__all__ = ["WeightRef", "Candidate", "MixedOp", "DeclinedSum", "find_mixed_ops",
           "mixed_op_at", "declined_sums", "tensor_meta"]


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """Where a candidate's architecture weight w_i lives: a one-element node, or element
    ``index`` of a weight vector (stack forms)."""

    node: str
    index: int | None = None

    def __str__(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate operation o_i of a mixed op."""

    output: str
    """The node holding o_i(x); the mixed op's input itself for an identity candidate; the
    block of zeros for a slot."""
    branch: tuple[str, ...]
    """Nodes only this candidate uses, in program order (empty for identity and slots)."""
    weight: WeightRef
    term: str | None
    """The node computing w_i * o_i (sum form); None in the stack forms."""
    kind: str
    """'zero', 'identity' or 'op'."""
    slot: bool = False
    """A zero row appended to the stack: no tensor of its own, its term is exactly zero
    whatever the input (``zeros_like`` of anything, even of inf or nan, is 0)."""


@dataclasses.dataclass(frozen=True)
class MixedOp:
    """A weighted sum of candidate branches reading one input (Eq. 2)."""

    name: str
    """Its place in the network: the module path of the mixed op (e.g. ``cells.0._ops.3``)."""
    input: str
    candidates: tuple[Candidate, ...]
    sum_nodes: tuple[str, ...]
    """The nodes that weight and sum the candidates (terms, adds / stack, cat, mul, sum)."""
    output: str
    """The node holding the weighted sum."""
    form: str
    """'sum', 'stack' or 'stack+slot'."""

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the mixed op: candidate branches and summing nodes."""
        out: list[str] = []
        for c in self.candidates:
            out.extend(c.branch)
        out.extend(self.sum_nodes)
        return tuple(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class DeclinedSum:
    """A weighted sum of two or more terms that is not a mixed op, and why."""

    output: str
    """The node holding the sum."""
    reason: str
    where: str
    """The source line that computes the sum (``file.py:123``), or its module path."""

    def describe(self) -> str:
        return f"weighted sum at {self.where} ({self.output}) is not a mixed op: {self.reason}"


def tensor_meta(ir: SupernetIR, name: str) -> tuple | None:
    """(shape, dtype) of a node's meta tensor; None when it holds no tensor."""
    val = ir.node(name).val
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(val.shape), val.dtype


def _is_scalar(val) -> bool:
    return isinstance(val, torch.Tensor) and val.numel() <= 1


def _numel(ir: SupernetIR, name: str) -> int | None:
    val = ir.node(name).val
    return val.numel() if isinstance(val, torch.Tensor) else None


def _operands(ir: SupernetIR, name: str) -> list | None:
    node = ir.node(name)
    if node.opcode not in ("call_function", "call_method") or node.kwargs:
        return None
    return list(node.args) if len(node.args) == 2 else None


def _where(ir: SupernetIR, name: str) -> str:
    node = ir.node(name)
    if node.source:
        return f"{os.path.basename(node.source[0])}:{node.source[1]}"
    return node.module_path or "<root>"


def _listing(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class _Finder:
    """Matches weighted sums, each once (memoized): a MixedOp, a DeclinedSum, or None for a
    node that is no weighted sum of two or more terms."""

    def __init__(self, ir: SupernetIR):
        self.ir = ir
        self.g = ir.graph
        self._ancestors: dict[str, set[str]] = {}
        self._sources: dict[str, frozenset[str]] = {}
        self._at: dict[str, MixedOp | DeclinedSum | None] = {}
        self._roots: dict[str, bool] = {}
        self._adds: dict[str, bool] = {}

    def at(self, root: str) -> MixedOp | DeclinedSum | None:
        if root not in self._at:
            self._at[root] = None  # a DAG has no cycles; this only guards re-entry
            if self.is_add(root):
                self._at[root] = None if self.is_zero_start(root) else self.sum_form(root)
            else:
                self._at[root] = self.stack_form(root)
        return self._at[root]

    def is_root(self, name: str) -> bool:
        """Whether ``name`` can end a weighted sum: an add no enclosing add tree expands, or
        the reduction of a stack form."""
        got = self._roots.get(name)
        if got is None:  # why: asked for every node of every branch, again and again
            got = self._roots[name] = self._is_root(name)
        return got

    def _is_root(self, name: str) -> bool:
        node = self.ir.node(name)
        if node.desc.op == "sum":
            return True
        if not self.is_add(name):
            return False
        users = list(self.g.successors(name))
        return not (len(users) == 1 and self.is_add(users[0]) and
                    not self.is_zero_start(users[0]))

    # -- terms and trees --------------------------------------------------------------
    def weighted_term(self, name: str) -> tuple[str, str] | None:
        """(weight node, candidate output) if ``name`` is ``w * o`` with a one-element w."""
        node = self.ir.node(name)
        if node.desc.op != "mul" or node.desc.inplace:
            return None
        ops = _operands(self.ir, name)
        if ops is None or not all(isinstance(o, Ref) for o in ops):
            return None
        a, b = ops[0].name, ops[1].name
        na, nb = _numel(self.ir, a), _numel(self.ir, b)
        if na == 1 and nb is not None and nb > 1:
            return a, b
        if nb == 1 and na is not None and na > 1:
            return b, a
        return None

    def is_add(self, name: str) -> bool:
        got = self._adds.get(name)
        if got is None:
            node = self.ir.node(name)
            got = self._adds[name] = node.desc.op == "add" and not node.desc.inplace and \
                _operands(self.ir, name) is not None
        return got

    def is_zero_start(self, name: str) -> bool:
        """``0 + s`` with ``s`` an add: how ``sum()`` over finished sums starts (not a root)."""
        ops = _operands(self.ir, name)
        refs = [o for o in ops if isinstance(o, Ref)]
        return len(refs) == 1 and all(o == 0 for o in ops if not isinstance(o, Ref)) and \
            self.is_add(refs[0].name)

    def sum_tree(self, root: str) -> tuple[list[str], list[str]]:
        """(add nodes, leaves) of the add tree at ``root``, expanding exclusive adds."""
        adds, leaves = [], []
        stack = [root]
        while stack:
            name = stack.pop()
            adds.append(name)
            for operand in reversed(_operands(self.ir, name)):
                if not isinstance(operand, Ref):
                    if operand != 0:
                        return adds, leaves + ["<literal>"]
                    continue
                child = operand.name
                if self.is_add(child) and list(self.g.successors(child)) == [name]:
                    stack.append(child)
                else:
                    leaves.append(child)
        return adds, leaves

    # -- branches ---------------------------------------------------------------------
    def branch(self, output: str, consumer: str,
               stop: frozenset[str] = frozenset()) -> tuple[list[str], set[str]]:
        """(exclusive nodes, data inputs) of the candidate producing ``output``; the walk
        never enters the nodes in ``stop``."""
        succ, pred, node_of = self.g.succ, self.g.pred, self.ir.node
        owned: set[str] = set()
        if output not in stop and all(u == consumer for u in succ[output]):
            owned.add(output)
            stack = list(pred[output])
            while stack:
                name = stack.pop()
                if name in owned or name in stop:
                    continue
                node = node_of(name)
                if node.opcode in ("placeholder", "output") or _is_scalar(node.val):
                    continue  # weights (and the arithmetic making them) are not the branch
                if all(u in owned for u in succ[name]):
                    owned.add(name)
                    stack.extend(pred[name])
        inputs: set[str] = set()
        frontier = {p for n in owned for p in pred[n] if p not in owned} if owned \
            else {output}
        for name in frontier:
            node = node_of(name)
            if node.opcode == "get_attr" or node.kind is Kind.SHAPE:
                continue
            if not isinstance(node.val, torch.Tensor) or _is_scalar(node.val):
                continue
            inputs.add(name)
        order = sorted(owned, key=lambda n: node_of(n).order)
        return order, inputs

    def candidate_kind(self, branch: list[str], output: str, input_: str) -> str:
        if output == input_ or not branch:
            return "identity"
        kinds = [self.ir.node(n).kind for n in branch]
        if self.ir.node(output).kind is Kind.ZERO and \
                all(k in (Kind.ZERO, Kind.LAYOUT, Kind.SHAPE, Kind.PARAM) for k in kinds):
            return "zero"
        if all(k is Kind.IDENTITY for k in kinds):
            return "identity"
        return "op"

    def weight_reads(self, weight: str, input_: str) -> bool:
        """Whether the weight node depends on the mixed op's input (then it is no weight)."""
        return input_ in self.ancestors(weight)

    def ancestors(self, name: str) -> set[str]:
        got = self._ancestors.get(name)
        if got is None:
            got = self._ancestors[name] = nx.ancestors(self.g, name)
        return got

    def sources(self, weight: str) -> frozenset[str]:
        """The leaves an architecture weight is computed from (its parameters or inputs)."""
        got = self._sources.get(weight)
        if got is None:
            node_of = self.ir.node
            got = frozenset(n for n in self.ancestors(weight) | {weight}
                            if node_of(n).opcode in ("placeholder", "get_attr"))
            self._sources[weight] = got
        return got

    def op_sources(self, op: MixedOp) -> frozenset[str]:
        return frozenset().union(*(self.sources(c.weight.node) for c in op.candidates))

    def foreign_selections(self, branch: list[str], own: frozenset[str]) -> list[MixedOp]:
        """Mixed ops inside ``branch`` whose weights share no source with ``own``."""
        found = []
        for name in branch:
            if self.is_root(name):
                op = self.at(name)
                if isinstance(op, MixedOp) and not (self.op_sources(op) & own):
                    found.append(op)
        return found

    def build(self, terms: list[tuple[WeightRef, str, str | None]], consumer_of,
              sum_nodes: list[str], output: str, form: str,
              slots: Iterable[tuple[WeightRef, str]] = ()) -> MixedOp | DeclinedSum | None:
        """A MixedOp from (weight, candidate output, term) triples, a DeclinedSum saying why
        the weighted sum is none, or None for fewer than two terms."""
        slots = list(slots)
        if len(terms) + len(slots) < 2:
            return None
        own = frozenset().union(*(self.sources(w.node) for w, _, _ in terms),
                                *(self.sources(w.node) for w, _ in slots))
        cands, edges = [], []
        for k, (weight, out, term) in enumerate(terms):
            consumer = consumer_of(term, out)
            branch, reads = self.branch(out, consumer)
            nested = self.foreign_selections(branch, own)
            if nested:  # a selection over other weights: its input is where this edge starts
                edges.append((k, nested))
                branch, reads = self.branch(out, consumer, frozenset(m.input for m in nested))
            if not branch:
                reads = {out}
            cands.append((weight, out, term, branch, reads))
        inputs = set().union(*(r for *_, r in cands))
        if len(inputs) > 1:
            by_reads: dict[tuple[str, ...], list[int]] = {}
            for k, (*_, reads) in enumerate(cands):
                by_reads.setdefault(tuple(sorted(reads)), []).append(k)
            parts = "; ".join(f"term{'s' if len(ks) > 1 else ''} {_listing(map(str, ks))} "
                              f"read{'' if len(ks) > 1 else 's'} {_listing(reads)}"
                              for reads, ks in by_reads.items())
            return self.declined(output, f"branches read different inputs ({parts})")
        if len(edges) >= 2:
            held = _listing(self.ir.node(ops[0].output).module_path or ops[0].output
                            for _, ops in edges)
            return self.declined(
                output, f"terms {_listing(str(k) for k, _ in edges)} hold mixed ops over "
                        f"other architecture weights ({held}): a sum over edges, such as "
                        f"edge normalization, not a choice among candidates")
        if not inputs:
            return self.declined(output, "no candidate reads a tensor")
        (input_,) = inputs
        for weight, *_ in cands:
            if self.weight_reads(weight.node, input_):
                return self.declined(output, f"weight {weight} depends on the data "
                                             f"({input_}): a gate, not an architecture weight")
        candidates = [
            Candidate(out, tuple(branch), weight, term, self.candidate_kind(branch, out, input_))
            for weight, out, term, branch, _ in cands]
        candidates += [Candidate(node, (), weight, None, "zero", slot=True)
                       for weight, node in slots]
        sum_order = sorted(set(sum_nodes), key=lambda n: self.ir.node(n).order)
        return MixedOp("", input_, tuple(candidates), tuple(sum_order), output, form)

    def declined(self, output: str, reason: str) -> DeclinedSum:
        return DeclinedSum(output, reason, _where(self.ir, output))

    # -- the forms ---------------------------------------------------------------------
    def sum_form(self, root: str) -> MixedOp | DeclinedSum | None:
        adds, leaves = self.sum_tree(root)
        if "<literal>" in leaves:
            return None
        terms = []
        for leaf in sorted(leaves, key=lambda n: self.ir.node(n).order):
            wt = self.weighted_term(leaf)
            if wt is None:
                return None
            terms.append((WeightRef(wt[0]), wt[1], leaf))
        return self.build(terms, lambda term, out: term, adds + [t for _, _, t in terms],
                          root, "sum")

    def stack_form(self, name: str) -> MixedOp | DeclinedSum | None:
        """``sum(mul(stacked, w_view), dim=0)`` -> MixedOp, where ``stacked`` is
        ``stack([o...])`` or ``cat([stack([o...]), zeros], 0)``."""
        node = self.ir.node(name)
        if node.desc.op != "sum" or len(node.inputs) != 1:
            return None
        dim = node.desc.hparam("dim", None)
        if dim not in (0, (0,)):
            return None
        mul = node.inputs[0]
        ops = _operands(self.ir, mul)
        if ops is None or self.ir.node(mul).desc.op != "mul" or \
                not all(isinstance(o, Ref) for o in ops) or \
                list(self.g.successors(mul)) != [name]:
            return None
        for stacked, weights in ((ops[0].name, ops[1].name), (ops[1].name, ops[0].name)):
            got = self.stacked(stacked, mul)
            if got is None:
                continue
            items, stack_node, slots, extra = got
            n = len(items) + len(slots)
            wval = self.ir.node(weights).val
            if not isinstance(wval, torch.Tensor) or wval.numel() != n or \
                    wval.dim() == 0 or wval.shape[0] != n:
                continue
            terms = [(WeightRef(weights, i), item, None) for i, item in items]
            slot_refs = [(WeightRef(weights, i), zero) for i, zero in slots]
            return self.build(terms, lambda term, out: stack_node,
                              extra + [mul, name], name,
                              "stack+slot" if slots else "stack", slot_refs)
        return None

    def stacked(self, name: str, consumer: str) -> tuple | None:
        """``([(row, item)], stack node, [(row, zero block)], summing nodes)`` of a stack of
        candidates, possibly with zero slots concatenated along dim 0; None otherwise."""
        node = self.ir.node(name)
        if list(self.g.successors(name)) != [consumer]:
            return None
        stack = self._stack_items(name)
        if stack is not None:
            return [(i, item) for i, item in enumerate(stack)], name, [], [name]
        if node.desc.op != "cat" or not isinstance(node.val, torch.Tensor) or \
                node.desc.hparam("dim", 0) not in (0, -node.val.dim()):
            return None
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, Ref) for p in parts):
            return None
        stacks = [p.name for p in parts if self._stack_items(p.name) is not None]
        if len(stacks) != 1:
            return None
        (stack_node,) = stacks
        items, slots, extra, row = [], [], [name, stack_node], 0
        for p in parts:
            if p.name == stack_node:
                items += [(row + i, item) for i, item in enumerate(self._stack_items(p.name))]
                row += len(self._stack_items(p.name))
                continue
            zero = self._zero_block(p.name, name, stack_node)
            if zero is None:
                return None
            rows, nodes = zero
            slots += [(row + i, p.name) for i in range(rows)]
            extra += nodes
            row += rows
        if set(self.g.successors(stack_node)) - set(extra):
            return None  # the stack feeds something besides the cat and its zero blocks
        return items, stack_node, slots, extra

    def _stack_items(self, name: str) -> list[str] | None:
        node = self.ir.node(name)
        if node.desc.op != "stack" or node.desc.hparam("dim", 0) != 0:
            return None
        items = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, Ref) for i in items):
            return None
        return [i.name for i in items]

    def _zero_block(self, name: str, consumer: str, stack: str) -> tuple | None:
        """(rows, nodes) when ``name`` is a constant-zero block read only by ``consumer``
        and computed from nothing but ``stack`` (``zeros_like(outs[:1])``)."""
        node = self.ir.node(name)
        if node.kind is not Kind.ZERO or not isinstance(node.val, torch.Tensor) or \
                node.val.dim() == 0:
            return None
        branch, reads = self.branch(name, consumer)
        if not branch or reads - {stack} or any(
                self.ir.node(n).kind not in (Kind.ZERO, Kind.LAYOUT, Kind.SHAPE)
                for n in branch):
            return None
        return node.val.shape[0], branch


def find_mixed_ops(ir: SupernetIR) -> list[MixedOp]:
    """Every mixed op of the IR, in program order, named by its place in the network."""
    return list(_analyse(ir)[0])


def declined_sums(ir: SupernetIR) -> list[DeclinedSum]:
    """Every weighted sum of two or more terms that is not a mixed op, with the reason."""
    return list(_analyse(ir)[1])


def _analyse(ir: SupernetIR) -> tuple[tuple[MixedOp, ...], tuple[DeclinedSum, ...]]:
    return ir.cached("weighted_sums", lambda: _find(ir), reads_notes=False)


def _find(ir: SupernetIR) -> tuple[tuple[MixedOp, ...], tuple[DeclinedSum, ...]]:
    finder = _Finder(ir)
    found: list[MixedOp] = []
    absorbed: set[str] = set()
    declined: list[tuple[DeclinedSum, set[str]]] = []
    in_declined: set[str] = set()
    for name in reversed(ir.topological_order()):  # outer sums first
        if name in absorbed:
            continue
        got = finder.at(name)
        if isinstance(got, MixedOp):
            found.append(got)
            absorbed.update(got.sum_nodes)
        elif isinstance(got, DeclinedSum) and name not in in_declined:
            # an add tree flattens nested sums: when the whole tree is declined, its inner
            # sums are tried on their own (DARTS's node sum holds whole mixed ops)
            nodes = set(finder.sum_tree(name)[0]) if finder.is_add(name) else {name}
            declined.append((got, nodes))
            in_declined |= nodes
    found.sort(key=lambda m: ir.node(m.output).order)
    # a declined tree holding a mixed op's sum is a sum over mixed ops, not a weighted sum
    kept = sorted((d for d, nodes in declined if not nodes & absorbed),
                  key=lambda d: ir.node(d.output).order)
    return tuple(_name_mixed_ops(ir, found)), tuple(kept)


def mixed_op_at(ir: SupernetIR, output: str, name: str = "") -> MixedOp | None:
    """The mixed op whose weighted sum ends at node ``output`` (a local re-analysis)."""
    if output not in ir:
        return None
    op = _Finder(ir).at(output)
    return dataclasses.replace(op, name=name) if isinstance(op, MixedOp) else None
def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    prefix = []
    for atoms in zip(*split):
        if len(set(atoms)) != 1:
            break
        prefix.append(atoms[0])
    return ".".join(prefix)


def _name_mixed_ops(ir: SupernetIR, ops: list[MixedOp]) -> list[MixedOp]:
    """Name each mixed op by its module path; disambiguate ops summed in one module."""
    def own_path(op: MixedOp) -> str:
        return ir.node(op.output).module_path

    counts: dict[str, int] = {}
    for op in ops:
        counts[own_path(op)] = counts.get(own_path(op), 0) + 1
    named, used = [], set()
    for op in ops:
        name = own_path(op)
        if counts[name] > 1 or not name:
            targets = [ir.node(n).target for c in op.candidates for n in c.branch
                       if ir.node(n).opcode == "call_module"]
            prefix = _common_prefix(targets) if len(targets) > 1 else ""
            if prefix and prefix.startswith(name) and prefix != name:
                name = prefix
        base, k = name or "<root>", 1
        name = base
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        named.append(dataclasses.replace(op, name=name))
    return named
