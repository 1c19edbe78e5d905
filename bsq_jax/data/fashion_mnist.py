"""Fashion-MNIST from its four IDX files (Debian package dataset-fashion-mnist).

The files are read directly, gzipped (`name.gz`, what the Debian package
ships) or plain (`name`); tfds is not used (its registered checksums do not
match the Debian files). Every check failure raises a one-line DataError that
names the file and what was expected.

IDX layout (big-endian int32 header, then uint8 data):
    images: magic 2051, count, rows (28), cols (28), count*28*28 pixel bytes
    labels: magic 2049, count, count label bytes in 0..9

By default (`data.image_size` 32) the 28x28 images are padded with 2 zero
pixels on each side to 32x32, so the CIFAR models take them unchanged:
(N, 32, 32, 1) uint8. `data.image_size` 28 gives them as they are, for a
model built for Fashion-MNIST's own size.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from bsq_jax.data import DataError, Dataset

FIELD = "data.fashion_mnist_dir"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
ROWS = COLS = 28
PAD = 2
NUM_CLASSES = 10

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Per-channel mean/std of the 60000 training images AFTER padding to 32x32,
# in [0, 1] units, i.e. of exactly what the model is fed:
#   x = np.pad(train_images_28x28, ((0, 0), (2, 2), (2, 2))) / 255
#   x.mean() = 0.21899983..., x.std() = 0.33181137...
# (computed once from /usr/share/datasets/fashion-mnist; for the unpadded
# 28x28 images the usual values are 0.2860406 / 0.3530242). Hard-coded so a
# train_subset does not change the normalization.
MEAN = (0.2190,)
STD = (0.3318,)
# image_size -> (mean, std) of exactly what the model is fed.
NORMALIZATION = {32: (MEAN, STD), 28: ((0.2860,), (0.3530,))}


def _find(directory: str, name: str) -> str:
  """The path of `name.gz` or `name` in directory, else a DataError."""
  if not os.path.isdir(directory):
    raise DataError(f"{FIELD}: {directory!r} is not a directory; expected the "
                    "folder holding the four Fashion-MNIST IDX files (apt-get "
                    "install dataset-fashion-mnist puts them in "
                    "/usr/share/datasets/fashion-mnist)")
  for candidate in (name + ".gz", name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f"{FIELD}: {os.path.join(directory, name)}.gz (or "
                  f"{name} without .gz) does not exist; expected the "
                  "Fashion-MNIST IDX files there (apt-get install "
                  "dataset-fashion-mnist)")


def _read(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except EOFError:
    raise DataError(f"{FIELD}: {path} is truncated: the gzip stream ends "
                    "early") from None
  except (gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{FIELD}: {path} is not a valid gzip file: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from None
  except OSError as e:
    raise DataError(f"{FIELD}: cannot read {path}: "
                    f"{e.strerror or type(e).__name__}") from None


def _header(path: str, data: bytes, magic: int, words: int) -> np.ndarray:
  """The `words` big-endian int32 header words, magic checked."""
  size = 4 * words
  if len(data) < size:
    raise DataError(f"{FIELD}: {path} is truncated: expected a {size}-byte "
                    f"IDX header, got {len(data)} bytes")
  header = np.frombuffer(data, dtype=">i4", count=words).astype(np.int64)
  if header[0] != magic:
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    raise DataError(f"{FIELD}: {path}: expected IDX magic number {magic} "
                    f"({kind}), got {header[0]}")
  if header[1] < 0:
    raise DataError(f"{FIELD}: {path}: expected a non-negative count, got "
                    f"{header[1]}")
  return header


def _payload(path: str, data: bytes, offset: int, expected: int,
             what: str) -> np.ndarray:
  got = len(data) - offset
  if got < expected:
    raise DataError(f"{FIELD}: {path} is truncated: expected {expected} bytes "
                    f"of {what}, got {got}")
  if got > expected:
    raise DataError(f"{FIELD}: {path} has {got - expected} bytes after the "
                    f"{expected} bytes of {what} its header announces")
  return np.frombuffer(data, dtype=np.uint8, offset=offset)


def read_images(path: str) -> np.ndarray:
  """(N, 28, 28) uint8 from an IDX3 image file."""
  data = _read(path)
  _, count, rows, cols = _header(path, data, IMAGES_MAGIC, 4)
  if (rows, cols) != (ROWS, COLS):
    raise DataError(f"{FIELD}: {path}: expected {ROWS}x{COLS} images, got "
                    f"{rows}x{cols}")
  pixels = _payload(path, data, 16, int(count) * ROWS * COLS, "image data")
  return pixels.reshape(int(count), ROWS, COLS)


def read_labels(path: str) -> np.ndarray:
  """(N,) int32 in 0..9 from an IDX1 label file."""
  data = _read(path)
  _, count = _header(path, data, LABELS_MAGIC, 2)
  labels = _payload(path, data, 8, int(count), "label data")
  if labels.size and labels.max() >= NUM_CLASSES:
    bad = int(np.argmax(labels >= NUM_CLASSES))
    raise DataError(f"{FIELD}: {path}: expected labels in 0..{NUM_CLASSES - 1}"
                    f", got {labels[bad]} at index {bad}")
  return labels.astype(np.int32)


def _split(directory: str, split: str, pad: int):
  image_file, label_file = FILES[split]
  image_path = _find(directory, image_file)
  label_path = _find(directory, label_file)
  images = read_images(image_path)
  labels = read_labels(label_path)
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{FIELD}: {image_path} holds {images.shape[0]} images "
                    f"but {label_path} holds {labels.shape[0]} labels; "
                    "expected the same count")
  padded = np.zeros((images.shape[0], ROWS + 2 * pad, COLS + 2 * pad, 1),
                    np.uint8)
  padded[:, pad:pad + ROWS, pad:pad + COLS, 0] = images
  return padded, labels


def load(directory: str, image_size: int = ROWS + 2 * PAD) -> Dataset:
  """The dataset at `image_size` (32: padded, 28: as the files hold it)."""
  if image_size not in NORMALIZATION:
    raise DataError(f"data.image_size: expected one of "
                    f"{sorted(NORMALIZATION)} for fashion_mnist (28: the "
                    f"images as they are, 32: padded), got {image_size!r}")
  pad = (image_size - ROWS) // 2
  train_images, train_labels = _split(directory, "train", pad)
  test_images, test_labels = _split(directory, "test", pad)
  return Dataset("fashion_mnist", train_images, train_labels, test_images,
                 test_labels, NUM_CLASSES, *NORMALIZATION[image_size])
