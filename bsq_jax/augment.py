"""On-device augmentation (spec section 10): 4-pixel pad + random crop, flip.

The random draws are made for the whole global batch from a key that depends
only on (seed, epoch, step), and each device takes its slice, so a sample is
augmented the same way whatever the device count.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

PAD = 4


def draw(key: jax.Array, batch: int) -> Tuple[jax.Array, jax.Array]:
  """Crop offsets in [0, 2*PAD] (batch, 2) and flip flags (batch,)."""
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (batch, 2), 0, 2 * PAD + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (batch,))
  return offsets, flips


def crop_flip(images: jax.Array, offsets: jax.Array,
              flips: jax.Array) -> jax.Array:
  """Zero-pads by PAD, crops back to the input size at `offsets`, flips."""
  h, w = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))

  def one(img, off, flip):
    crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 NHWC -> float32, (x / 255 - mean) / std per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
