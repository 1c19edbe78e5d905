"""The CIFAR ResNet family, depth 6k+2 (spec section 8), in plain Flax.

Module names follow the pytorch-classification ResNet that the paper's release
uses (conv1, bn1, layer1_0/conv1, layer2_0/downsample_conv, fc), so that a
PyTorch state_dict maps onto it name for name. `rules` says what BSQ
quantizes: every 3x3 convolution (the stem included) and the final dense
layer, weight and bias; the block activations (`act1`, `act2`) at
`act_bits`. BatchNorm and the 1x1 shortcut convolutions stay float unless
`quantize_shortcut` is set.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bsq_jax.layers import ReLU
from bsq_jax.models.common import batch_norm, conv, resnet_rules
from bsq_jax.rules import Rules


def check_depth(depth: int) -> int:
  """Blocks per stage for a CIFAR ResNet of this depth."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"model.depth: expected 6k+2 with k >= 1 (20, 32, 44, "
                     f"56, 110), got {depth!r}")
  return (depth - 2) // 6


class BasicBlock(nn.Module):
  """conv3x3-BN-act, conv3x3-BN, + shortcut, act (section 7)."""
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.features, 3, self.strides, name="conv1")(x)
    y = ReLU(name="act1")(batch_norm(train, "bn1")(y))
    y = conv(self.features, 3, name="conv2")(y)
    y = batch_norm(train, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, "VALID",
               name="downsample_conv")(x)
      x = batch_norm(train, "downsample_bn")(x)
    return ReLU(name="act2")(y + x)


class CifarResNet(nn.Module):
  """ResNet-(6k+2) for 32x32 inputs: 16/32/64 channels, k blocks per stage."""
  depth: int = 20
  num_classes: int = 10
  width: int = 16  # stem channels; stages use width, 2*width, 4*width

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks = check_depth(self.depth)
    x = conv(self.width, 3, name="conv1")(x)
    x = nn.relu(batch_norm(train, "bn1")(x))
    for stage in range(3):
      for b in range(blocks):
        x = BasicBlock(self.width * 2**stage,
                       2 if (stage > 0 and b == 0) else 1,
                       name=f"layer{stage + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def rules(act_bits: int, quantize_shortcut: bool = False) -> Rules:
  """The paper's choice for this family (spec sections 7, 8)."""
  return resnet_rules(r"layer\d+_\d+/act[12]", act_bits, quantize_shortcut)
