"""topo-compiler: a torch.fx graph compiler that makes one-shot NAS supernets cheaper to search.

The first public implementation of TopoNAS (topological simplification of searchable paths):
``compile_supernet(model, example_inputs)`` traces a supernet, finds its mixed ops, shares
modules among candidates (PMS, FMS), merges linear candidates into one convolution with
kernel normalization, and regenerates an fx ``GraphModule`` that trains with the same
parameters and optimizers.
"""

from .analysis import Candidate, MixedOp, find_mixed_ops
from .api import AlreadyCompiledWarning, NoMixedOpWarning, compile_supernet
from .ir import IRVerificationError, SupernetIR
from .lift import lift
from .lower import CompiledSupernet, lower
from .report import CompileReport, ModuleCounts, count_modules
from .tracer import TraceError, trace_supernet

__all__ = [
    "compile_supernet", "CompiledSupernet", "CompileReport", "ModuleCounts", "TraceError",
    "NoMixedOpWarning", "AlreadyCompiledWarning", "IRVerificationError", "trace_supernet",
    "lift", "lower", "SupernetIR", "MixedOp", "Candidate", "find_mixed_ops", "count_modules",
]

__version__ = "0.1.0"
