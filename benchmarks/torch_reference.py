"""A PyTorch ResNet-20 train step, timed as a reference for benchmarks/speed.py.

    python benchmarks/torch_reference.py --mode bsq --steps 12

The same network as bsq_jax's CIFAR ResNet-20 (3x3 convs, BN, ReLU6 then
4-bit activation quantization with a straight-through gradient, 1x1 conv +
BN shortcuts), momentum SGD with weight decay, batch 128 of random 32x32x3
images. `bsq` rebuilds every quantized weight from 8 positive and 8 negative
bit planes each step, the way the authors' PyTorch release does; `float`
trains plain weights. torch is optional and never a requirement of the
package: speed.py runs this file in a child process when torch imports.
Prints `RESULT {json}` with the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

BITS = 8


class ActQ(torch.autograd.Function):
  """ReLU6'd x to 4 bits against max|x| of the batch; gradient passes."""

  @staticmethod
  def forward(ctx, x):  # pylint: disable=arguments-differ
    s = x.abs().max().clamp_min(1e-12)
    return torch.round(x * 15 / s) * s / 15

  @staticmethod
  def backward(ctx, g):  # pylint: disable=arguments-differ
    return g


class QConv(nn.Module):
  """Conv2d whose kernel is float, or rebuilt from bit planes (bsq)."""

  def __init__(self, cin, cout, k, stride, mode, quantized=True):
    super().__init__()
    self.stride, self.pad = stride, k // 2
    w = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
    self.bsq = mode == "bsq" and quantized
    if self.bsq:
      scale = w.abs().max()
      levels = torch.round(w.abs() / scale * (2**BITS - 1)).long()
      bits = torch.stack([(levels >> b) & 1 for b in range(BITS)]).float()
      self.pos = nn.Parameter(bits * (w >= 0))
      self.neg = nn.Parameter(bits * (w < 0))
      self.scale = nn.Parameter(scale)
      self.register_buffer("powers", 2.0 ** torch.arange(BITS).view(
          BITS, 1, 1, 1, 1))
    else:
      self.weight = nn.Parameter(w)

  def forward(self, x):
    if self.bsq:
      w = ((self.pos - self.neg) * self.powers).sum(0)
      w = w * self.scale / (2**BITS - 1)
    else:
      w = self.weight
    return nn.functional.conv2d(x, w, stride=self.stride, padding=self.pad)


class Block(nn.Module):

  def __init__(self, cin, cout, stride, mode):
    super().__init__()
    self.conv1 = QConv(cin, cout, 3, stride, mode)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = QConv(cout, cout, 3, 1, mode)
    self.bn2 = nn.BatchNorm2d(cout)
    self.short = None
    if stride != 1 or cin != cout:
      self.short = nn.Sequential(QConv(cin, cout, 1, stride, mode, False),
                                 nn.BatchNorm2d(cout))

  def forward(self, x):
    y = ActQ.apply(torch.clamp(self.bn1(self.conv1(x)), 0, 6))
    y = self.bn2(self.conv2(y))
    s = x if self.short is None else self.short(x)
    return ActQ.apply(torch.clamp(y + s, 0, 6))


class ResNet20(nn.Module):

  def __init__(self, mode):
    super().__init__()
    self.conv1 = QConv(3, 16, 3, 1, mode)
    self.bn1 = nn.BatchNorm2d(16)
    blocks, cin = [], 16
    for stage in range(3):
      cout = 16 * 2**stage
      for b in range(3):
        blocks.append(Block(cin, cout, 2 if stage and not b else 1, mode))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, 10)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    return self.fc(self.blocks(x).mean((2, 3)))


def time_steps(mode: str, steps: int, warmup: int = 2, batch: int = 128):
  """Seconds per train step, each step timed alone."""
  torch.manual_seed(0)
  model = ResNet20(mode)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                        weight_decay=1e-4)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=("float", "bsq"), default="float")
  p.add_argument("--steps", type=int, default=12)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  times = time_steps(args.mode, args.steps)
  print("RESULT " + json.dumps({
      "step_s": statistics.median(times), "steps": len(times),
      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
