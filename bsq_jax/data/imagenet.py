"""ImageNet (ILSVRC 2012) from tensorflow-datasets' ``imagenet2012``.

imagenet2012 is a manual-download dataset: tfds prepares it from
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` (registration at
image-net.org) placed in ``cfg["manual_dir"]``; preparing writes TFRecords to
``cfg["data_dir"]`` (tfds' default directory if absent) once, after which the
tars are no longer read.

    train_iter_fn, eval_iter_fn = imagenet_iterators(cfg, global_batch,
                                                     image_size, process_index,
                                                     process_count, seed)
    for batch in train_iter_fn(epoch): ...   # train_iter_fn.steps_per_epoch
    for batch in eval_iter_fn(): ...          # eval_iter_fn.steps

Each batch is a dict of numpy arrays holding this process's share
(``global_batch // process_count`` examples) of the global batch:
``images`` float32 (B, image_size, image_size, 3), normalised by ImageNet's
mean and std (what torchvision's ResNet-50 and, with its transform_input,
Inception-V3 expect), and ``labels`` int32 (B,). Every process yields the same
number of batches: ``steps_per_epoch = num_train // global_batch`` in
training (the rest of the epoch is dropped; a fresh shuffle each epoch), and
``ceil(ceil(50000 / process_count) / B)`` in evaluation, whose last batches
are padded to full size with zero images, ``labels == -1`` and an extra
boolean ``mask`` that is False on padding (True elsewhere).

Training: torchvision's RandomResizedCrop (area 8-100%, aspect 3/4-4/3)
decoded straight from the JPEG, bilinear resize to image_size, random
horizontal flip; randomness is stateless, seeded by (seed, epoch, example).
Evaluation: resize the shorter side to image_size / 0.875 (256 for 224, 342
for 299), centre crop image_size. Decoding runs on the host in tf.data
(TensorFlow is imported lazily and kept off the GPUs), prefetched by tf.data
and by a background thread (`prefetch`, which also takes a device put).

cfg fields: manual_dir, data_dir (None), shuffle_buffer (10_000),
host_prefetch (2 batches).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional

import numpy as np

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


def _tf():
  """TensorFlow, imported on first use and hidden from the GPUs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised (by an earlier call)
    pass
  return tf


