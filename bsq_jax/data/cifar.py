"""CIFAR-10 / CIFAR-100 through tensorflow-datasets, whole splits as numpy.

TensorFlow and tfds are imported inside `load`, so importing `bsq_jax.data`
does not pull TensorFlow in; TensorFlow is hidden from the GPUs first so it
does not grab accelerator memory that JAX needs.

Offline use: tfds looks for a manually downloaded archive in
`download_config.manual_dir` under the file name registered in its checksums
file (`tensorflow_datasets/url_checksums/cifar10.txt`, `cifar100.txt`), which
is the URL's basename:

    cifar10   <manual_dir>/cifar-10-binary.tar.gz    (170052171 bytes)
    cifar100  <manual_dir>/cifar-100-binary.tar.gz   (168513733 bytes)

and verifies its size and sha256 against that file. When the dataset is not
prepared in the data dir, this module checks for the archive itself before
calling tfds. Without it, and with `data.download` (the default), tfds
downloads the archive, but only after the download host (or the https
proxy) answers within a few seconds (data/probe.py): offline, tfds would
retry for minutes. With no archive and no answer, or with `data.download` False,
the load fails at once with one line naming the file, the folder and the
URL. With `data.manual_dir` empty, tfds's default manual folder
`<data_dir>/downloads/manual` is the one searched.

Order: tfds stores examples in a hashed order; `load` sorts each split back by
its `id` ("train_00000", ...), i.e. the order of the original binary files,
so `train_subset = N` takes the first N images of data_batch_1.bin, ... (or
train.bin for CIFAR-100), independent of tfds's storage order.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import numpy as np

from bsq_jax.data import DataError, Dataset, probe, quiet


class Spec(NamedTuple):
  title: str
  url: str
  num_classes: int
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]


SPECS = {
    "cifar10": Spec("CIFAR-10",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": Spec("CIFAR-100",
                     "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                     100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if len(text) > 300:
    text = text[:297] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def import_tf():
  """(tf, tfds), with TensorFlow kept off the GPUs and quiet (data/quiet.py)."""
  quiet.tensorflow_env()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass  # TF's devices are already initialized; nothing more to do here.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tf, tfds


def expected_archive(builder, url: str):
  """(file name tfds looks for in manual_dir, its registered UrlInfo or None)."""
  try:
    infos = type(builder).url_infos or {}
  except Exception:  # pylint: disable=broad-except
    # e.g. ModuleNotFoundError for importlib_resources (etils[epath]); tfds's
    # own download_and_prepare then fails too, and says so as a DataError.
    infos = {}
  info = infos.get(url)
  if info is not None and info.filename:
    return info.filename, info
  return url.rsplit("/", 1)[-1], info


def _prepare(builder, tfds, spec: Spec, manual_dir: str, download: bool):
  data_root = os.fspath(builder.data_dir_root)
  filename, info = expected_archive(builder, spec.url)
  if manual_dir:
    folder, field = os.path.abspath(os.path.expanduser(manual_dir)), \
        "data.manual_dir"
  else:
    # tfds's own default manual dir (DatasetBuilder._make_download_manager).
    folder, field = os.path.join(data_root, "downloads", "manual"), \
        "data.manual_dir (empty, so tfds's default)"
  archive = os.path.join(folder, filename)
  have_archive = os.path.isfile(archive)
  if not have_archive and not download:
    raise DataError(
        f"data.manual_dir: {spec.title} is not prepared in {data_root} and "
        f"{archive} does not exist; download {spec.url} and put it there "
        f"(or set data.manual_dir to the folder holding {filename}, or set "
        "data.download=True to let tfds download it)")
  if not have_archive:
    offline = probe.unreachable(spec.url)
    if offline:
      raise DataError(
          f"data.manual_dir: {spec.title} is not prepared in {data_root} and "
          f"{archive} does not exist, and data.download cannot reach the "
          f"network ({offline}); download {spec.url} and put it there (or "
          f"set data.manual_dir to the folder holding {filename})")
  if have_archive and info is not None and info.size:
    size = os.path.getsize(archive)
    if size != int(info.size):
      raise DataError(
          f"{field}: {archive} has {size} bytes, expected {int(info.size)} "
          f"(the size tfds registers for {spec.url}); the download is "
          "incomplete or a different file, download it again")
  config = tfds.download.DownloadConfig(
      manual_dir=folder if (manual_dir or have_archive) else None,
      try_download_gcs=False)
  # pylint: disable-next=import-outside-toplevel
  from tensorflow_datasets.core.download.download_manager import (
      NonMatchingChecksumError)
  try:
    builder.download_and_prepare(download_config=config)
  except NonMatchingChecksumError:
    raise DataError(
        f"{field}: {archive} has the wrong sha256 checksum (expected "
        f"{info.checksum if info else '?'}); the file is corrupt or not the "
        f"original {spec.url}, download it again") from None
  except Exception as e:  # pylint: disable=broad-except
    source = archive if have_archive else spec.url
    hint = (f"; pip install {e.name}" if isinstance(e, ModuleNotFoundError)
            and e.name else "")
    raise DataError(f"{field}: preparing {spec.title} in {data_root} from "
                    f"{source} failed: {_one_line(e)}{hint}") from None


def _read_split(builder, tfds, split: str, spec: Spec, data_root: str):
  try:
    batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"data.data_dir: reading the {split} split of "
                    f"{spec.title} from {data_root} failed: {_one_line(e)}"
                    ) from None
  images = np.asarray(batch["image"], dtype=np.uint8)
  labels = np.asarray(batch["label"]).astype(np.int32)
  ids = batch.get("id")
  if ids is not None and len(ids) == len(labels):
    # Fixed-width "train_00012" ids: byte order == original file order.
    order = np.argsort(np.asarray(ids).astype("S"), kind="stable")
    images, labels = images[order], labels[order]
  if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
    raise DataError(f"data.data_dir: {spec.title} {split} images in "
                    f"{data_root}: expected (N, 32, 32, 3), got {images.shape}")
  return np.ascontiguousarray(images), labels


def load(name: str, data_dir: Optional[str] = "", manual_dir: str = "",
         download: bool = True) -> Dataset:
  """CIFAR-10/100, preparing it with tfds from manual_dir (or a download)
  when needed."""
  spec = SPECS[name]
  _, tfds = import_tf()
  with quiet.tfds_lookup():
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"data.data_dir: cannot open the tfds dataset {name} "
                      f"in {data_dir or 'the tfds default data dir'}: "
                      f"{_one_line(e)}") from None
    prepared = builder.is_prepared()
  if not prepared:
    _prepare(builder, tfds, spec, manual_dir or "", download)
  data_root = os.fspath(builder.data_dir_root)
  train_images, train_labels = _read_split(builder, tfds, "train", spec,
                                           data_root)
  test_images, test_labels = _read_split(builder, tfds, "test", spec,
                                         data_root)
  return Dataset(name, train_images, train_labels, test_images, test_labels,
                 spec.num_classes, spec.mean, spec.std)
