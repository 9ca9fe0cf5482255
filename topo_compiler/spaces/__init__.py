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
    """Build the supernet of search space ``name``, in training mode on the CPU.

    Args:
        name: one of :data:`SPACES`: ``"darts"`` (8 cells, 14 mixed ops each, 8
            candidates: 112 mixed ops), ``"nb201"`` (3 stages of ``layers`` cells,
            6 edges of 5 candidates each: 90 mixed ops), ``"wide"`` (Table VI: 16
            candidates per edge, 5 cells: 70 mixed ops).
        C: channels after the stem (the first cells' width; doubled at each reduction).
        layers: cells (darts, wide) or cells per stage (nb201); ``None`` is the
            space's default (8, 5, 5).
        num_classes: logits of the classifier.
        **kw: the space's own options (unknown ones raise ``TypeError``):
            ``edge=True`` builds one searchable edge of ``C`` channels instead of
            a network; darts and wide take ``pool_bn`` (BatchNorm after the pools,
            default True), ``steps``, ``multiplier``, ``stem_multiplier``; darts
            and nb201 take ``primitives`` (names from :data:`OPS`); wide takes
            ``num_ops`` (a sub-space of the first k candidates, Fig. 8).

    Returns:
        A :class:`SearchModel` taking ``(batch, 3, H, W)`` images (``H``, ``W``
        divisible by 4) and returning ``(batch, num_classes)`` logits; nb201
        returns ``(features, logits)`` with ``(batch, 4 * C)`` pooled features.
        With ``edge=True`` it takes and returns ``(batch, C, H, W)`` feature
        maps.  ``arch_parameters()`` are the alphas, ``weights()`` the other
        parameters; :func:`default_input` gives a matching example input.

    Raises:
        ValueError: an unknown space, ``layers < 1``, or an unknown primitive.
        TypeError: a keyword argument the space does not take.

    Example::

        model = spaces.build("darts", C=16, layers=8)
        x = spaces.default_input("darts", batch=64)       # (64, 3, 32, 32)
        compiled = compile_supernet(model, x)
    """
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
