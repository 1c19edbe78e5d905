"""A deterministic, learnable toy image problem for smoke runs and tests.

Each class has a fixed random template: an 8x8xC uint8 image upsampled to
32x32 by 4x4 blocks (smooth, so small convnets pick it up). A sample of class
k is the blend

    x = (1 - noise) * template[k] + noise * u,   u ~ uniform uint8 per pixel

computed in integers as floor(template * (256 - k) / 256) + floor(u * k / 256)
with k = round(256 * noise): the sum stays in 0..255, and a few thousand
images take a few tens of milliseconds (no float pass over the images).
Labels are balanced (n // K or n // K + 1 per class) and shuffled.

Everything follows from `seed`: templates, train and test come from three
independent child streams of `np.random.SeedSequence(seed)`, so the train
set does not change when the test size does, and vice versa.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bsq_jax.data import DataError, Dataset, get, get_int

SIZE = 32
BLOCK = 4  # template resolution SIZE // BLOCK = 8


def _split(rng: np.random.Generator, templates: np.ndarray, n: int, k: int):
  num_classes = templates.shape[0]
  labels = rng.permutation(np.arange(n, dtype=np.int32) % num_classes)
  images = templates[labels]
  u = rng.integers(0, 256, images.shape, dtype=np.uint8).astype(np.uint16)
  u *= np.uint16(k)
  u >>= 8
  # No overflow: templates hold floor(t (256 - k) / 256) (see make()).
  images += u.astype(np.uint8)
  return images, labels


def _stats(images: np.ndarray):
  """Per-channel mean/std in [0, 1] units from value histograms (exact, and
  much faster than a float reduction over the channel axis)."""
  values = np.arange(256) / 255.0
  mean, std = [], []
  for c in range(images.shape[-1]):
    hist = np.bincount(images[..., c].ravel(), minlength=256)
    total = max(int(hist.sum()), 1)
    m = float(hist @ values) / total
    var = float(hist @ (values - m) ** 2) / total
    mean.append(m)
    std.append(max(var ** 0.5, 1e-3))
  return tuple(mean), tuple(std)


def make(num_train: int, num_test: int, num_classes: int = 10,
         channels: int = 3, seed: int = 0, noise: float = 0.75) -> Dataset:
  """The synthetic dataset; see the module doc."""
  template_ss, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
  low = SIZE // BLOCK
  small = np.random.default_rng(template_ss).integers(
      0, 256, (num_classes, low, low, channels), dtype=np.uint8)
  templates = small.repeat(BLOCK, axis=1).repeat(BLOCK, axis=2)
  k = int(round(256 * noise))
  templates = ((templates.astype(np.uint16) * (256 - k)) >> 8).astype(np.uint8)
  train_images, train_labels = _split(np.random.default_rng(train_ss),
                                      templates, num_train, k)
  test_images, test_labels = _split(np.random.default_rng(test_ss),
                                    templates, num_test, k)
  # Statistics of the first (up to) 256 training images: cheap, and fixed for
  # a given seed/noise/classes/channels whatever num_train is beyond 256.
  mean, std = _stats(train_images[:256])
  return Dataset("synthetic", train_images, train_labels, test_images,
                 test_labels, num_classes, mean, std)


def from_config(cfg: Mapping[str, Any]) -> Dataset:
  """make() from the data config fields synthetic_train, synthetic_test,
  num_classes, channels, synthetic_seed, synthetic_noise."""
  noise = get(cfg, "synthetic_noise", 0.75)
  if (isinstance(noise, bool) or not isinstance(noise, (int, float))
      or not 0.0 <= noise <= 1.0):
    raise DataError(f"data.synthetic_noise: expected a number in [0, 1], "
                    f"got {noise!r}")
  return make(num_train=get_int(cfg, "synthetic_train", 2048, minimum=1),
              num_test=get_int(cfg, "synthetic_test", 512, minimum=1),
              num_classes=get_int(cfg, "num_classes", 10, minimum=2),
              channels=get_int(cfg, "channels", 3, minimum=1),
              seed=get_int(cfg, "synthetic_seed", 0),
              noise=float(noise))
