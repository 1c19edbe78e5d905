"""Inception-V3 in torchvision's layout, in plain Flax.

Module names mirror torchvision's ``Inception3`` (``Conv2d_1a_3x3``,
``Mixed_5b/branch1x1``, ``AuxLogits/conv0``, ``fc``; every BasicConv2d holds
``conv`` and ``bn``) so a state_dict maps name for name. Input 299x299 (the
auxiliary head needs at least that much: its 5x5 average pool and 5x5 conv
expect the 17x17 maps of ``Mixed_6e``).

What BSQ quantizes is said by `rules` (`from_config` wraps the model with
them in a `bsq_jax.quantize.QuantizedModel`). Weights: every convolution
(the stem included; 96 with the auxiliary head's two) and both
classifiers, ``fc`` and ``AuxLogits/fc`` (weight and bias). BatchNorm (eps
1e-3, as torchvision's BasicConv2d) stays float.

Activation quantization: Inception has no residual blocks, so section 7's
"inside every block, not the stem activation or the input" is read as: the
ReLU output of every BasicConv2d (its ``act`` module) is quantized to
`act_bits`, except that of the first convolution ``Conv2d_1a_3x3``, the
analogue of ResNet's single stem convolution whose activation section 7
leaves in float. Every other convolution therefore reads a quantized input
(or a max-pool of one; the average-pool branches see averages of quantized
values), the same coverage the bottleneck gets in ResNet-50. The image, and
the pooled features fed to the classifiers, are not quantized.
``act_bits = 32`` gives plain ReLUs, i.e. exactly torchvision's network.

Outputs: in train mode with `aux_logits`, ``(logits, aux_logits)``
(torchvision's reference trains on ``loss + 0.4 * aux_loss``); otherwise the
logits. Dropout (p = `dropout_rate`, before ``fc``) is active in train mode
and needs a ``"dropout"`` rng. The auxiliary head's parameters are created at
init whatever `train` is, so a model initialised in eval mode can train.
`transform_input` is torchvision's: it maps ImageNet-normalised input to the
(x - 0.5) / 0.5 normalisation that torchvision's pretrained weights expect.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsq_jax.layers import Quant, ReLU, check_act_bits
from bsq_jax.quantize import QuantizedModel
from bsq_jax.rules import ActRule, Rules

# torchvision's init: trunc_normal_(std=0.1), 0.01 for AuxLogits.conv1 and
# 0.001 for AuxLogits.fc.
_init = nn.initializers.truncated_normal


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias), BN (eps 1e-3), ReLU (the
  module ``act``, which the activation rules match)."""
  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)
  kernel_init: Callable = _init(0.1)

  @nn.compact
  def __call__(self, x, train: bool):
    ph, pw = _pair(self.padding)
    # XLA's own convolution and gradient, as this model always had: an
    # explicit op, which QuantizedModel leaves in place.
    x = nn.Conv(self.features, _pair(self.kernel_size),
                strides=(self.strides, self.strides),
                padding=[(ph, ph), (pw, pw)], use_bias=False,
                kernel_init=self.kernel_init,
                conv_general_dilated=jax.lax.conv_general_dilated,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-3, name="bn")(x)
    return ReLU(name="act")(x)


def _channels(c: int, width_mult: float) -> int:
  return max(1, int(round(c * width_mult)))


def _avg_pool_3x3(x):
  # F.avg_pool2d(x, 3, stride=1, padding=1), count_include_pad=True.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=True)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class _Block(nn.Module):
  """Base of the Inception blocks: a `conv(name, c, k, ...)` factory."""
  width_mult: float = 1.0

  def conv(self, name: str, c: int, k, train: bool, strides: int = 1,
           padding=0, **kw) -> Callable:
    m = BasicConv2d(_channels(c, self.width_mult), k, strides, padding,
                    name=name, **kw)
    return lambda x: m(x, train)


class InceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    c = lambda *a, **k: self.conv(*a, train=train, **k)
    b1 = c("branch1x1", 64, 1)(x)
    b5 = c("branch5x5_2", 64, 5, padding=2)(c("branch5x5_1", 48, 1)(x))
    b3 = c("branch3x3dbl_1", 64, 1)(x)
    b3 = c("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = c("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = c("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):

  @nn.compact
  def __call__(self, x, train: bool):
    c = lambda *a, **k: self.conv(*a, train=train, **k)
    b3 = c("branch3x3", 384, 3, strides=2)(x)
    bd = c("branch3x3dbl_1", 64, 1)(x)
    bd = c("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = c("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x, train: bool):
    c = lambda *a, **k: self.conv(*a, train=train, **k)
    c7 = self.channels_7x7
    b1 = c("branch1x1", 192, 1)(x)
    b7 = c("branch7x7_1", c7, 1)(x)
    b7 = c("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = c("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = c("branch7x7dbl_1", c7, 1)(x)
    bd = c("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = c("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = c("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = c("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = c("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):

  @nn.compact
  def __call__(self, x, train: bool):
    c = lambda *a, **k: self.conv(*a, train=train, **k)
    b3 = c("branch3x3_2", 320, 3, strides=2)(c("branch3x3_1", 192, 1)(x))
    b7 = c("branch7x7x3_1", 192, 1)(x)
    b7 = c("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = c("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = c("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):

  @nn.compact
  def __call__(self, x, train: bool):
    c = lambda *a, **k: self.conv(*a, train=train, **k)
    b1 = c("branch1x1", 320, 1)(x)
    b3 = c("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([c("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          c("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)],
                         axis=-1)
    bd = c("branch3x3dbl_1", 448, 1)(x)
    bd = c("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate(
        [c("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
         c("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    bp = c("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(_Block):
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool):
    if min(x.shape[1:3]) < 17:
      raise ValueError(f"Inception-V3's auxiliary head needs Mixed_6e maps of "
                       f"at least 17x17 (inputs >= 299x299), got "
                       f"{x.shape[1]}x{x.shape[2]}; use aux_logits=False "
                       f"for smaller inputs")
    x = nn.avg_pool(x, (5, 5), (3, 3), "VALID")
    x = self.conv("conv0", 128, 1, train)(x)
    x = self.conv("conv1", 768, 5, train, kernel_init=_init(0.01))(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_init(0.001), name="fc")(x)


class InceptionV3(nn.Module):
  """torchvision's Inception3. `width_mult` scales every conv's channels
  (1.0 is Inception-V3; smaller values are for tests)."""
  num_classes: int = 1000
  aux_logits: bool = True
  transform_input: bool = False
  dropout_rate: float = 0.5
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.transform_input:
      mean = jnp.asarray([0.485, 0.456, 0.406], x.dtype)
      std = jnp.asarray([0.229, 0.224, 0.225], x.dtype)
      x = x * (std / 0.5) + (mean - 0.5) / 0.5
    blk = dict(width_mult=self.width_mult)

    def conv(x, name, c, k, strides=1, padding=0):
      return BasicConv2d(_channels(c, self.width_mult), k, strides, padding,
                         name=name)(x, train)

    x = conv(x, "Conv2d_1a_3x3", 32, 3, strides=2)
    x = conv(x, "Conv2d_2a_3x3", 32, 3)
    x = conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = _max_pool_3x3_s2(x)
    x = conv(x, "Conv2d_3b_1x1", 80, 1)
    x = conv(x, "Conv2d_4a_3x3", 192, 3)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(**blk, pool_features=32, name="Mixed_5b")(x, train)
    x = InceptionA(**blk, pool_features=64, name="Mixed_5c")(x, train)
    x = InceptionA(**blk, pool_features=64, name="Mixed_5d")(x, train)
    x = InceptionB(**blk, name="Mixed_6a")(x, train)
    x = InceptionC(**blk, channels_7x7=128, name="Mixed_6b")(x, train)
    x = InceptionC(**blk, channels_7x7=160, name="Mixed_6c")(x, train)
    x = InceptionC(**blk, channels_7x7=160, name="Mixed_6d")(x, train)
    x = InceptionC(**blk, channels_7x7=192, name="Mixed_6e")(x, train)
    aux = None
    if self.aux_logits and (train or self.is_initializing()):
      aux = InceptionAux(**blk, num_classes=self.num_classes,
                         name="AuxLogits")(x, train)
    x = InceptionD(**blk, name="Mixed_7a")(x, train)
    x = InceptionE(**blk, name="Mixed_7b")(x, train)
    x = InceptionE(**blk, name="Mixed_7c")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=_init(0.1), name="fc")(x)
    return (logits, aux) if (train and self.aux_logits) else logits


def rules(act_bits: int) -> Rules:
  """Every conv and both classifiers (weight and bias); every BasicConv2d's
  activation but the stem's first, which stays float (module docstring)."""
  return Rules(acts=(ActRule(r"Conv2d_1a_3x3/act", 32),
                     ActRule(r".*/act", act_bits)), bias=True)


# --------------------------------------------------------------------------
# Model config (the "inception_v3" family of bsq_jax.models).


def from_config(cfg: Mapping[str, Any], quant: Quant,
                axis_name: Optional[str]) -> QuantizedModel:
  """Fields: act_bits; num_classes (1000); aux_logits (True); transform_input
  (True: torchvision's pretrained weights expect it, and it is harmless from
  scratch); dropout (0.5); image_size (299); for tests only, width_mult (1)."""
  check_act_bits(cfg["act_bits"])
  aux, size = cfg.get("aux_logits", True), cfg.get("image_size", 299)
  if aux and size < 299:
    raise ValueError(f"model.aux_logits: Inception-V3's auxiliary head needs "
                     f"image_size >= 299, got {size}; set aux_logits=False")
  model = InceptionV3(
      num_classes=cfg.get("num_classes", 1000), aux_logits=aux,
      transform_input=cfg.get("transform_input", True),
      dropout_rate=cfg.get("dropout", 0.5),
      width_mult=cfg.get("width_mult", 1.0))
  return QuantizedModel(model, rules(cfg["act_bits"]), quant, axis_name,
                        scale_grad="none")


def config_input_shape(cfg: Mapping[str, Any]):
  """(image_size, image_size, 3); image_size defaults to 299."""
  return (cfg.get("image_size", 299),) * 2 + (3,)
