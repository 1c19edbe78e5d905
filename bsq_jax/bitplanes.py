"""Bit-plane arithmetic for one quantized tensor (BSQ_SPEC.md sections 2-4, 6).

A quantized tensor is held as two stacks of continuous bit planes, ``pos`` and
``neg`` (shape ``w.shape + (n,)``, plane 0 = MSB), and one float ``scale``.
Its precision ``n`` is the length of the planes' last axis and nothing else:
no second copy of it exists that could disagree.

``weight`` and ``group_lasso`` are traced JAX functions used inside the train
step; ``encode``, ``encode_levels`` and ``requantize`` run on the host between
epochs and use numpy.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


class BitPlanes(NamedTuple):
  """One BSQ-mode tensor: continuous planes in [0, 2] and a scale."""
  pos: Array    # w.shape + (n,), MSB first
  neg: Array    # w.shape + (n,)
  scale: Array  # scalar

  @property
  def bits(self) -> int:
    return self.pos.shape[-1]


class Levels(NamedTuple):
  """One finetune-mode tensor (spec section 10 step 5): float c in [-1, 1]."""
  c: Array      # w.shape; the forward pass uses scale * Q_n(clip(c, -1, 1))
  scale: Array  # scalar


def steps(n: int) -> int:
  """K(n) = 2**n - 1, the number of positive levels at precision n."""
  return 2**n - 1


def _place_values(n: int, xp=jnp) -> Array:
  """2**(n-1-b) / K(n) for b = 0..n-1: plane b's share of the unscaled weight."""
  return xp.asarray([2.0**(n - 1 - b) / steps(n) for b in range(n)],
                    dtype=xp.float32)


