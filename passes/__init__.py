"""The rewrite passes of topo-compiler, one module per pass (installed as ``topo_compiler.passes``).

The paper's pipeline, in order (section 3.3, Alg. 1 and section 3.4-3.5):

===========================  =========  ====================================================
module                       name       rewrite
===========================  =========  ====================================================
partial_module_sharing       ``pms``    partial module sharing: siblings, common children
floating_module_sharing      ``fms``    floating module sharing
kernel_normalization         ``kn``     kernel normalization of linear candidates' kernels
reparameterization           ``merge``  linear candidates -> one convolution (cost model)
weight_folding               ``fold``   ``w * conv(z)`` -> ``conv(z, w K)``, ``w * bn(u)`` ->
                                        BatchNorm with its affine transform scaled
===========================  =========  ====================================================

Building blocks the passes share, which are not passes (no pass file imports another pass
file): ``mixed_op_driver`` (match every mixed op, rewrite the outermost), ``selection``
(cascaded selections, Eq. 7-8), ``linear_candidates`` (linear candidates and the kernels
built from them), ``merge_cost`` (the merge cost model).  The functions compiled graphs call
live in :mod:`topo_compiler.runtime`.

``pms`` and ``fms`` repeat to a fixed point; ``kn``, ``merge`` and ``fold`` run once after
them.  ``kn`` runs before ``merge`` and ``fold`` so that which kernels it normalizes, hence
the function, does not depend on their memory decisions (see
:mod:`~topo_compiler.passes.kernel_normalization`).  Naming ``merge`` also runs ``fold``
(:data:`IMPLIED`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from topo_compiler.pass_manager import FixedPoint, Pass

__all__ = ["PIPELINE", "PASSES", "IMPLIED", "build_pipeline", "normalize_names"]

PIPELINE: tuple[str, ...] = ("pms", "fms", "kn", "merge", "fold")
"""Every pass name, in the order the pipeline runs them."""

IMPLIED: dict[str, tuple[str, ...]] = {"merge": ("fold",)}
"""Passes a name brings along: ``merge`` folded weights itself before ``fold`` became a pass
of its own, so ``passes=("merge",)`` keeps running both (each with its own report stage)."""

PASSES: dict[str, type[Pass]] = {}
"""Pass name -> pass class, for the passes this version implements."""

_SHARING = ("pms", "fms")


def normalize_names(names: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate pass names; return them and the passes they imply (:data:`IMPLIED`) in
    pipeline order (default: the whole pipeline)."""
    if names is None:
        names = PIPELINE
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or n not in PIPELINE]
    if bad:
        raise ValueError(f"unknown pass name(s) {bad!r}; the pipeline's passes are "
                         f"{', '.join(PIPELINE)} (passes=() runs none)")
    names += [implied for n in names for implied in IMPLIED.get(n, ())]
    missing = [n for n in names if n not in PASSES]
    if missing:
        raise NotImplementedError(
            f"pass(es) {', '.join(missing)} are not implemented in this version of "
            f"topo-compiler; available: {', '.join(PASSES) or 'none'}")
    return tuple(n for n in PIPELINE if n in names)


def build_pipeline(names: Sequence[str] | str | None,
                   options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> list[Pass | FixedPoint]:
    """The pass objects for ``names``: sharing passes as one fixed-point group, then the rest.

    ``options`` maps a pass name to the keyword arguments of its class (its dataclass
    fields), e.g. ``{"merge": {"device": "cuda"}}``.  Every pass object is made here, so an
    unknown option or a bad value raises before any pass runs.
    """
    names = normalize_names(names)
    options = dict(options or {})
    unknown = [n for n in options if n not in names]
    if unknown:
        raise ValueError(f"pass_options for {unknown} but those passes are not run "
                         f"(passes: {', '.join(names) or 'none'})")

    def make(name: str) -> Pass:
        cls = PASSES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = [k for k in options.get(name, {}) if k not in fields]
        if bad:
            raise TypeError(f"pass {name!r} has no option(s) {bad}; its options are "
                            f"{sorted(fields) or 'none'}")
        return cls(**options.get(name, {}))

    pipeline: list[Pass | FixedPoint] = []
    sharing = tuple(make(n) for n in names if n in _SHARING)
    if sharing:
        pipeline.append(FixedPoint(sharing))
    pipeline.extend(make(n) for n in names if n not in _SHARING)
    return pipeline


def _register() -> None:
    from topo_compiler.passes.floating_module_sharing import FloatingModuleSharing
    from topo_compiler.passes.kernel_normalization import KernelNormalization
    from topo_compiler.passes.partial_module_sharing import PartialModuleSharing
    from topo_compiler.passes.reparameterization import Reparameterization
    from topo_compiler.passes.weight_folding import WeightFolding

    for cls in (PartialModuleSharing, FloatingModuleSharing, Reparameterization,
                WeightFolding, KernelNormalization):
        PASSES[cls.name] = cls


_register()
