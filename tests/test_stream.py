"""Host-fed data (`bsq_jax.data.stream`) and the host-fed train step."""

import jax
import numpy as np
import pytest

from bsq_jax.data import DataError
from bsq_jax.data.stream import Stream, is_streamed, load_stream
from bsq_jax.epoch import epoch_key
from bsq_jax.models import init_variables
from bsq_jax.step import TrainState
from bsq_jax.stages import Run
from tiny import tiny_config

SHAPE = (8, 8, 3)


def _synthetic(**cfg):
  return load_stream({"name": "synthetic_stream", "num_classes": 4,
                     "synthetic_train": 20, "synthetic_test": 10, **cfg},
                     SHAPE, batch=8, eval_batch=4, seed=3)


def test_synthetic_stream_batches_and_padding():
  s = _synthetic()
  assert is_streamed({"name": "synthetic_stream"})
  assert not is_streamed({"name": "cifar10"})
  assert (s.steps_per_epoch, s.eval_steps, s.num_classes) == (2, 3, 4)
  train = list(s.train(0))
  assert len(train) == 2
  assert train[0]["images"].shape == (8,) + SHAPE
  assert train[0]["images"].dtype == np.float32
  assert train[0]["labels"].dtype == np.int32
  assert set(np.concatenate([b["labels"] for b in train])) <= set(range(4))
  # Same epoch, same batches; another epoch, others.
  np.testing.assert_array_equal(list(s.train(0))[1]["images"],
                                train[1]["images"])
  assert not np.array_equal(list(s.train(1))[0]["images"], train[0]["images"])
  test = list(s.test())
  masks = np.concatenate([b["mask"] for b in test])
  labels = np.concatenate([b["labels"] for b in test])
  assert masks.sum() == 10 and not masks[10:].any()
  assert (labels[~masks] == -1).all() and (labels[masks] >= 0).all()


def test_too_few_images_and_missing_imagenet_are_one_line_errors(tmp_path):
  with pytest.raises(DataError, match="data.synthetic_train"):
    _synthetic(synthetic_train=4)
  with pytest.raises(DataError, match="data.manual_dir") as e:
    load_stream({"name": "imagenet2012", "data_dir": str(tmp_path),
                 "manual_dir": str(tmp_path)}, (224, 224, 3), 8, 8, 0)
  assert "ILSVRC2012_img_train.tar" in str(e.value)
  assert "\n" not in str(e.value)


def test_host_fed_epoch_equals_on_device_epoch(tmp_path):
  """The same batches, fed from the host or gathered on the devices (no
  augmentation), give the same parameters after two steps on 8 devices."""
  config = tiny_config(**{"data.augment": False, "data.synthetic_train": 128})
  run = Run(config, str(tmp_path))
  v = init_variables(run.loop.model("float"), jax.random.key(0), run.sample)
  trainer = run.loop.trainer("float", None, v["params"], config.pretrain)
  start = TrainState(v["params"], v["batch_stats"], trainer.tx.init(v["params"]))

  data = run.train
  order = np.asarray(jax.random.permutation(
      jax.random.fold_in(epoch_key(config.seed, 0), 0), data.size))
  images = np.asarray(jax.device_get(data.images), np.float32) / 255.0
  images = (images - np.asarray(data.mean)) / np.asarray(data.std)
  labels = np.asarray(jax.device_get(data.labels))
  batches = [order[i * 64:(i + 1) * 64] for i in range(2)]
  stream = Stream("fed", 10, images.shape[1:], 2, 0,
                  lambda epoch: iter([{"images": images[ids].astype(np.float32),
                                       "labels": labels[ids]}
                                      for ids in batches]),
                  lambda: iter([]))

  device = list(trainer.train_epoch(start, data, config.seed, 0))
  fed = list(trainer.train_epoch(start, stream, config.seed, 0,
                                 chunk_steps=1))
  assert [n for _, n, _ in fed] == [1, 1] and sum(n for _, n, _ in device) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               jax.device_get(device[-1][0].params),
               jax.device_get(fed[-1][0].params))
  loss_device = sum(float(s["loss"]) for _, _, s in device)
  loss_fed = sum(float(s["loss"]) for _, _, s in fed)
  assert loss_fed == pytest.approx(loss_device, rel=1e-5)
