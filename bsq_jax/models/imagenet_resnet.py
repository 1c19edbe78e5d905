"""ImageNet ResNet-50 in torchvision's layout (v1.5), in plain Flax.

Module names mirror torchvision's so that a state_dict maps name for name:
``conv1``/``bn1`` (stem), ``layer{1..4}_{i}/conv{1,2,3}``, ``.../bn{1,2,3}``,
``.../downsample_conv`` and ``.../downsample_bn`` (torch ``downsample.0`` and
``downsample.1``), ``fc``. v1.5: the stride of a stage sits in the 3x3 conv
of its first bottleneck, not in the first 1x1.

What BSQ quantizes is said by `rules`. Weights: every convolution (the 7x7
stem included) and ``fc`` (weight and bias). The 1x1 downsample convolutions are quantized too when
`quantize_shortcut` is set (the ImageNet default). BatchNorm stays float.

Activation quantization (spec section 7, by analogy with the CIFAR basic
block): inside every bottleneck, the output of each of its three activations
is quantized to `act_bits` -- after bn1 (``act1``), after bn2 (``act2``) and
the block output after the residual sum (``act3``). So every 3x3 and the
second 1x1 of a block see quantized inputs, and so does the next block. The
stem activation (after ``bn1``, before the max-pool) and the network input are
not quantized, as in section 7; nor are the pooled features fed to ``fc``
(they are an average of quantized block outputs). ``act_bits = 32`` gives
plain ReLUs, i.e. exactly torchvision's network.

"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bsq_jax.layers import Quant, ReLU, check_act_bits
from bsq_jax.models.common import batch_norm, conv, resnet_rules
from bsq_jax.quantize import QuantizedModel
from bsq_jax.rules import Rules

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

RESNET50_STAGES = (3, 4, 6, 3)


def _conv(features: int, k: int, strides: int, name: str, padding=None):
  return conv(features, k, strides, padding, _conv_init, name)


class Bottleneck(nn.Module):
  """1x1 - 3x3 (strided) - 1x1 (x4 channels), each with BN; act after each."""
  planes: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: batch_norm(train, name)
    y = ReLU(name="act1")(bn("bn1")(_conv(self.planes, 1, 1, "conv1")(x)))
    y = ReLU(name="act2")(bn("bn2")(_conv(self.planes, 3, self.strides,
                                          "conv2")(y)))
    y = bn("bn3")(_conv(self.planes * 4, 1, 1, "conv3")(y))
    if self.strides != 1 or x.shape[-1] != self.planes * 4:
      x = _conv(self.planes * 4, 1, self.strides, "downsample_conv",
                "VALID")(x)
      x = bn("downsample_bn")(x)
    return ReLU(name="act3")(y + x)


class ImageNetResNet(nn.Module):
  """torchvision's ResNet with bottlenecks; the defaults give ResNet-50.

  `width` (stem channels; stage i uses width * 2**i planes) and `stage_sizes`
  exist so tests can build a small network of the same structure.
  """
  num_classes: int = 1000
  width: int = 64
  stage_sizes: Sequence[int] = RESNET50_STAGES

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _conv(self.width, 7, 2, "conv1")(x)
    x = nn.relu(batch_norm(train, "bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = Bottleneck(self.width * 2**stage,
                       2 if (stage > 0 and b == 0) else 1,
                       name=f"layer{stage + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_dense_init, name="fc")(x)


def rules(act_bits: int, quantize_shortcut: bool = True) -> Rules:
  """Every conv and fc (weight and bias); the three block activations."""
  return resnet_rules(r"layer\d+_\d+/act[123]", act_bits, quantize_shortcut)


# --------------------------------------------------------------------------
# Model config (the "resnet50" family of bsq_jax.models).


def from_config(cfg: Mapping[str, Any], quant: Quant,
                axis_name: Optional[str]) -> QuantizedModel:
  """Fields: act_bits; num_classes (1000); quantize_shortcut (True); for
  tests only, width (64) and stage_sizes ([3, 4, 6, 3])."""
  check_act_bits(cfg["act_bits"])
  model = ImageNetResNet(
      num_classes=cfg.get("num_classes", 1000), width=cfg.get("width", 64),
      stage_sizes=tuple(cfg.get("stage_sizes", RESNET50_STAGES)))
  return QuantizedModel(
      model, rules(cfg["act_bits"], cfg.get("quantize_shortcut", True)),
      quant, axis_name, scale_grad="none")


def config_input_shape(cfg: Mapping[str, Any]):
  """(image_size, image_size, 3); image_size defaults to 224."""
  return (cfg.get("image_size", 224),) * 2 + (3,)
