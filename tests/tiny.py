"""The tiny pipeline config the training tests share, as overrides of
configs/smoke.py, so a subprocess can be given the same as flags."""

import os

from bsq_jax.checkpoint import copy_stages
from configs import smoke

# ResNet-8 (width 4), 256 synthetic images, one epoch per stage (smoke's).
TINY = {"model.width": 4, "batch_size": 64, "eval_batch_size": 64,
        "data.synthetic_train": 256, "data.synthetic_test": 64,
        "bsq.alpha": 20.0}  # strong enough to drop planes within 4 steps


def tiny_config(**changes):
  """smoke.get_config() with TINY and then `changes` ("a.b": value) set."""
  c = smoke.get_config()
  c.update_from_flattened_dict({**TINY, **changes})
  return c


def as_flags(**changes):
  """The same config as main.py flags (after --config=configs/smoke.py)."""
  return [f"--config.{k}={v}" for k, v in {**TINY, **changes}.items()]


def copy_run(src, dst, stages=("pretrain", "convert")):
  """A new workdir holding `src`'s finished `stages` (skips redoing them)."""
  return copy_stages(src, str(dst), stages)


def user_env():
  """The environment a user's own script runs in: the project importable,
  the machine's one CPU device (not the 8 the tests force, whose collectives
  time out on a loaded 2-core machine)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "device_count" not in f]
  return dict(os.environ, PYTHONPATH=root, XLA_FLAGS=" ".join(flags))
