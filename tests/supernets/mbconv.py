"""A ProxylessNAS / FBNet-style supernet: mixed ops over MBConv candidates.

Every searchable block chooses among inverted-residual convolutions (MBConv) that differ in
expand ratio and kernel size, plus ``identity`` and ``zero``::

    MBConv(e, k):  1x1 conv C -> eC, BN, ReLU6,  depthwise kxk conv, BN, ReLU6,
                   1x1 conv eC -> C, BN

With expand ratios 3 and 6 the hidden tensors of two candidates have different widths (3C vs
6C channels) although the modules between them (ReLU6, no parameters) are "the same": no pass
may join them.  Stride-1 blocks add a residual ``x + mixed(x)`` (not a mixed op).

Mixed ops by construction: ``len(strides)`` blocks; default 3.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MBInvertedConvLayer(nn.Module):

  def __init__(self, C_in, C_out, kernel_size, stride, expand_ratio):
    super().__init__()
    hidden = C_in * expand_ratio
    self.inverted_bottleneck = nn.Sequential(
      nn.Conv2d(C_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
    self.depth_conv = nn.Sequential(
      nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
      nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
    self.point_linear = nn.Sequential(
      nn.Conv2d(hidden, C_out, 1, 1, 0, bias=False), nn.BatchNorm2d(C_out))

  def forward(self, x):
    return self.point_linear(self.depth_conv(self.inverted_bottleneck(x)))


class ZeroLayer(nn.Module):

  def __init__(self, stride):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    if self.stride == 1:
      return x.mul(0.)
    return x[:, :, ::self.stride, ::self.stride].mul(0.)


CANDIDATES = [('mb', 3, 3), ('mb', 3, 6), ('mb', 5, 3), ('mb', 5, 6), ('identity',), ('zero',)]


def build_candidate(token, C, stride):
  if token[0] == 'mb':
    return MBInvertedConvLayer(C, C, token[1], stride, token[2])
  if token[0] == 'identity':
    return nn.Identity() if stride == 1 else nn.AvgPool2d(3, stride, 1)
  return ZeroLayer(stride)


class MixedEdge(nn.Module):

  def __init__(self, C, stride, candidates=CANDIDATES):
    super().__init__()
    self.candidate_ops = nn.ModuleList(build_candidate(t, C, stride) for t in candidates)
    self.AP_path_alpha = nn.Parameter(1e-3 * torch.randn(len(candidates)))

  def forward(self, x):
    probs = F.softmax(self.AP_path_alpha, dim=0)
    return sum(probs[i] * op(x) for i, op in enumerate(self.candidate_ops))


class Block(nn.Module):

  def __init__(self, C, stride, candidates=CANDIDATES):
    super().__init__()
    self.mobile_inverted_conv = MixedEdge(C, stride, candidates)
    self.stride = stride

  def forward(self, x):
    out = self.mobile_inverted_conv(x)
    return out + x if self.stride == 1 else out


class SuperProxylessNAS(nn.Module):

  def __init__(self, C=8, strides=(1, 2, 1), num_classes=10, candidates=CANDIDATES):
    super().__init__()
    self.first_conv = nn.Sequential(nn.Conv2d(3, C, 3, 1, 1, bias=False), nn.BatchNorm2d(C),
                                    nn.ReLU6(inplace=True))
    self.blocks = nn.ModuleList(Block(C, s, candidates) for s in strides)
    self.classifier = nn.Linear(C, num_classes)

  def forward(self, x):
    x = self.first_conv(x)
    for block in self.blocks:
      x = block(x)
    return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

  def arch_parameters(self):
    return [b.mobile_inverted_conv.AP_path_alpha for b in self.blocks]


C = 8
STRIDES = (1, 2, 1)
INPUT_HW = 16
NUM_MIXED_OPS = len(STRIDES)


def build(C=C, strides=STRIDES):
  return SuperProxylessNAS(C, strides)


def example_inputs(batch_size=2):
  return (torch.randn(batch_size, 3, INPUT_HW, INPUT_HW),)


def get_alphas(model):
  return model.arch_parameters()
