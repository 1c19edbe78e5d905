"""Test setup: JAX on CPU with 8 forced devices, set before JAX starts."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Tests run tiny models for a few steps: compile time dominates, and XLA's
# CPU backend at optimization level 0 compiles several times faster.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One XLA compile cache for this pytest session, shared with the processes
# the tests start: many tests compile the same tiny train step, and a
# killed-and-restarted run should not pay for it again. A fresh folder per
# session, so no result depends on an earlier session.
# pytest-xdist's workers inherit the folder from the process that made it,
# which removes it at the end (it held ~30 MB a session, left behind before).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="bsq_jax_xla_cache_")
# JAX keeps executables that took 1 s to compile; the tiny models' test
# steps (0.3-1 s each) are compiled again in every process without this.
# Not 0: thousands of op-by-op compiles then cost more to write than to redo.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """`-n auto` (pyproject.toml): a worker per core, at most 4; each worker
  holds 8 CPU devices and some start processes of their own."""
  return max(1, min(4, len(os.sched_getaffinity(0))))
