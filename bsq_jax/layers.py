"""Quantized Flax layers and activation quantizers (spec sections 2, 7, 10).

One layer definition serves three modes, chosen by a `Quant` context:
- ``float``:    plain float params, as ``nn.Conv`` / ``nn.Dense`` hold them;
- ``bsq``:      each quantized tensor is a `BitPlanes` param (planes + scale);
- ``finetune``: each quantized tensor is a `Levels` param (float c + scale) at
  the fixed precision the scheme gives.

The scheme maps a tensor's path ("layer1_0/conv1/kernel") to its precision.
It is static: a new scheme is a new model and one recompile. A scheme that
lacks a layer's entry is an error, never a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from bsq_jax import bitplanes as bp
from bsq_jax import conv

MODES = ("float", "bsq", "finetune")


@dataclasses.dataclass(frozen=True)
class Quant:
  """How every quantized layer of a model stores and uses its weights.

  mode: one of MODES.
  scheme: path -> bits; None means `default_bits` everywhere (used to build
    a fresh model, e.g. the 8-bit conversion target).
  default_bits: precision for layers when `scheme` is None.
  """
  mode: str = "float"
  scheme: Optional[FrozenDict] = None
  default_bits: int = 8

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
    if self.scheme is not None and not isinstance(self.scheme, FrozenDict):
      object.__setattr__(self, "scheme", FrozenDict(self.scheme))

  def bits(self, path: str) -> int:
    if self.scheme is None:
      return self.default_bits
    if path not in self.scheme:
      raise KeyError(f"scheme has no precision for layer {path!r}; "
                     f"it holds {sorted(self.scheme)}")
    return self.scheme[path]


def _planes_init(base_init: Callable, shape, bits: int) -> Callable:
  """A BitPlanes initializer: encode a freshly drawn float tensor."""
  return lambda key: bp.encode(base_init(key, shape, jnp.float32), bits, jnp)


def _levels_init(base_init: Callable, shape) -> Callable:
  def init(key):
    w = base_init(key, shape, jnp.float32)
    s = jnp.max(jnp.abs(w))
    return bp.Levels(c=w / jnp.where(s > 0, s, 1.0), scale=s)
  return init


def quantized_tensor(module: nn.Module, name: str, quant: Quant, shape,
                     init_fn: Callable, quantized: bool = True) -> jax.Array:
  """Declares param `name` of `module` in `quant.mode`; returns w_used."""
  if not quantized or quant.mode == "float":
    return module.param(name, init_fn, tuple(shape), jnp.float32)
  path = "/".join(module.path + (name,))
  n = quant.bits(path)
  if quant.mode == "bsq":
    planes = module.param(name, lambda k: _planes_init(init_fn, shape, n)(k))
    if planes.pos.shape != tuple(shape) + (n,):
      raise ValueError(f"{path}: planes have shape {planes.pos.shape}, the "
                       f"scheme expects {tuple(shape) + (n,)}")
    return bp.weight(planes)
  levels = module.param(name, lambda k: _levels_init(init_fn, shape)(k))
  return bp.level_weight(levels, n)


class QConv(nn.Module):
  """A 2-D convolution (NHWC, HWIO) whose kernel may be quantized."""
  features: int
  kernel_size: int
  quant: Quant
  strides: int = 1
  padding: Any = None  # None: k // 2 on every side, as PyTorch pads
  use_bias: bool = False
  quantized: bool = True
  kernel_init: Callable = nn.initializers.kaiming_normal()

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features)
    w = quantized_tensor(self, "kernel", self.quant, shape, self.kernel_init,
                         self.quantized)
    pad = self.padding if self.padding is not None else [(k // 2, k // 2)] * 2
    y = conv.conv2d(x, w, self.strides, pad)
    if self.use_bias:
      y = y + quantized_tensor(self, "bias", self.quant, (self.features,),
                               nn.initializers.zeros, self.quantized)
    return y


class QDense(nn.Module):
  """A dense layer whose kernel and bias may be quantized."""
  features: int
  quant: Quant
  use_bias: bool = True
  quantized: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1], self.features)
    w = quantized_tensor(self, "kernel", self.quant, shape, self.kernel_init,
                         self.quantized)
    y = x @ w
    if self.use_bias:
      y = y + quantized_tensor(self, "bias", self.quant, (self.features,),
                               nn.initializers.zeros, self.quantized)
    return y


# --------------------------------------------------------------------------
# Activations (section 7).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize_to_scale(x, s, k: int):
  """S * round(|x| K / S) / K * sign(x); gradient 1 for x, none for S."""
  safe = jnp.where(s > 0, s, 1.0)
  return jnp.sign(x) * jnp.round(jnp.abs(x) * k / safe) * safe / k


_quantize_to_scale.defvjp(
    lambda x, s, k: (_quantize_to_scale(x, s, k), s),
    lambda k, s, g: (g, jnp.zeros_like(s)))


def quantize_activation(x: jax.Array, act_bits: int,
                        axis_name: Optional[str]) -> jax.Array:
  """x_q = S * round(|x| K / S) / K * sign(x), S = max|x| over the global batch.

  The gradient passes straight through; S is a constant to it.
  """
  s = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))  # pmax has no derivative
  if axis_name is not None:
    s = jax.lax.pmax(s, axis_name)
  return _quantize_to_scale(x, s, bp.steps(act_bits))


class QuantAct(nn.Module):
  """The block activation: ReLU6 (>= 4 bits), PACT (<= 3 bits) or ReLU (32)."""
  act_bits: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    if self.act_bits == 32:
      return nn.relu(x)
    if self.act_bits >= 4:
      x = jnp.clip(x, 0.0, 6.0)
    else:
      clip = self.param("pact_alpha", nn.initializers.constant(10.0), ())
      # PACT: y = clip(x, 0, alpha); d y / d alpha = 1 where x >= alpha.
      x = nn.relu(x) - nn.relu(x - clip)
    return quantize_activation(x, self.act_bits, self.axis_name)


def check_act_bits(act_bits: int) -> None:
  if not (act_bits == 32 or 1 <= act_bits <= 16):
    raise ValueError(f"act_bits: expected 1..16 or 32 (float), got {act_bits}")


def freeze_scheme(scheme: Optional[Mapping[str, int]]) -> Optional[FrozenDict]:
  return None if scheme is None else FrozenDict(
      {k: int(v) for k, v in scheme.items()})
