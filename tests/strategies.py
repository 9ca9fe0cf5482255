"""Hypothesis strategies: random supernet cells built from random candidate chains.

A spec is plain data (hashable tuples), so failing examples print readably.  A candidate is
``identity``, ``zero`` or a chain of basic modules drawn from a small alphabet (so candidates
often share leading and trailing modules, as real search spaces do):

* ``("relu", form)`` with form module / functional / method,
* ``("conv", k, dilation, depthwise, bias)`` ("same" padding),
* ``("bn", affine)``,
* ``("maxpool",)``, ``("avgpool", count_include_pad)``,
* ``("expand", ratio)``: a 1x1 convolution to ``ratio * C`` channels; the modules after it
  work on that width until ``("project",)`` (or the chain's end) maps back to ``C``
  (MBConv's inverted bottleneck: :func:`mbconv` builds the whole block).

The stride of an edge applies to the first spatial module of each chain (a pool is prepended
when a chain has none).  A cell's mixed ops sum their candidates in one of three forms
(``sum``, ``stack``, ``slot``: NNI's stack with a zero slot for ``none`` appended), and with
``edge_norm`` the edges run in parallel, each on its own state, under their own
``BatchNorm(affine=False)``, summed with soft edge weights (PC-DARTS's edge normalization).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

RELU_FORMS = ("module", "functional", "method")


@dataclasses.dataclass(frozen=True)
class CellSpec:
    channels: int
    resolution: int
    strides: tuple[int, ...]                      # one per edge (mixed op)
    candidates: tuple[tuple[tuple, ...], ...]     # per edge: candidate chains (same count)
    alpha_scale: float
    seed: int
    form: str = "sum"                             # "sum", "stack" or "slot"
    edge_norm: bool = False

    @property
    def n_weights(self) -> int:
        """Architecture weights per edge: one per candidate, plus the zero slot."""
        return len(self.candidates[0]) + (self.form == "slot")


class FunctionalReLU(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x):
        return F.relu(x) if self.form == "functional" else x.relu()


class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


def _module(token: tuple, C: int, stride: int, base: int | None = None) -> nn.Module:
    """The module of ``token`` on ``C`` channels (``base``: the edge's width, for expand)."""
    kind = token[0]
    if kind == "relu":
        return nn.ReLU() if token[1] == "module" else FunctionalReLU(token[1])
    if kind == "conv":
        _, k, d, depthwise, bias = token
        return nn.Conv2d(C, C, k, stride=stride, padding=d * (k - 1) // 2, dilation=d,
                         groups=C if depthwise else 1, bias=bias)
    if kind == "expand":
        return nn.Conv2d(C, (base or C) * token[1], 1, bias=False)
    if kind == "project":
        return nn.Conv2d(C, base or C, 1, bias=False)
    if kind == "bn":
        return nn.BatchNorm2d(C, affine=token[1])
    if kind == "maxpool":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if kind == "avgpool":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=token[1])
    raise ValueError(token)


SPATIAL = ("conv", "maxpool", "avgpool")


def build_candidate(chain: tuple, C: int, stride: int) -> nn.Module:
    if chain == ("identity",):
        return nn.Identity() if stride == 1 else nn.AvgPool2d(3, stride, 1)
    if chain == ("zero",):
        return Zero(stride)
    tokens = list(chain)
    if stride != 1 and not any(t[0] in SPATIAL for t in tokens):
        tokens.insert(0, ("avgpool", True))
    mods, strided, width = [], False, C
    for t in tokens:
        s = stride if t[0] in SPATIAL and not strided else 1
        strided |= t[0] in SPATIAL
        mods.append(_module(t, width, s, C))
        if t[0] in ("expand", "project"):
            width = C * t[1] if t[0] == "expand" else C
    if width != C:  # MBConv's linear projection back to the edge's width
        mods.append(nn.Conv2d(width, C, 1, bias=False))
    return nn.Sequential(*mods)


def mbconv(ratio: int, k: int) -> tuple:
    """An MBConv chain: expand, BN, ReLU, depthwise kxk, BN, ReLU, projection, BN."""
    return (("expand", ratio), ("bn", True), ("relu", "module"), ("conv", k, 1, True, False),
            ("bn", True), ("relu", "module"), ("project",), ("bn", False))


class MixedOp(nn.Module):
    def __init__(self, C: int, chains, stride: int, form: str = "sum"):
        super().__init__()
        self._ops = nn.ModuleList(build_candidate(c, C, stride) for c in chains)
        self.form = form

    def forward(self, x, weights):
        if self.form == "sum":
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        outs = torch.stack([op(x) for op in self._ops])
        if self.form == "slot":
            outs = torch.cat([outs, torch.zeros_like(outs[:1])], 0)
        return (outs * weights.view(-1, 1, 1, 1, 1)).sum(0)


