"""Small image datasets loaded whole into host memory as numpy arrays.

    load_dataset(cfg) -> Dataset

`cfg` is the `data` section of the config (an ml_collections ConfigDict or a
plain dict); every field is read with `cfg.get(field, default)`:

    name               "cifar10" | "cifar100" | "fashion_mnist" | "synthetic"
    data_dir           tensorflow-datasets data dir ("" or None: tfds default)
    manual_dir         folder holding the downloaded CIFAR archive
                       (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)
    download           CIFAR only: let tfds download from the internet when the
                       dataset is neither prepared nor in manual_dir (default
                       True; offline, a 3 s probe of the host fails the load
                       with a message naming the file; False: fail at once)
    fashion_mnist_dir  folder holding the four Fashion-MNIST IDX files
                       (default: the Debian package dataset-fashion-mnist's)
    image_size         height and width of the images given to the model
                       (default 32; Fashion-MNIST also 28: not padded)
    train_subset       0: all training images; N > 0: the first N training
                       images of the dataset's fixed order (CIFAR: the order of
                       the original binary files; Fashion-MNIST: IDX file
                       order; synthetic: generation order). No shuffling, no
                       seed: the same N images every run.
    synthetic_train, synthetic_test, num_classes, channels, synthetic_seed,
    synthetic_noise    the synthetic toy problem (see `synthetic.py`)

Images are uint8 NHWC (N, S, S, C), S = image_size; labels are int32. Every problem with the
data or its config raises `DataError` (a ValueError) whose message is one line
naming the config field or file and what was expected.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np


class DataError(ValueError):
  """A data problem; the message is one line naming the field/file at fault."""


class Dataset(NamedTuple):
  name: str
  train_images: np.ndarray  # uint8, (N, 32, 32, C), NHWC
  train_labels: np.ndarray  # int32, (N,)
  test_images: np.ndarray   # uint8, (M, 32, 32, C)
  test_labels: np.ndarray   # int32, (M,)
  num_classes: int
  mean: tuple  # per-channel mean in [0, 1] units, used for normalization
  std: tuple


NAMES = ("cifar10", "cifar100", "fashion_mnist", "synthetic")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  """cfg.get(key, default) for ConfigDicts and dicts; None reads as default."""
  value = cfg.get(key, default)
  return default if value is None else value


def get_int(cfg: Mapping[str, Any], key: str, default: int,
            minimum: int = 0) -> int:
  """An integer field >= minimum, else DataError naming `data.<key>`."""
  value = get(cfg, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f"data.{key}: expected an integer >= {minimum}, "
                    f"got {value!r}")
  if value < minimum:
    raise DataError(f"data.{key}: expected an integer >= {minimum}, "
                    f"got {value}")
  return int(value)


def _check(ds: Dataset, size: int = 32) -> Dataset:
  """Internal consistency of a loaded dataset (dtype, shape, label range)."""
  for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                ("test", ds.test_images, ds.test_labels)):
    if (images.dtype != np.uint8 or images.ndim != 4
        or images.shape[1:3] != (size, size)):
      raise DataError(f"data.name: {ds.name} {split} images: expected uint8 "
                      f"(N, {size}, {size}, C), got {images.dtype} "
                      f"{images.shape}")
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
      raise DataError(f"data.name: {ds.name} {split} labels: expected int32 "
                      f"({images.shape[0]},), got {labels.dtype} "
                      f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
      raise DataError(f"data.name: {ds.name} {split} labels: expected values "
                      f"in 0..{ds.num_classes - 1}, got "
                      f"{labels.min()}..{labels.max()}")
  channels = ds.train_images.shape[3]
  if ds.test_images.shape[3] != channels or len(ds.mean) != channels or len(
      ds.std) != channels:
    raise DataError(f"data.name: {ds.name}: channel counts disagree: train "
                    f"{channels}, test {ds.test_images.shape[3]}, mean "
                    f"{len(ds.mean)}, std {len(ds.std)}")
  return ds


def take_train_subset(ds: Dataset, n: int) -> Dataset:
  """The first n training images (n = 0: all); the test split is untouched."""
  if n == 0:
    return ds
  available = ds.train_images.shape[0]
  if n > available:
    raise DataError(f"data.train_subset: expected at most {available} (the "
                    f"size of the {ds.name} training set) or 0 for all, "
                    f"got {n}")
  # Copies, so the full arrays can be freed.
  return ds._replace(train_images=ds.train_images[:n].copy(),
                     train_labels=ds.train_labels[:n].copy())


def load_dataset(cfg: Mapping[str, Any]) -> Dataset:
  """Loads the dataset `cfg.name` whole into memory (see the module doc)."""
  name = get(cfg, "name", "")
  if name not in NAMES:
    from bsq_jax.data.stream import NAMES as STREAMED  # pylint: disable=import-outside-toplevel
    raise DataError(f"data.name: expected one of "
                    f"{', '.join(NAMES + STREAMED)}, "
                    f"got {name!r}")
  train_subset = get_int(cfg, "train_subset", 0)
  size = get_int(cfg, "image_size", 32, minimum=1)
  if size != 32 and name != "fashion_mnist":
    raise DataError(f"data.image_size: {name} images are 32x32; expected 32, "
                    f"got {size}")
  if name in ("cifar10", "cifar100"):
    from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
    ds = cifar.load(name, data_dir=get(cfg, "data_dir", ""),
                    manual_dir=get(cfg, "manual_dir", ""),
                    download=bool(get(cfg, "download", True)))
  elif name == "fashion_mnist":
    from bsq_jax.data import fashion_mnist  # pylint: disable=import-outside-toplevel
    ds = fashion_mnist.load(
        get(cfg, "fashion_mnist_dir", "") or DEFAULT_FASHION_MNIST_DIR, size)
  else:
    from bsq_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    ds = synthetic.from_config(cfg)
  return take_train_subset(_check(ds, size), train_subset)
