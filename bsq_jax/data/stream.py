"""Datasets fed from the host batch by batch: ImageNet, and a stand-in.

ImageNet does not fit on the accelerator, so unlike the small datasets of
`bsq_jax.data` (copied once onto every device) its batches are decoded on the
host and handed to the train step one at a time:

    stream = load_stream(cfg.data, image_shape, batch, eval_batch, seed)
    for batch in stream.train(epoch): ...   # stream.steps_per_epoch batches
    for batch in stream.test(): ...         # stream.eval_steps batches

Every batch is a dict of numpy arrays holding this process's share of the
global batch: ``images`` float32 (B, H, W, C), already augmented and
normalized; ``labels`` int32 (B,); in evaluation also ``mask`` (False on the
padding that fills the last batches).

Names:
    imagenet2012       tensorflow-datasets' imagenet2012 (`imagenet.py`)
    synthetic_stream   Gaussian images whose class is written into their
                       mean, made on the fly from (seed, epoch, step,
                       process); sizes data.synthetic_train and
                       data.synthetic_test. For tests at any resolution.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Tuple

import numpy as np

from bsq_jax.data import DataError, get, get_int

Batches = Iterator[Dict[str, np.ndarray]]
NAMES = ("imagenet2012", "synthetic_stream")


class Stream(NamedTuple):
  name: str
  num_classes: int
  image_shape: Tuple[int, ...]   # (H, W, C)
  steps_per_epoch: int           # global batches per epoch (the rest dropped)
  eval_steps: int                # evaluation batches (the last ones padded)
  train: Callable[[int], Batches]
  test: Callable[[], Batches]


def is_streamed(cfg: Mapping[str, Any]) -> bool:
  return get(cfg, "name", "") in NAMES


def load_stream(cfg: Mapping[str, Any], image_shape: Tuple[int, ...],
                batch: int, eval_batch: int, seed: int) -> Stream:
  """The stream `cfg.name` for a model taking `image_shape` images."""
  import jax  # pylint: disable=import-outside-toplevel
  where = (jax.process_index(), jax.process_count())
  if get(cfg, "name", "") == "imagenet2012":
    from bsq_jax.data import imagenet  # pylint: disable=import-outside-toplevel
    if image_shape[-1] != 3:
      raise DataError(f"model.channels: imagenet2012 has 3 channels, the "
                      f"model takes {image_shape[-1]}")
    try:
      train, test = imagenet.imagenet_iterators(
          cfg, batch, image_shape[0], *where, seed, eval_batch=eval_batch)
    except ValueError as e:  # one line naming data.manual_dir
      raise DataError(str(e)) from e
    return Stream("imagenet2012", 1000, tuple(image_shape),
                  train.steps_per_epoch, test.steps, train, test)
  return _synthetic(cfg, tuple(image_shape), batch, eval_batch, seed, *where)


def _synthetic(cfg, shape, batch, eval_batch, seed, process, processes):
  classes = get_int(cfg, "num_classes", 10, 2)
  n_train = get_int(cfg, "synthetic_train", 64, 1)
  n_test = get_int(cfg, "synthetic_test", 16, 1)
  if n_train < batch:
    raise DataError(f"data.synthetic_train: {n_train} images do not fill one "
                    f"batch of {batch}")
  local, local_eval = batch // processes, eval_batch // processes

  def make(rng, n):
    labels = rng.integers(0, classes, n).astype(np.int32)
    images = rng.standard_normal((n,) + shape).astype(np.float32)
    images += (labels[:, None, None, None] / classes - 0.5).astype(np.float32)
    return images, labels

  def train(epoch: int) -> Batches:
    for step in range(n_train // batch):
      rng = np.random.default_rng((seed, epoch, step, process))
      images, labels = make(rng, local)
      yield {"images": images, "labels": labels}

  eval_steps = math.ceil(n_test / eval_batch)

  def test() -> Batches:
    for step in range(eval_steps):
      rng = np.random.default_rng((seed, 1 << 30, step, process))
      images, labels = make(rng, local_eval)
      first = step * eval_batch + process * local_eval
      mask = first + np.arange(local_eval) < n_test
      yield {"images": images, "labels": np.where(mask, labels, -1),
             "mask": mask}

  return Stream("synthetic_stream", classes, shape, n_train // batch,
                eval_steps, train, test)
