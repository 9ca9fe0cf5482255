"""Names in the user's words for the report: candidates, values and mixed ops.

A decision should read like the model's source, not like the fx graph:

* a candidate is named by its ``nn.ModuleDict`` key (``sep_conv_3x3``), its attribute name
  (``b (Conv2d 3x3)``) or, in a ``ModuleList``, by its module class and largest kernel
  (``SepConv 3x3``, ``DilConv 5x5 d2``, ``MaxPool2d 3x3``), so candidates that differ only
  in kernel size read differently (alike names get their index: ``Conv2d 1x1 [2]``); a
  group of candidates a pass already combined reads ``{SepConv 3x3, SepConv 5x5}``;
* a value is named by the module that produced it (``cells.0.preprocess0.op.2``), an input
  by its argument (``input x``), and a sum of mixed ops by its terms
  (``cells.0._ops.0 + cells.0._ops.1``), never by an fx node name like ``add_17``.
"""

from __future__ import annotations

import weakref

from torch import nn

from .analysis import MixedOp
from .descriptors import Ref
from .ir import Role, SupernetIR

__all__ = ["module_label", "candidate_name", "candidate_names", "value_name", "edge_of",
           "where"]


def _kernel(module: nn.Module) -> str:
    """``3x3`` (and `` d2`` when dilated): the largest kernel of a conv or pool inside
    ``module`` (an MBConv's depthwise kernel, not its 1x1 expansion)."""
    best: tuple[int, str] | None = None
    for sub in module.modules():
        size = getattr(sub, "kernel_size", None)
        if size is None:
            continue
        size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * 2
        text = "x".join(str(s) for s in size)
        dil = getattr(sub, "dilation", 1)
        dil = tuple(dil) if isinstance(dil, (tuple, list)) else (dil,)
        if any(d != 1 for d in dil):
            text += f" d{dil[0]}"
        area = 1
        for s in size:
            area *= s
        if best is None or area > best[0]:
            best = (area, text)
    return best[1] if best else ""


def module_label(module: nn.Module) -> str:
    """``SepConv 3x3``: the class (a ``Sequential``'s first child's) and its kernel."""
    head = module
    while isinstance(head, nn.Sequential) and len(head):
        head = head[0]
    kernel = _kernel(module)
    return f"{type(head).__name__} {kernel}" if kernel else type(head).__name__


def _common_prefix(paths: list[str]) -> list[str]:
    atoms = [p.split(".") for p in paths]
    prefix: list[str] = []
    for column in zip(*atoms):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return prefix


_LOOKUPS: weakref.WeakKeyDictionary[SupernetIR, dict[tuple[str, str], object]] = \
    weakref.WeakKeyDictionary()
"""Per IR: the model's submodules and their names by path.  why: every decision names its
candidates, thousands of lookups in all, and the model's module tree does not change while
it is compiled (passes register their modules in ``ir.modules``, not on the model)."""


def _lookups(ir: SupernetIR) -> dict[tuple[str, str], object]:
    got = _LOOKUPS.get(ir)
    if got is None:
        got = _LOOKUPS[ir] = {}
    return got


def _module(ir: SupernetIR, path: str) -> nn.Module | None:
    cache = _lookups(ir)
    key = ("module", path)
    if key not in cache:
        try:
            cache[key] = ir.root.get_submodule(path)
        except AttributeError:
            cache[key] = None
    return cache[key]


