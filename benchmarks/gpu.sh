#!/usr/bin/env bash
# The GPU run: a correctness check of compiled supernets on CUDA, then the paper-like
# benchmark (batch 64, C=16, 32x32; DARTS 8 cells, NB201 5 cells per stage, wide 5 cells)
# and the scaling curve.  Writes under $OUT (default benchmarks/results/cuda):
# check.txt, benchmarks-cuda.json, BENCHMARKS-cuda.md, scaling-cuda.png, log.txt.
# Works from a plain checkout: links passes/ and tools/ into the package if not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/cuda}"
mkdir -p "$OUT"
if ! python3 -c "import topo_compiler.passes" 2>/dev/null; then
    ln -sfn ../passes topo_compiler/passes
    ln -sfn ../tools topo_compiler/tools
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/check.txt"
# compiled == eager on CUDA: outputs and gradients, exact mode and the paper's mode vs the
# graph it rewrites; BatchNorm statistics and .to() stay shared
import torch
from topo_compiler import compile_supernet
from topo_compiler.spaces import build, default_input
print("torch", torch.__version__, torch.cuda.get_device_name())
torch.manual_seed(0)
for space, kw in (("nb201", dict(C=8, layers=1)), ("darts", dict(C=8, layers=3))):
    model = build(space, **kw).cuda()
    x = default_input(space, batch=8).cuda()
    for passes, exact in ((None, True), (("pms", "fms", "merge"), False)):
        compiled = compile_supernet(model, x, passes=passes, exact=exact)
        ref = compile_supernet(model, x, passes=("pms", "fms"), exact=exact) if not exact \
            else model
        outs, grads = [], []
        for m in (ref, compiled):
            model.zero_grad()
            out = m(x)
            out = out[-1] if isinstance(out, tuple) else out
            out.square().mean().backward()
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                    if p.grad is not None]))
        merged = "merge" in " ".join(d for s in compiled.report.stages for d in s.decisions)
        print(f"{space} exact={exact}: out max|diff| {(outs[0] - outs[1]).abs().max():.2e}, "
              f"grad max|diff| {(grads[0] - grads[1]).abs().max():.2e}, "
              f"counts {compiled.report.input.counts} -> {compiled.report.final.counts}, "
              f"merged={merged}, compile {sum(compiled.report.timings.values()):.2f}s")
PY
python3 -m benchmarks.run --device cuda --compiles 1 --steps 7 --warmup 2 \
    --batch 64 --C 16 --layers nb201=5,darts=8,wide=5 --resolution 32 \
    --configs traced,pms,fms,pms+fms,pms+fms+merge,all,pms+fms+merge[exact] \
    --no-peers --scaling --scaling-ops 4,10,16 --plot "$OUT/scaling-cuda.png" \
    --out "$OUT" --markdown "$OUT/BENCHMARKS-cuda.md" 2>&1 | tee -a "$OUT/log.txt"
