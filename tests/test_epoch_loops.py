"""The rolled `lax.scan` epoch (what a GPU runs) against the straight-line
chunks (what CPU runs), on 8 forced CPU devices: same parameters, BatchNorm
statistics, summed metrics and test totals, whatever the chunk length."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsq_jax import augment
from bsq_jax import scheme as sch
from bsq_jax.epoch import AXIS, Trainer, put_dataset
from bsq_jax.layers import Quant
from bsq_jax.models import build_model
from bsq_jax.step import TrainState

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))
import speed  # pylint: disable=wrong-import-position  # the three modes' set-up

# ResNet-8 (width 4) on 16x16 images: 64 training images in batches of 16
# (2 per device) make a 4-step epoch; 40 test images in batches of 16 make
# 3 eval batches, the last one padded.
CFG = {"name": "cifar_resnet", "depth": 8, "num_classes": 10, "act_bits": 4,
       "width": 4, "channels": 3, "image_size": 16}
BATCH, STEPS, TEST = 16, 4, 40
TRAIN_CHUNKS = (1, 3)   # 3: a chunk of 3, then one of 1 (two compiles)
EVAL_CHUNKS = (1, 2, 3)        # 2: the second dispatch is half padding

# Not exact: XLA compiles the step inside the while loop's body a little
# differently from the same step at top level, and after 4 steps up to 1 in
# 6 parameters differ in the last bits (largest difference seen on CPU:
# 2.7e-7, on values up to ~1). A wrong step order, key or batch moves them
# by 1e-3 or more. On a GPU, convolutions may run in TF32 and cuDNN picks
# its algorithm per compile: a looser bound there (not yet measured).
ON_CPU = jax.devices()[0].platform == "cpu"
STATE_ATOL = 1e-6 if ON_CPU else 1e-3
# Summed metrics: a chunk of n steps sums them in float32 on the device,
# the host adds the chunks in float64, so chunk lengths differ by float32
# rounding (seen: 5e-8 relative).
SUMS_RTOL = 1e-6 if ON_CPU else 1e-3


def _data(rng, n):
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,))
  return put_dataset(images, labels, (0.5,) * 3, (0.25,) * 3)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  train, test = _data(rng, BATCH * STEPS), _data(rng, TEST)
  # The same start twice (initialization is seeded), once per loop; bsq at
  # 4 bits with an alpha large enough to move the planes in 4 steps.
  loops = {loop: speed.setup(None, CFG, BATCH, bits=4, alpha=1.0, loop=loop,
                             chunk_steps=1, cpu_chunk_steps=1)[0]
           for loop in ("straight", "scan")}
  modes = {m: ({loop: loops[loop][m][0] for loop in loops},
               loops["straight"][m][1]) for m in loops["scan"]}
  return modes, train, test


def _epoch(trainer, state, data, chunk):
  """State after one epoch, and the summed metrics of its chunks (summed on
  the host in chunk order, as StageLoop._epoch does)."""
  totals, steps = {}, []
  for state, n, sums in trainer.train_epoch(state, data, 3, 1, chunk):
    steps.append(n)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + np.float64(v)
  return jax.device_get(state), totals, steps


def test_loop_switch(setup):
  modes, _, _ = setup
  trainers, _ = modes["float"]
  assert trainers["scan"].loop == "scan" and not trainers["scan"].straight_line
  assert trainers["straight"].straight_line
  t = trainers["scan"]
  args = (build_model(CFG, Quant("float"), AXIS), t.tx, None, 1, BATCH, BATCH)
  # "auto", the default: straight-line on CPU, the rolled scan elsewhere.
  assert Trainer(*args).loop == ("straight" if ON_CPU else "scan")
  with pytest.raises(ValueError, match="loop: expected one of auto, scan, "
                     "straight, got 'rolled'"):
    Trainer(*args, loop="rolled")


@pytest.mark.parametrize("mode", ["float", "bsq", "finetune"])
def test_scan_epoch_equals_straight_line(setup, mode):
  modes, train, _ = setup
  trainers, start = modes[mode]
  want, want_sums, steps = _epoch(trainers["straight"], start, train, 1)
  assert steps == [1] * STEPS
  # The epoch moves the parameters far more than the tolerance below.
  moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
              zip(jax.tree.leaves(start.params), jax.tree.leaves(want.params)))
  assert moved > 1000 * STATE_ATOL, moved
  first = None
  for chunk in TRAIN_CHUNKS:
    got, sums, steps = _epoch(trainers["scan"], start, train, chunk)
    assert sum(steps) == STEPS and steps[0] == chunk
    for name in ("params", "batch_stats", "opt_state"):
      for x, y in zip(jax.tree.leaves(getattr(want, name)),
                      jax.tree.leaves(getattr(got, name))):
        np.testing.assert_allclose(y, x, rtol=0, atol=STATE_ATOL,
                                   err_msg=f"{mode} chunk {chunk} {name}")
    # Every rolled chunk length runs the same compiled body: bit for bit.
    first = first if first is not None else got
    jax.tree.map(np.testing.assert_array_equal, got, first)
    assert sums.keys() == want_sums.keys()
    for k in sums:
      assert sums[k] == pytest.approx(want_sums[k], rel=SUMS_RTOL), (k, chunk)
  assert trainers["scan"].traces == len({1, 3})  # one per chunk length


@pytest.mark.parametrize("mode", ["float", "bsq", "finetune"])
def test_scan_eval_equals_straight_line(setup, mode):
  modes, _, test = setup
  trainers, state = modes[mode]
  want = trainers["straight"].evaluate(state, test, chunk_steps=1)
  assert 0.0 <= want["test_accuracy"] <= 1.0 and want["test_loss"] > 0
  for chunk in EVAL_CHUNKS:
    # Exact on CPU (the eval body has no while-loop difference that shows):
    # the same per-batch sums, added in the same order.
    got = trainers["scan"].evaluate(state, test, chunk_steps=chunk)
    _assert_eval_equal(got, want)
  _assert_eval_equal(trainers["scan"].evaluate(state, test), want)  # one call


def _assert_eval_equal(got, want):
  if ON_CPU:
    assert got == want
  else:
    assert got == pytest.approx(want, rel=SUMS_RTOL)


def test_eval_of_a_model_with_every_layer_at_0_bits_is_its_loss():
  """Every quantized tensor at 0 bits (what too strong an alpha leaves): the
  test loss `evaluate` gives is the model's own, computed op by op, at every
  call. It was NaN, 0.0 or right from one call to the next on XLA:CPU with
  jaxlib 0.10.2, whose fusion of the pool and the 0-bit dense layer read
  garbage (bitplanes._zero_weight); these shapes (width 8, one device, test
  batches of 128) are the smoke config's, where it showed."""
  cfg = dict(CFG, width=8, image_size=32)
  sample = jnp.zeros((1, 32, 32, 3))
  scheme = {n: 0 for n in build_model(cfg).quantized_names(sample)}
  model = build_model(cfg, Quant("finetune", scheme))
  variables = model.init(jax.random.key(0), sample)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (256,))
  device = jax.local_devices()[:1]
  test = put_dataset(images, labels, (0.5,) * 3, (0.25,) * 3, device)
  trainer = Trainer(build_model(cfg, Quant("finetune", scheme), AXIS),
                    optax.sgd(0.1), sch.roles(variables["params"]), 1, 64,
                    128, False, device)
  state = TrainState(variables["params"], variables["batch_stats"], ())
  logits = model.apply(variables, augment.normalize(images, test.mean,
                                                    test.std))
  want = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, labels)))
  for _ in range(3):
    assert trainer.evaluate(state, test)["test_loss"] == pytest.approx(
        want, rel=1e-5)