class RandomSupernet(nn.Module):
    """stem conv -> mixed ops in sequence (weights = softmax(alphas)) -> pool -> linear."""

    def __init__(self, spec: CellSpec, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(spec.seed)
        C = spec.channels
        self.resolution = spec.resolution
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.edges = nn.ModuleList(MixedOp(C, chains, s, spec.form)
                                   for chains, s in zip(spec.candidates, spec.strides))
        self.alphas = nn.Parameter(spec.alpha_scale * torch.randn(len(spec.strides),
                                                                  spec.n_weights))
        self.edge_norm = spec.edge_norm
        if spec.edge_norm:  # each edge reads its own state and has its own BatchNorm
            self.states = nn.ModuleList(nn.Conv2d(C, C, 1, bias=False) for _ in spec.strides)
            self.edge_bns = nn.ModuleList(nn.BatchNorm2d(C, affine=False)
                                          for _ in spec.strides)
            self.betas = nn.Parameter(torch.randn(len(spec.strides)))
        self.head = nn.Linear(C, num_classes)
        # give BatchNorm non-trivial statistics and affine parameters
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    nn.init.uniform_(m.weight, 0.5, 1.5)
                    nn.init.uniform_(m.bias, -0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        return self.cell(x, F.softmax(self.alphas, dim=-1))

    def cell(self, x, weights):
        h = self.stem(x)
        if self.edge_norm:
            b = F.softmax(self.betas, dim=-1)
            h = sum(b[i] * bn(edge(state(h), weights[i])) for i, (edge, state, bn) in
                    enumerate(zip(self.edges, self.states, self.edge_bns)))
        else:
            for i, edge in enumerate(self.edges):
                h = edge(h, weights[i])
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.resolution, self.resolution)


def tokens() -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("relu"), st.sampled_from(RELU_FORMS)),
        st.tuples(st.just("conv"), st.sampled_from((1, 3, 5)), st.sampled_from((1, 2)),
                  st.booleans(), st.booleans()),
        st.tuples(st.just("bn"), st.booleans()),
        st.tuples(st.just("maxpool")),
        st.tuples(st.just("avgpool"), st.booleans()),
    )


def chains(max_len: int = 4, widths: bool = False) -> st.SearchStrategy[tuple]:
    """Candidate chains; ``widths`` adds expand tokens and whole MBConv blocks of random
    expand ratio and kernel size (candidates whose inner tensors differ in width)."""
    token = st.one_of(tokens(), st.tuples(st.just("expand"), st.sampled_from((1, 2, 3)))) \
        if widths else tokens()
    options = [st.just(("identity",)), st.just(("zero",)),
               st.lists(token, min_size=1, max_size=max_len).map(tuple)]
    if widths:
        options.append(st.builds(mbconv, st.sampled_from((2, 3)), st.sampled_from((3, 5))))
    return st.one_of(*options)


@st.composite
def cell_specs(draw, max_edges: int = 2, max_candidates: int = 5,
               variants: bool = False) -> CellSpec:
    """Random cells; ``variants`` also draws widths (expand ratios, MBConv blocks), the
    stack and zero-slot forms and edge normalization."""
    n_edges = draw(st.integers(1, max_edges))
    n_cands = draw(st.integers(2, max_candidates))
    form = draw(st.sampled_from(("sum", "stack", "slot"))) if variants else "sum"
    edge_norm = variants and draw(st.booleans())
    strides = tuple(draw(st.sampled_from((1, 1, 2))) for _ in range(n_edges))
    if edge_norm:  # the edges' outputs are summed: one stride for all
        strides = (strides[0],) * n_edges
    return CellSpec(
        channels=draw(st.sampled_from((2, 4))),
        resolution=draw(st.sampled_from((6, 8))),
        strides=strides,
        candidates=tuple(tuple(draw(chains(widths=variants)) for _ in range(n_cands))
                         for _ in range(n_edges)),
        alpha_scale=draw(st.sampled_from((0.0, 1e-3, 1.0, 3.0))),
        seed=draw(st.integers(0, 2 ** 16)),
        form=form,
        edge_norm=edge_norm,
    )


