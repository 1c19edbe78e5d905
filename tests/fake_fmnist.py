"""Fashion-MNIST IDX files written on the fly (real format, made-up pixels)."""

import gzip
import os
import struct

import numpy as np

from bsq_jax.data import fashion_mnist


def idx_images(images, magic=2051, count=None, dims=None):
  n, r, c = images.shape
  r, c = dims or (r, c)
  return struct.pack(">iiii", magic, n if count is None else count, r,
                     c) + images.tobytes()


def idx_labels(labels, magic=2049, count=None):
  return struct.pack(">ii", magic, len(labels) if count is None else
                     count) + np.asarray(labels, np.uint8).tobytes()


def write_fmnist(folder, n_train=12, n_test=5, gz=True, overrides=None):
  """Writes the four IDX files; overrides maps file name -> raw bytes."""
  rng = np.random.default_rng(0)
  contents = {}
  for split, n in (("train", n_train), ("test", n_test)):
    image_file, label_file = fashion_mnist.FILES[split]
    contents[image_file] = idx_images(
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    contents[label_file] = idx_labels(np.arange(n) % 10)
  contents.update(overrides or {})
  os.makedirs(folder, exist_ok=True)
  for name, raw in contents.items():
    if gz:
      with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
        f.write(raw)
    else:
      with open(os.path.join(folder, name), "wb") as f:
        f.write(raw)
  return contents
