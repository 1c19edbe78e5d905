"""The tiny pipeline config the training tests share, as overrides of
configs/smoke.py, so a subprocess can be given the same as flags."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np

from bsq_jax.checkpoint import copy_stages, load_result
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


def kill_resume_and_compare(workdir, tmp_path, name):
  """main.py on --config=tests/plain_config.py:<name> in a copy of
  `workdir`'s pretrain and convert: killed (SIGKILL) right after a host
  pass that changed the precision, resumed by the same command, and the bsq
  result then equal, bit for bit, to `workdir`'s uninterrupted one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  got = copy_run(workdir, tmp_path / "got")
  cmd = [sys.executable, os.path.join(root, "main.py"),
         f"--config={os.path.join(root, 'tests', 'plain_config.py')}:{name}",
         f"--workdir={got}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root, os.path.join(root, "tests")]))
  killed = subprocess.run(cmd, env=dict(env, BSQ_JAX_DIE_AT="host_pass:1"),
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = load_result(workdir, "bsq"), load_result(got, "bsq")
  assert a.scheme == b.scheme
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(x, y)
