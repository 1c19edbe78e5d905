"""benchmarks/speed.py helpers: trial environments and the PyTorch table."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import speed  # pylint: disable=wrong-import-position
from bsq_jax import allocator  # pylint: disable=wrong-import-position


def test_trial_env_sets_flags_variables_and_allocators(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--a=1")
  assert speed.trial_env("--b=2")["XLA_FLAGS"] == "--a=1 --b=2"
  assert speed.trial_env("BSQ_JAX_CONV=xla")["BSQ_JAX_CONV"] == "xla"
  monkeypatch.setattr(allocator, "find", lambda name: f"/lib/{name}.so")
  assert speed.trial_env("LD_PRELOAD=@jemalloc")["LD_PRELOAD"] == (
      "/lib/jemalloc.so")
  assert speed.missing_library("LD_PRELOAD=@jemalloc") is None
  monkeypatch.setattr(allocator, "find", lambda name: None)
  assert "apt-get install libjemalloc2" in speed.missing_library(
      "LD_PRELOAD=@jemalloc")
  assert speed.missing_library("--xla_cpu_use_onednn=true") is None


def test_reference_table_rows_ratios_and_failures():
  ours = {"step_s": {"float": 0.5, "bsq": 0.6}}
  theirs = {"float": {"step_s": 0.4, "torch": "2.13.0", "threads": 2},
            "bsq": {"error": "exit 1: boom"}}
  lines = speed.reference_lines([("LD_PRELOAD=@tcmalloc", ours, theirs)])
  assert "| tcmalloc | float | 500.0 | 400.0 | 320.0 | 1.250x |" in lines
  assert "| tcmalloc | bsq | failed: exit 1: boom | | | |" in lines
  assert any("torch 2.13.0, 2 threads" in l for l in lines)
  assert any("(not run)" in l for l in speed.reference_lines([]))