def _is_list(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _candidate_module(ir: SupernetIR, atoms: list[str]) -> list[str]:
    """The module holding ``atoms``'s path that is an item of a ModuleList/ModuleDict (the
    candidate itself), or ``atoms`` when there is none."""
    for k in range(len(atoms), 0, -1):
        if _is_list(_module(ir, ".".join(atoms[:k - 1]))):
            return atoms[:k]
    return atoms


def _modules_of(ir: SupernetIR, names) -> list[str]:
    """The modules ``names`` call, or whose kernels they read (a convolution ``kn`` made
    functional reads its module's weight)."""
    out = []
    for n in names:
        node = ir.node(n)
        if node.opcode == "call_module":
            out.append(node.target)
        elif node.notes.role is Role.KERNEL:
            source = _kernel_source(ir, n)
            if source is not None and "." in source:
                out.append(source.rsplit(".", 1)[0])
    return list(dict.fromkeys(out))


def _kernel_source(ir: SupernetIR, name: str, depth: int = 0) -> str | None:
    """The parameter a kernel node reads: itself (``get_attr``), or, through ``kn``'s
    ``normalize_kernels([...])[i]``, item ``i`` of the batch (kn batches every kernel of one
    shape into one call, so the branch holds the ``getitem``, not the parameter)."""
    node = ir.node(name)
    if node.opcode == "get_attr":
        return str(node.target)
    if depth < 8 and node.desc.op == "getitem" and isinstance(node.args[0], Ref) and \
            isinstance(node.args[1], int):
        batch = ir.node(node.args[0].name).args
        if batch and isinstance(batch[0], (list, tuple)) and node.args[1] < len(batch[0]) \
                and isinstance(batch[0][node.args[1]], Ref):
            return _kernel_source(ir, batch[0][node.args[1]].name, depth + 1)
    return None


def _name_at(ir: SupernetIR, path: str) -> str:
    """A module's name: its ModuleDict key, its attribute name with its label (``b (Conv2d
    3x3)``), or in a ModuleList its label."""
    cache = _lookups(ir)
    key = ("name", path)
    if key not in cache:
        cache[key] = _find_name_at(ir, path)
    return cache[key]


def _find_name_at(ir: SupernetIR, path: str) -> str:
    last = path.rsplit(".", 1)[-1]
    module = _module(ir, path)
    if last and not last.isdigit() and path:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if isinstance(_module(ir, parent), nn.ModuleDict) or module is None:
            return last
        return f"{last} ({module_label(module)})"
    return path if module is None else module_label(module)


def candidate_name(ir: SupernetIR, op: MixedOp, index: int) -> str:
    """The user's name for candidate ``index`` of ``op`` (see the module docstring)."""
    cand = op.candidates[index]
    if cand.kind == "zero":
        return "zero"
    modules = _modules_of(ir, cand.branch)
    if cand.kind == "identity" or not cand.branch:
        return "skip (identity)"
    if not modules:  # functional ops only
        first = ir.node(cand.branch[0])
        return first.desc.label().replace("\n", " ")
    prefix = _common_prefix(modules)
    # a candidate several candidates' modules make up (a group a pass combined): the
    # distinct items of the candidate list below the common prefix
    if len(set(modules)) > 1 and _is_list(_module(ir, ".".join(prefix))):
        below = {".".join(m.split(".")[:len(prefix) + 1]) for m in modules}
        if len(below) > 1:
            ordered = sorted(below, key=lambda p: [int(a) if a.isdigit() else 0
                                                   for a in p.split(".")])
            return "{" + ", ".join(_name_at(ir, p) for p in ordered) + "}"
    return _name_at(ir, ".".join(_candidate_module(ir, prefix)))


def candidate_names(ir: SupernetIR, op: MixedOp, indices=None) -> list[str]:
    """Names of ``op``'s candidates (``indices``: a subset); repeated names get ``[i]``."""
    indices = range(len(op.candidates)) if indices is None else indices
    every = [candidate_name(ir, op, i) for i in range(len(op.candidates))]
    return [every[i] if every.count(every[i]) == 1 else f"{every[i]} [{i}]" for i in indices]


def _terms(ir: SupernetIR, name: str, depth: int = 0) -> list[str]:
    """The leaves of a tree of adds, skipping literal zeros (``sum`` starts at 0)."""
    node = ir.node(name)
    if node.notes.mixed_op is None and node.desc.op == "add" and depth < 64 and \
            node.opcode == "call_function":
        out: list[str] = []
        for r in node.inputs:
            out += _terms(ir, r, depth + 1)
        return out
    return [name]


def value_name(ir: SupernetIR, name: str) -> str:
    """The user's name for the value node ``name`` (see the module docstring)."""
    node = ir.node(name)
    if node.opcode == "placeholder":
        return f"input {node.target}"
    if node.opcode == "call_module":
        module = _module(ir, str(node.target))
        return str(node.target) if module is None else \
            f"{node.target} ({type(module).__name__})"
    tag = node.notes.mixed_op
    if tag is not None and ir.users(name) and \
            all(ir.node(u).notes.mixed_op != tag for u in ir.users(name)):
        return tag  # the output of a mixed op
    terms = _terms(ir, name)
    if len(terms) > 1:
        return " + ".join(value_name(ir, t) for t in terms)
    where = node.module_path or "the model"
    return f"{node.desc.op} in {where}"


def edge_of(ir: SupernetIR, op: MixedOp) -> str:
    """The searchable edge ``op`` belongs to (``cells.0._ops.3``), also for a selection a
    pass nested inside it."""
    return ir.node(op.output).notes.mixed_op or op.name


def where(ir: SupernetIR, op: MixedOp) -> str:
    """``cells.0._ops.4 over cells.0._ops.0 + cells.0._ops.1``: the edge and what it reads."""
    return f"{edge_of(ir, op)} over {value_name(ir, op.input)}"