def unscaled(planes: BitPlanes, xp=jnp) -> Array:
  """c = sum_b (pos_b - neg_b) * 2**(n-1-b) / K(n), without any clip."""
  n = planes.pos.shape[-1]
  diff = xp.asarray(planes.pos) - xp.asarray(planes.neg)
  return xp.tensordot(diff, _place_values(n, xp), axes=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_ste(x: Array, n: int) -> Array:
  """Q_n(clip(x, -1, 1)) with a straight-through gradient (d/dx = 1)."""
  k = steps(n)
  x = jnp.clip(x, -1.0, 1.0)
  return jnp.sign(x) * jnp.round(jnp.abs(x) * k) / k


def _quantize_fwd(x, n):
  return quantize_ste(x, n), None


def _quantize_bwd(n, _, g):
  del n
  return (g,)


quantize_ste.defvjp(_quantize_fwd, _quantize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: Array, factor: float) -> Array:
  """x itself, with its gradient multiplied by `factor`."""
  return x


scale_gradient.defvjp(lambda x, factor: (x, None),
                      lambda factor, _, g: (g * factor,))


def lsq_factor(size: int, n: int) -> float:
  """LSQ's step-size gradient scale (Esser et al., ICLR 2020), 1/sqrt(m K(n)).

  A tensor's scale gets the sum of m per-weight gradients, so without it
  one scalar of a large layer moves as far as the whole layer in one step
  (a dense layer of 800k weights took its scale from 0.12 to 84 in two
  steps at lr 0.1).
  """
  return 1.0 / float(np.sqrt(max(size, 1) * max(steps(n), 1)))


def _zero_weight(shape, dtype, scale: Array) -> Array:
  """A precision-0 tensor's weight: +0 everywhere, zero gradient.

  Made from an iota times zero, not as `zeros * scale`: XLA turns that into
  the broadcast of one scalar, and XLA:CPU's YNNPACK fusion (jaxlib 0.10.2)
  of a reduction and then a dot with such a broadcast operand (a global
  average pool into a 0-bit dense layer) computes garbage, NaN or 1e30
  logits that differ from call to call. An iota is no broadcast, and XLA
  does not fold a float x * 0 (x could be NaN), so the dot gets an array.
  """
  size = int(np.prod(shape))
  iota = jnp.arange(size, dtype=jnp.float32)  # finite: size < 3e38
  return (iota * 0.0).reshape(shape).astype(dtype) * scale


def _scaled(scale: Array, c: Array, n: int) -> Array:
  if n == 0:  # precision 0: the layer is all zero (and has zero gradient)
    return _zero_weight(jnp.shape(c), jnp.result_type(c), scale)
  return scale * quantize_ste(c, n)


def weight(planes: BitPlanes) -> Array:
  """The weight the forward pass uses: s * Q_n(clip(c, -1, 1)) (section 2)."""
  n = planes.pos.shape[-1]
  if n == 0:
    return _zero_weight(planes.pos.shape[:-1], jnp.float32, planes.scale)
  return _scaled(planes.scale, unscaled(planes), n)


def level_weight(levels: Levels, n: int) -> Array:
  """The finetune-mode weight at fixed precision n (section 10, step 5)."""
  return _scaled(levels.scale, jnp.asarray(levels.c), n)


def group_lasso(planes: BitPlanes) -> Array:
  """sum_b sqrt(1e-8 + sum pos_b^2 + sum neg_b^2) (section 4, no m*n factor)."""
  sum_axes = tuple(range(planes.pos.ndim - 1))
  per_bit = (jnp.sum(jnp.square(planes.pos), axis=sum_axes) +
             jnp.sum(jnp.square(planes.neg), axis=sum_axes))
  return jnp.sum(jnp.sqrt(1e-8 + per_bit))


# --------------------------------------------------------------------------
# Host side (numpy): conversion and re-quantization.


def _to_planes(q: Array, n: int, xp=np) -> Array:
  """Non-negative integers -> binary planes, shape q.shape + (n,), MSB first."""
  q = q.astype(xp.int32)
  shifts = xp.arange(n - 1, -1, -1, dtype=xp.int32)
  return ((q[..., None] >> shifts) & 1).astype(xp.float32)


def _from_integers(q_pos, q_neg, n: int, scale, xp=np) -> BitPlanes:
  return BitPlanes(pos=_to_planes(q_pos, n, xp), neg=_to_planes(q_neg, n, xp),
                   scale=xp.asarray(scale, xp.float32))


def encode(w: Array, bits: int, xp=np) -> BitPlanes:
  """Float weight -> binary planes at `bits` bits with s = max|w| (section 3).

  Host-side numpy by default; `xp=jnp` traces it (used by layer init).
  """
  w = xp.asarray(w, xp.float32)
  s = xp.max(xp.abs(w)) if w.size else xp.float32(0)
  safe = xp.where(s > 0, s, 1.0)  # s == 0: w is all zero, so are the planes
  k = steps(bits)
  q_pos = xp.round(xp.maximum(w, 0) * k / safe)
  q_neg = xp.round(xp.maximum(-w, 0) * k / safe)
  return _from_integers(q_pos, q_neg, bits, s, xp)


def encode_levels(c: Array, bits: int, scale: Array) -> BitPlanes:
  """Finetuned c -> binary planes, keeping the scale (section 10 step 5)."""
  c = np.clip(np.asarray(c, np.float32), -1.0, 1.0)
  k = steps(bits)
  return _from_integers(np.round(np.maximum(c, 0) * k),
                        np.round(np.maximum(-c, 0) * k), bits, scale)


def integers(planes: BitPlanes) -> np.ndarray:
  """Signed integers q_pos - q_neg of binary planes (q / K(n) = c)."""
  n = planes.pos.shape[-1]
  if n == 0:
    return np.zeros(np.shape(planes.pos)[:-1], np.int64)
  c = unscaled(planes, np).astype(np.float64)
  return np.round(c * steps(n)).astype(np.int64)


def requantize(planes: BitPlanes, max_bits: int = 8) -> BitPlanes:
  """Section 6 steps 1-4: round to levels, maybe grow, drop zero planes."""
  n = planes.pos.shape[-1]
  if n == 0:
    return planes
  s = float(np.asarray(planes.scale))
  c = unscaled(planes, np)
  k = steps(n)
  q_pos = np.round(np.maximum(c, 0) * k)
  q_neg = np.round(np.maximum(-c, 0) * k)
  if n >= max_bits:
    q_pos, q_neg = np.minimum(q_pos, k), np.minimum(q_neg, k)
  elif max(q_pos.max(initial=0), q_neg.max(initial=0)) > k:
    s *= steps(n + 1) / k
    n += 1
  q_pos, q_neg = q_pos.astype(np.int64), q_neg.astype(np.int64)
  n_before = n
  # Step 2: an all-zero MSB plane is q < 2**(n-1) everywhere.
  top = np.maximum(q_pos, q_neg).max(initial=0)
  while n > 1 and top < 2**(n - 1):
    n -= 1
  # Step 3: an all-zero LSB plane is every q even; halving keeps s * q.
  while n > 1 and not np.any((q_pos | q_neg) & 1):
    q_pos, q_neg, s, n = q_pos >> 1, q_neg >> 1, s * 2.0, n - 1
  s *= steps(n) / steps(n_before)
  return _from_integers(q_pos, q_neg, n, s)