def check_manual_dir(manual_dir: Optional[str]) -> None:
  """Raises a one-line ValueError unless both ILSVRC 2012 tars are there."""
  missing = [f for f in MANUAL_FILES if not manual_dir or
             not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise ValueError(
        f"ImageNet is not prepared and data.manual_dir={manual_dir!r} lacks "
        f"{' and '.join(missing)}: download ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar (ILSVRC 2012, image-net.org, registration "
        f"needed) into that directory, or set data.data_dir to a directory "
        f"where tfds has prepared imagenet2012")


# --------------------------------------------------------------------------
# Per-example preprocessing (tf ops, usable inside tf.data maps).


def _normalize(image):
  tf = _tf()
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def preprocess_train(image_bytes, seed, image_size: int):
  """JPEG bytes -> random resized crop, flipped, normalised (H, W, 3) float32.

  seed: int shape-[2] tensor (stateless randomness).
  """
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.1, aspect_ratio_range=CROP_ASPECT,
      area_range=CROP_AREA, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]),
                                        channels=3)
  image = tf.image.resize(image, (image_size, image_size), "bilinear",
                          antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _normalize(image)


def preprocess_eval(image_bytes, image_size: int,
                    crop_fraction: float = EVAL_CROP_FRACTION):
  """JPEG bytes -> shorter side image_size / crop_fraction, centre crop."""
  tf = _tf()
  image = tf.image.decode_jpeg(image_bytes, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = tf.cast(round(image_size / crop_fraction), tf.float32)
  new = tf.cast(tf.math.floor(shape * short / tf.reduce_min(shape)), tf.int32)
  new = tf.maximum(new, image_size)  # the shorter side is exactly `short`
  image = tf.image.resize(image, new, "bilinear", antialias=True)
  top = (new[0] - image_size) // 2
  left = (new[1] - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  return _normalize(image)


# --------------------------------------------------------------------------
# Datasets of {"image": JPEG bytes, "label": int} -> batched, preprocessed.


def train_dataset(ds, image_size: int, local_batch: int, seed: int,
                  steps: int, shuffle_buffer: int = 10_000):
  """Shuffled, augmented, `steps` full batches of `local_batch` examples."""
  tf = _tf()
  autotune = tf.data.AUTOTUNE
  ds = ds.shuffle(shuffle_buffer, seed=seed).enumerate()

  def prep(i, ex):
    s = tf.stack([tf.cast(seed, tf.int64), i])
    return {"images": preprocess_train(ex["image"], s, image_size),
            "labels": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(prep, num_parallel_calls=autotune)
  ds = ds.batch(local_batch, drop_remainder=True).take(steps)
  options = tf.data.Options()
  options.deterministic = False
  return ds.with_options(options).prefetch(autotune)


def eval_dataset(ds, image_size: int, local_batch: int, num_batches: int):
  """Centre crops in order, padded (labels -1, mask False) to num_batches."""
  tf = _tf()
  ds = ds.map(lambda ex: {"images": preprocess_eval(ex["image"], image_size),
                          "labels": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      "images": tf.zeros((image_size, image_size, 3), tf.float32),
      "labels": tf.constant(-1, tf.int32), "mask": tf.constant(False)})
  ds = ds.concatenate(pad.repeat()).take(num_batches * local_batch)
  return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch(iterator: Iterable, size: int = 2,
             transform: Optional[Callable[[Any], Any]] = None) -> Iterator:
  """Pulls `iterator` (through `transform`, e.g. a device put) `size` ahead
  in a background thread. Errors are re-raised in the consumer."""
  items: queue.Queue = queue.Queue(maxsize=max(size, 1))
  stop = threading.Event()
  done = object()

  def put(item):
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def work():
    try:
      for item in iterator:
        if stop.is_set():
          return
        put(transform(item) if transform else item)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Failure(e))
      return
    put(done)

  threading.Thread(target=work, daemon=True).start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()


# --------------------------------------------------------------------------
# The tfds source.


def _builder(cfg: Mapping[str, Any]):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  _tf()
  builder = tfds.builder("imagenet2012", data_dir=cfg.get("data_dir") or None)
  if not builder.is_prepared():
    manual_dir = cfg.get("manual_dir")
    check_manual_dir(manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def imagenet_iterators(cfg: Mapping[str, Any], global_batch: int,
                       image_size: int, process_index: int = 0,
                       process_count: int = 1, seed: int = 0,
                       eval_batch: Optional[int] = None):
  """(train_iter_fn(epoch), eval_iter_fn()) over this process's batches.

  See the module docstring for the batches; evaluation batches hold
  `eval_batch` (default `global_batch`) examples over all processes.
  Raises ValueError (one line) if imagenet2012 is neither prepared in
  cfg["data_dir"] nor preparable from the tars in cfg["manual_dir"].
  """
  eval_batch = eval_batch or global_batch
  for batch in (global_batch, eval_batch):
    if batch % process_count:
      raise ValueError(f"global batch {batch} does not split over "
                       f"{process_count} processes")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = _builder(cfg)
  local = global_batch // process_count
  n_train = builder.info.splits["train"].num_examples
  n_eval = builder.info.splits["validation"].num_examples
  steps = n_train // global_batch
  local_eval = eval_batch // process_count
  eval_steps = math.ceil(math.ceil(n_eval / process_count) / local_eval)
  skip = {"image": tfds.decode.SkipDecoding()}
  host_prefetch = cfg.get("host_prefetch", 2)

  def split(name):
    return tfds.even_splits(name, process_count)[process_index]

  def train_iter_fn(epoch: int) -> Iterator[Dict[str, np.ndarray]]:
    epoch_seed = seed * 1_000_003 + epoch * 7919 + process_index
    ds = builder.as_dataset(
        split=split("train"), shuffle_files=True, decoders=skip,
        read_config=tfds.ReadConfig(shuffle_seed=epoch_seed))
    ds = train_dataset(ds, image_size, local, epoch_seed, steps,
                       cfg.get("shuffle_buffer", 10_000))
    return prefetch(ds.as_numpy_iterator(), host_prefetch)

  def eval_iter_fn() -> Iterator[Dict[str, np.ndarray]]:
    ds = builder.as_dataset(split=split("validation"), shuffle_files=False,
                            decoders=skip)
    ds = eval_dataset(ds, image_size, local_eval, eval_steps)
    return prefetch(ds.as_numpy_iterator(), host_prefetch)

  train_iter_fn.steps_per_epoch = steps
  eval_iter_fn.steps = eval_steps
  return train_iter_fn, eval_iter_fn
