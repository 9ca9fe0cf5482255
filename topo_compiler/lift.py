"""``lift``: the tracer's fx graph -> the supernet IR, and the mixed ops tagged in it.

:func:`lift` makes one :class:`~topo_compiler.ir.IRNode` per fx node, in program order.
:func:`tag_mixed_ops` finds the mixed ops (:mod:`~topo_compiler.analysis`) and tags their
nodes with the mixed op they belong to (per-op counts in the report, clusters in the
pictures) and the architecture-weight arithmetic feeding them (left out of module counts).
"""

from __future__ import annotations

import itertools

import networkx as nx
import torch.fx as fx

from .analysis import MixedOp, find_mixed_ops
from .descriptors import Ref
from .ir import Role, SupernetIR
from .meta import UNKNOWN
from .tracer import TracedSupernet

__all__ = ["lift", "tag_mixed_ops"]


def lift(traced: TracedSupernet) -> SupernetIR:
    """The IR of a traced supernet: one :class:`IRNode` per fx node, in program order."""
    ir = SupernetIR(traced.root, traced.tensor_attrs, traced.device_type)
    ir.codegen = traced.graph._codegen
    for i, fx_node in enumerate(traced.graph.nodes):
        args = fx.node.map_arg(fx_node.args, lambda n: Ref(n.name))
        kwargs = fx.node.map_arg(fx_node.kwargs, lambda n: Ref(n.name))
        val = fx_node.meta.get("val", UNKNOWN)
        ir.add_node(fx_node.op, fx_node.target, args, kwargs, name=fx_node.name,
                    val=val if fx_node.op != "output" else None,
                    module_path=fx_node.meta.get("module_path", ""),
                    source=fx_node.meta.get("source"), order=(i,))
    ir._seq = itertools.count(len(traced.graph.nodes))
    return ir


def tag_mixed_ops(ir: SupernetIR) -> list[MixedOp]:
    """Find the mixed ops; tag their nodes (``notes.mixed_op``) for per-op counts and the
    architecture-weight arithmetic feeding them (``notes.role = Role.WEIGHT``), which the
    module counts leave out."""
    ops = find_mixed_ops(ir)
    for op in ops:
        for name in op.nodes:
            ir.annotate(name, mixed_op=op.name)
        for cand in op.candidates:
            for name in nx.ancestors(ir.graph, cand.weight.node) | {cand.weight.node}:
                ir.annotate(name, role=Role.WEIGHT)
    return ops
