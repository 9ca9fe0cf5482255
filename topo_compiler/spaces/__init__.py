"""Built-in one-shot NAS search spaces, as plain PyTorch supernets.

* ``"darts"``: the DARTS CIFAR search network (quark0/darts), see
  :mod:`~topo_compiler.spaces.darts`;
* ``"nb201"``: the NAS-Bench-201 DARTS search network (AutoDL-Projects
  ``TinyNetworkDarts``), see :mod:`~topo_compiler.spaces.nb201`;
* ``"wide"``: the 16-candidate DARTS space of the TopoNAS paper's Table VI /
  Fig. 8, see :mod:`~topo_compiler.spaces.wide`.

Every built model has ``arch_parameters()`` (the alpha ``nn.Parameter``\\ s),
``weights()`` (all other parameters), ``genotype()``, ``primitives`` and
``num_mixed_ops``; the softmax over the alphas is taken inside ``forward``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from . import darts, nb201, wide
from .darts import Genotype
from .ops import OPS, SearchModel, SingleEdgeModel

__all__ = [
    "SPACES", "build", "default_input", "OPS", "Genotype", "SearchModel", "SingleEdgeModel",
    "darts", "nb201", "wide",
]

_BUILDERS: Dict[str, Callable[..., SearchModel]] = {
    "darts": darts.build,
    "nb201": nb201.build,
    "wide": wide.build,
}

#: Names accepted by :func:`build`.
SPACES = tuple(_BUILDERS)


def _builder(name: str, kw: dict) -> Callable[..., SearchModel]:
    """Look up a space's builder and check the extra keyword arguments."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown search space {name!r}; known spaces: {', '.join(SPACES)}")
    builder = _BUILDERS[name]
    accepted = [p.name for p in inspect.signature(builder).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {', '.join(unknown)} for search space "
                        f"{name!r}; accepted: {', '.join(accepted)}")
    return builder


def build(name: str, C: int = 16, layers: Optional[int] = None, num_classes: int = 10,
          **kw) -> nn.Module:
    """Build the search space ``name`` (one of :data:`SPACES`) with ``C``
    initial channels; ``layers=None`` uses the space's default (darts 8,
    nb201 5 cells per stage, wide 5).  Extra keyword arguments are those of
    the space's own ``build`` (e.g. ``edge=True`` for a single searchable edge);
    unknown ones raise ``TypeError``."""
    return _builder(name, kw)(C, layers, num_classes, **kw)


def default_input(name: str, batch: int = 2, resolution: Optional[int] = None,
                  **kw) -> torch.Tensor:
    """A random input for ``build(name, **kw)``: ``(batch, 3, r, r)`` images,
    or ``(batch, C, r, r)`` features when ``edge=True``, with ``r`` =
    ``resolution`` (default 32).  ``kw`` takes the same arguments as
    :func:`build`; only ``C`` and ``edge`` affect the shape.  Full networks
    need ``r`` divisible by 4 (two stride-2 reductions on even sizes)."""
    C = kw.pop("C", 16)
    kw.pop("layers", None)
    kw.pop("num_classes", None)
    _builder(name, kw)
    r = 32 if resolution is None else resolution
    if kw.get("edge", False):
        return torch.randn(batch, C, r, r)
    if r % 4:
        raise ValueError(f"resolution must be divisible by 4 for a full network, got {r}")
    return torch.randn(batch, 3, r, r)
