"""The quantization context and the activation quantizer (spec sections 2, 7).

`Quant` says how a model's quantized tensors are stored and used:
- ``float``:    plain float params, as the model's own layers hold them;
- ``bsq``:      each quantized tensor is a `BitPlanes` param (planes + scale);
- ``finetune``: each quantized tensor is a `Levels` param (float c + scale) at
  the fixed precision the scheme gives.

The scheme maps a tensor's path ("layer1_0/conv1/kernel") to its precision.
It is static: a new scheme is a new model and one recompile. A scheme that
lacks a layer's entry is an error, never a silent default.
`bsq_jax.quantize.QuantizedModel` applies it to an unchanged Flax model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from bsq_jax import bitplanes as bp
from bsq_jax.config_check import ACT_BITS, act_bits_ok

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


PACT_INIT = 10.0  # the learnable clip's starting value (section 7)


def quantize_output(module: nn.Module, x: jax.Array, act_bits: int,
                    clip: str, axis_name: Optional[str]) -> jax.Array:
  """A module's output quantized to `act_bits` (section 7).

  clip "relu": ReLU6 for >= 4 bits, PACT for <= 3 (its clip a param
  `pact_alpha` of `module`); "none": the signed output as it is.
  """
  if clip == "relu":
    if act_bits >= 4:
      x = jnp.clip(x, 0.0, 6.0)
    else:
      alpha = module.param("pact_alpha", nn.initializers.constant(PACT_INIT),
                           ())
      # PACT: y = clip(x, 0, alpha); d y / d alpha = 1 where x >= alpha.
      x = nn.relu(x) - nn.relu(x - alpha)
  return quantize_activation(x, act_bits, axis_name)


class ReLU(nn.Module):
  """`nn.relu` as a named module: what an activation rule with clip "relu"
  replaces by the paper's activation (ReLU6 or PACT, then the quantizer).
  Compact, so that a PACT clip can be declared in it."""

  @nn.compact
  def __call__(self, x):
    return nn.relu(x)


def check_act_bits(act_bits: int) -> None:
  if not act_bits_ok(act_bits):
    raise ValueError(f"act_bits: expected {ACT_BITS}, got {act_bits}")


def freeze_scheme(scheme: Optional[Mapping[str, int]]) -> Optional[FrozenDict]:
  return None if scheme is None else FrozenDict(
      {k: int(v) for k, v in scheme.items()})