def build(spec: CellSpec, supernet: type = RandomSupernet) -> tuple[nn.Module, torch.Tensor]:
    """The supernet of ``spec`` and an example input (seeded by the spec)."""
    model = supernet(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(2, 3, spec.resolution, spec.resolution, generator=gen)
    return model, x


class RandomSupernetWithWeights(RandomSupernet):
    """The same supernet, but its forward takes the architecture weights (GDAS's hard
    one-hot weights, a pruning mask, or any weights) instead of computing softmax(alpha)."""

    def forward(self, x, weights):
        return self.cell(x, weights)


def build_with_weights(spec: CellSpec) -> tuple[nn.Module, torch.Tensor]:
    return build(spec, RandomSupernetWithWeights)


def one_hot_rows(spec: CellSpec) -> list[torch.Tensor]:
    """Every vertex of the simplex for every edge at once: row k picks candidate k
    (modulo the row length) on each edge."""
    n_edges, n = len(spec.strides), spec.n_weights
    out = []
    for k in range(n):
        w = torch.zeros(n_edges, n)
        for e in range(n_edges):
            w[e, (k + e) % n] = 1.0
        out.append(w)
    return out


def affine_trailing(spec: CellSpec) -> CellSpec:
    """The spec with every chain ending in an affine module (BatchNorm without affine
    parameters, in eval mode it is y = (x - mean) / std): common children are then affine."""
    def fix(chain):
        if chain in (("identity",), ("zero",)):
            return chain
        return chain[:-1] + (("bn", False),) if chain[-1][0] != "bn" else chain
    return dataclasses.replace(spec, candidates=tuple(tuple(fix(c) for c in cands)
                                                      for cands in spec.candidates))


def equalize_batchnorm_statistics(model: nn.Module) -> None:
    """Give every BatchNorm the same running statistics (so equal BNs compute one function)."""
    gen = torch.Generator().manual_seed(7)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    C = bns[0].num_features
    mean = torch.empty(C).uniform_(-0.2, 0.2, generator=gen)
    var = torch.empty(C).uniform_(0.5, 1.5, generator=gen)
    with torch.no_grad():
        for m in bns:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


# --- linear candidates (for the merge pass) -----------------------------------------------

def _linear_module(token: tuple, C: int, stride: int, dims: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
    kind = token[0]
    if kind == "conv":
        _, k, d, grouping, bias = token
        groups = {"full": 1, "depthwise": C, "grouped": 2}[grouping]
        return conv(C, C, k, stride=stride, padding=d * (k - 1) // 2, dilation=d,
                    groups=groups, bias=bias)
    if kind == "sep":
        _, k, d, bias = token
        return nn.Sequential(conv(C, C, k, stride=stride, padding=d * (k - 1) // 2,
                                  dilation=d, groups=C, bias=False),
                             conv(C, C, 1, bias=bias))
    if kind == "identity":
        return nn.Identity() if stride == 1 else pool(3, stride, 1, count_include_pad=True)
    if kind == "zero":
        return Zero(stride) if dims == 2 else _ZeroNd(stride)
    if kind == "avgpool":
        return pool(3, stride, 1, count_include_pad=token[1])
    raise ValueError(token)


class _ZeroNd(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        index = (slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)
        return x[index].mul(0.)


def linear_tokens() -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("conv"), st.sampled_from((1, 3, 5)), st.sampled_from((1, 2)),
                  st.sampled_from(("full", "depthwise", "grouped")), st.booleans()),
        st.tuples(st.just("sep"), st.sampled_from((3, 5)), st.sampled_from((1, 2)),
                  st.booleans()),
        st.just(("identity",)), st.just(("zero",)), st.just(("avgpool", True)))


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    channels: int
    resolution: int
    stride: int
    dims: int
    candidates: tuple[tuple, ...]
    seed: int


class LinearSupernet(nn.Module):
    """stem conv -> one mixed op of linear candidates -> pool -> linear.  ``forward(x,
    weights=None)``: softmax(alpha) unless weights are given (one-hot vertices)."""

    def __init__(self, spec: LinearSpec, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(spec.seed)
        C, dims = spec.channels, spec.dims
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.stem = conv(3, C, 3, padding=1, bias=False)
        self._ops = nn.ModuleList(_linear_module(t, C, spec.stride, dims)
                                  for t in spec.candidates)
        self.alpha = nn.Parameter(torch.randn(len(spec.candidates)))
        self.head = nn.Linear(C, 3)
        self.to(dtype)

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x, weights=None):
        if weights is None:
            weights = F.softmax(self.alpha, dim=-1)
        h = self.stem(x)
        out = sum(w * op(h) for w, op in zip(weights, self._ops))
        return self.head(out.flatten(2).mean(-1))


@st.composite
def linear_specs(draw, dims: int = 2) -> LinearSpec:
    n = draw(st.integers(2, 6))
    stride = draw(st.sampled_from((1, 1, 2)))
    return LinearSpec(channels=draw(st.sampled_from((2, 4))),
                      resolution=draw(st.sampled_from((6, 8))), stride=stride, dims=dims,
                      candidates=tuple(draw(linear_tokens()) for _ in range(n)),
                      seed=draw(st.integers(0, 2 ** 16)))


def build_linear(spec: LinearSpec, dtype=torch.float32) -> tuple[LinearSupernet, torch.Tensor]:
    model = LinearSupernet(spec, dtype)
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn((2, 3) + (spec.resolution,) * spec.dims, generator=gen).to(dtype)
    return model, x
