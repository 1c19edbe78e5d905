"""The CIFAR ResNet family, depth 6k+2 (spec section 8).

Module names follow the pytorch-classification ResNet that the paper's release
uses (conv1, bn1, layer1_0/conv1, layer2_0/downsample_conv, fc), so that a
PyTorch state_dict maps onto it name for name. Quantized: every 3x3
convolution (the stem included) and the final dense layer, weight and bias.
BatchNorm and the 1x1 shortcut convolutions stay float unless
`quantize_shortcut` is set.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from bsq_jax.layers import QConv, QDense, Quant, QuantAct


def check_depth(depth: int) -> int:
  """Blocks per stage for a CIFAR ResNet of this depth."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"model.depth: expected 6k+2 with k >= 1 (20, 32, 44, "
                     f"56, 110), got {depth!r}")
  return (depth - 2) // 6


def batch_norm(train: bool, axis_name: Optional[str], name: str) -> nn.Module:
  # PyTorch's defaults: momentum 0.1 (Flax counts 1 - 0.1), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name if train else None,
                      name=name)


class BasicBlock(nn.Module):
  """conv3x3-BN-act-q, conv3x3-BN, + shortcut, act-q (section 7)."""
  features: int
  strides: int
  quant: Quant
  act_bits: int
  axis_name: Optional[str] = None
  quantize_shortcut: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    act = lambda name: QuantAct(self.act_bits, self.axis_name, name=name)
    y = QConv(self.features, 3, self.quant, strides=self.strides,
              name="conv1")(x)
    y = act("act1")(batch_norm(train, self.axis_name, "bn1")(y))
    y = QConv(self.features, 3, self.quant, name="conv2")(y)
    y = batch_norm(train, self.axis_name, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = QConv(self.features, 1, self.quant, strides=self.strides,
                padding="VALID", quantized=self.quantize_shortcut,
                name="downsample_conv")(x)
      x = batch_norm(train, self.axis_name, "downsample_bn")(x)
    return act("act2")(y + x)


class CifarResNet(nn.Module):
  """ResNet-(6k+2) for 32x32 inputs: 16/32/64 channels, k blocks per stage."""
  depth: int = 20
  num_classes: int = 10
  act_bits: int = 4
  quant: Quant = Quant()
  axis_name: Optional[str] = None
  quantize_shortcut: bool = False
  width: int = 16  # stem channels; stages use width, 2*width, 4*width

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks = check_depth(self.depth)
    x = QConv(self.width, 3, self.quant, name="conv1")(x)
    x = nn.relu(batch_norm(train, self.axis_name, "bn1")(x))
    for stage in range(3):
      for b in range(blocks):
        x = BasicBlock(self.width * 2**stage,
                       2 if (stage > 0 and b == 0) else 1, self.quant,
                       self.act_bits, self.axis_name, self.quantize_shortcut,
                       name=f"layer{stage + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, self.quant, name="fc")(x)
