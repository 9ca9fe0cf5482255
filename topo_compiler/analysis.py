"""Mixed-op analysis: find the weighted sums of candidate branches that read one input.

A mixed op (the paper's Eq. 2) is ``o(x) = sum_i w_i * o_i(x)``.  In a traced supernet it
appears in one of two forms:

* **sum form** -- a tree of ``add`` nodes (``sum(...)`` starts it with a literal ``0``) whose
  leaves are terms ``w_i * o_i`` (either operand order), each ``w_i`` a one-element weight::

      add(add(add(0, mul(w0, o0)), mul(w1, o1)), mul(o2, w2))

* **stack form** -- ``sum(stack([o_0, ..., o_n]) * w.view(-1, 1, 1, 1, 1), 0)`` (NNI's
  ``DartsLayerChoice``), the weight vector viewed to broadcast over the stacked candidates.

Each candidate's *branch* is the set of nodes only it uses, found by walking back from its
output while every user of a node lies in the branch; what the branches read is the mixed op's
*input*.  A weighted sum is a mixed op only when all candidates read the same single input and
no weight depends on it: residual adds (unweighted), PC-DARTS's edge-normalised sum and a
cell's sum over edges (weighted, but over different inputs) are not.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import networkx as nx
import torch

from .descriptors import Kind, Ref
from .ir import SupernetIR

__all__ = ["WeightRef", "Candidate", "MixedOp", "find_mixed_ops", "mixed_op_at"]


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """Where a candidate's architecture weight w_i lives: a one-element node, or element
    ``index`` of a weight vector (stack form)."""

    node: str
    index: int | None = None

    def __str__(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate operation o_i of a mixed op."""

    output: str
    """The node holding o_i(x); the mixed op's input itself for an identity candidate."""
    branch: tuple[str, ...]
    """Nodes only this candidate uses, in program order (empty for identity)."""
    weight: WeightRef
    term: str | None
    """The node computing w_i * o_i (sum form); None in the stack form."""
    kind: str
    """'zero', 'identity' or 'op'."""


@dataclasses.dataclass(frozen=True)
class MixedOp:
    """A weighted sum of candidate branches reading one input (Eq. 2)."""

    name: str
    """Its place in the network: the module path of the mixed op (e.g. ``cells.0._ops.3``)."""
    input: str
    candidates: tuple[Candidate, ...]
    sum_nodes: tuple[str, ...]
    """The nodes that weight and sum the candidates (terms, adds / stack, mul, sum)."""
    output: str
    """The node holding the weighted sum."""
    form: str
    """'sum' or 'stack'."""

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the mixed op: candidate branches and summing nodes."""
        out: list[str] = []
        for c in self.candidates:
            out.extend(c.branch)
        out.extend(self.sum_nodes)
        return tuple(dict.fromkeys(out))


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


class _Finder:
    def __init__(self, ir: SupernetIR):
        self.ir = ir
        self.g = ir.graph
        self._ancestors: dict[str, set[str]] = {}

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
        node = self.ir.node(name)
        return node.desc.op == "add" and not node.desc.inplace and \
            _operands(self.ir, name) is not None

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
    def branch(self, output: str, consumer: str) -> tuple[list[str], set[str]]:
        """(exclusive nodes, data inputs) of the candidate producing ``output``."""
        succ, pred, node_of = self.g.succ, self.g.pred, self.ir.node
        owned: set[str] = set()
        if all(u == consumer for u in succ[output]):
            owned.add(output)
            stack = list(pred[output])
            while stack:
                name = stack.pop()
                if name in owned:
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
        ancestors = self._ancestors.get(weight)
        if ancestors is None:
            ancestors = self._ancestors[weight] = nx.ancestors(self.g, weight)
        return input_ in ancestors

    def build(self, terms: list[tuple[WeightRef, str, str | None]], consumer_of,
              sum_nodes: list[str], output: str, form: str) -> MixedOp | None:
        """A MixedOp from (weight, candidate output, term) triples, or None."""
        if len(terms) < 2:
            return None
        cands, inputs = [], set()
        for weight, out, term in terms:
            branch, reads = self.branch(out, consumer_of(term, out))
            if not branch:
                reads = {out}
            inputs |= reads
            cands.append((weight, out, term, branch))
            if len(inputs) > 1:
                return None
        if len(inputs) != 1:
            return None
        (input_,) = inputs
        if any(self.weight_reads(w.node, input_) for w, _, _, _ in cands):
            return None
        candidates = tuple(
            Candidate(out, tuple(branch), weight, term,
                      self.candidate_kind(branch, out, input_))
            for weight, out, term, branch in cands)
        sum_order = sorted(set(sum_nodes), key=lambda n: self.ir.node(n).order)
        return MixedOp("", input_, candidates, tuple(sum_order), output, form)

    # -- the two forms ------------------------------------------------------------------
    def sum_form(self, root: str) -> MixedOp | None:
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

    def stack_form(self, name: str) -> MixedOp | None:
        """``sum(mul(stack([o...]), w_view), dim=0)`` -> MixedOp."""
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
            snode = self.ir.node(stacked)
            if snode.desc.op != "stack" or snode.desc.hparam("dim", 0) != 0 or \
                    list(self.g.successors(stacked)) != [mul]:
                continue
            items = snode.args[0] if snode.args else snode.kwargs.get("tensors")
            if not isinstance(items, (list, tuple)) or \
                    not all(isinstance(i, Ref) for i in items):
                continue
            wval = self.ir.node(weights).val
            n = len(items)
            if not isinstance(wval, torch.Tensor) or wval.numel() != n or \
                    wval.dim() == 0 or wval.shape[0] != n:
                continue
            terms = [(WeightRef(weights, i), item.name, None) for i, item in enumerate(items)]
            return self.build(terms, lambda term, out: stacked, [stacked, mul, name], name,
                              "stack")
        return None


def find_mixed_ops(ir: SupernetIR) -> list[MixedOp]:
    """Every mixed op of the IR, in program order, named by its place in the network."""
    return list(ir.cached("mixed_ops", lambda: _find_mixed_ops(ir), reads_notes=False))


def _find_mixed_ops(ir: SupernetIR) -> tuple[MixedOp, ...]:
    finder = _Finder(ir)
    found: list[MixedOp] = []
    absorbed: set[str] = set()
    for name in reversed(list(nx.topological_sort(ir.graph))):  # outer sums first
        if name in absorbed:
            continue
        if finder.is_add(name):
            if finder.is_zero_start(name):
                continue
            op = finder.sum_form(name)
        else:
            op = finder.stack_form(name)
        if op is not None:
            found.append(op)
            absorbed.update(op.sum_nodes)
    found.sort(key=lambda m: ir.node(m.output).order)
    return tuple(_name_mixed_ops(ir, found))


def mixed_op_at(ir: SupernetIR, output: str, name: str = "") -> MixedOp | None:
    """The mixed op whose weighted sum ends at node ``output`` (a local re-analysis)."""
    if output not in ir:
        return None
    finder = _Finder(ir)
    op = finder.sum_form(output) if finder.is_add(output) else finder.stack_form(output)
    return None if op is None else dataclasses.replace(op, name=name)


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
