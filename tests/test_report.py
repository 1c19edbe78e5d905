"""The summary table: a person reads it, so what it shows is tested here."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from bsq_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BITS = {"conv/kernel": 1, "fc/kernel": 1, "fc/bias": 6}


def records(zero: int):
  """A run's last records: BSQ left `zero` 1-bit tensors with no bit set."""
  tuned = {"finetune_average_bits": 0.0032 if zero else 1.25,
           "finetune_compression": 10000.0 if zero else 25.6}
  return [
      {"stage": "pretrain", "epoch": 1, "average_bits": 32.0,
       "compression": 1.0, "test_accuracy": 0.5},
      {"stage": "bsq", "epoch": 1, "average_bits": 1.25, "compression": 25.6,
       "test_accuracy": 0.4, "bits": BITS, "zero_tensors": zero, **tuned},
      {"stage": "finetune", "epoch": 1,
       "average_bits": tuned["finetune_average_bits"],
       "compression": tuned["finetune_compression"], "test_accuracy": 0.1,
       "bits": dict(BITS, **{"conv/kernel": 0, "fc/kernel": 0} if zero else {}),
       "zero_tensors": zero}]


def test_summary_without_all_zero_tensors_keeps_its_four_columns(tmp_path):
  table = report.write_summary(str(tmp_path), records(0))
  assert table.splitlines()[0] == ("| stage | average bits | compression | "
                                   "test accuracy |")
  assert "| bsq | 1.25 | 25.60 | 40.00% |" in table
  assert len(table.splitlines()) == 5  # header, rule, three rows; no note
  assert (tmp_path / "summary.md").read_text() == table


def test_summary_shows_all_zero_tensors_and_bsq_bits_as_finetuned(tmp_path):
  """BSQ's 1-bit all-zero tensors are 0 bits in finetuning
  (docs/algorithm.md): the bsq row says what its scheme counts there, both
  rows say how many tensors are all zero, and a note says why they differ."""
  table = report.write_summary(str(tmp_path), records(2))
  lines = table.splitlines()
  assert lines[0].endswith("| test accuracy | all-zero tensors |")
  assert "| pretrain | 32.00 | 1.00 | 50.00% | - |" in lines
  assert ("| bsq | 1.25 (0.0032 as finetuned) | 25.60 | 40.00% | 2 of 3 |"
          in lines)
  assert "| finetune | 0.0032 | 10000.00 | 10.00% | 2 of 3 |" in lines
  note = lines[-1]
  assert note.startswith("bsq: 2 of 3 quantized tensors ended at 1 bit with "
                         "no bit set. Finetuning holds them at 0 bits")
  assert "0.0032 average bits (10000.00x)" in note
  assert (tmp_path / "summary.md").read_text() == table


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or
                    importlib.util.find_spec("tensorboardX") is None,
                    reason="needs torch and tensorboardX installed")
def test_scalars_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (seconds of CPU per
  run); the metrics log hides it for that import only. A fresh process,
  since another test may have imported torch here."""
  code = textwrap.dedent(f"""
      import os, sys
      from bsq_jax import report
      log = report.MetricsLog({str(tmp_path)!r})
      log.write({{"stage": "bsq", "epoch": 1, "test_loss": 0.5}})
      log.close()
      print("torch" in sys.modules, os.listdir({str(tmp_path / "tensorboard")!r}))
      import torch
      print(torch.zeros(2).sum().item())
      """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  hidden, files = out[0].split(" ", 1)
  assert hidden == "False" and "events.out.tfevents" in files
  assert out[1] == "0.0"  # the user's own import of torch still works
