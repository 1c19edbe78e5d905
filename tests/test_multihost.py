"""Two processes with two CPU devices each (jax.distributed, gloo) against
one device in this process: the same config and seed give the same params."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from bsq_jax.checkpoint import load_result
from bsq_jax.stages import Run
from tiny import as_flags, copy_run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float activations and a small lr, as in test_train's 1-vs-8-device test:
# only the reduction order differs, and nothing amplifies it.
# No pretraining (the initial model is converted) and one test evaluation:
# the comparison is of BSQ, and every compile costs seconds.
CHANGES = {"stages": "pretrain,convert,bsq", "model.act_bits": 32,
           "pretrain.epochs": 0, "bsq.lr": 0.01, "eval_every": 100}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir: str, **changes):
  """Runs main.py as processes 0 and 1; returns their stdout texts.

  If one fails, the other (left waiting on its peer) is killed at once.
  """
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = [sys.executable, "main.py", "--config=configs/smoke.py",
          f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"] + as_flags(**{**CHANGES, **changes})
  logs = [open(f"{workdir}.{i}.{kind}", "w+") for i in range(2)
          for kind in ("out", "err")]
  procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=ROOT, env=env,
                            stdout=logs[2 * i], stderr=logs[2 * i + 1])
           for i in range(2)]
  deadline = time.time() + 300
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  texts = []
  for f in logs:
    f.seek(0)
    texts.append(f.read())
    f.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}: {texts[2 * i + 1][-3000:]}"
  return texts[0::2]


def test_two_processes_match_one_device(tmp_path):
  one = str(tmp_path / "one")
  Run(tiny_config(**CHANGES, **{"bsq.epochs": 2}), one,
      devices=jax.local_devices()[:1]).run()
  # Both start BSQ from the same converted model (pretrain and convert are
  # the same pmapped code and would only add compile time).
  two = copy_run(one, tmp_path / "two")
  # Two epochs: the second starts from the first's pmap output.
  stdout = _two_processes(two, stages="bsq", **{"bsq.epochs": 2})
  # Only process 0 prints the summary and writes the records.
  assert "| bsq |" in stdout[0] and "| bsq |" not in stdout[1]
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert [(json.loads(line)["stage"], json.loads(line)["epoch"])
            for line in f] == [("bsq", 1), ("bsq", 2)]
  a, b = load_result(two, "bsq"), load_result(one, "bsq")
  assert a.epoch == b.epoch == 2 and a.scheme == b.scheme
  for x, y in zip(jax.tree.leaves(a.state.params),
                  jax.tree.leaves(b.state.params)):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
