"""Two processes with two CPU devices each (jax.distributed, gloo) against
one device in this process: the same config and seed give the same params."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from bsq_jax.checkpoint import load_result
from bsq_jax.train import Run
from configs import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float activations and a small lr, as in test_train's 1-vs-8-device test:
# only the reduction order differs, and nothing amplifies it.
CHANGES = {"stages": "pretrain,convert,bsq", "model.width": 4,
           "data.synthetic_train": 256, "data.synthetic_test": 64,
           "eval_batch_size": 64, "model.act_bits": 32, "pretrain.lr": 0.01,
           "bsq.lr": 0.01, "bsq.alpha": 20.0}


def _config():
  c = smoke.get_config()
  for key, value in CHANGES.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir: str):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = [sys.executable, "main.py", "--config=configs/smoke.py",
          f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"] + [f"--config.{k}={v}" for k, v in CHANGES.items()]
  procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def test_two_processes_match_one_device(tmp_path):
  stdout = _two_processes(str(tmp_path / "mh"))
  # Only process 0 prints the summary and writes the records.
  assert "| bsq |" in stdout[0] and "| bsq |" not in stdout[1]
  with open(tmp_path / "mh" / "metrics.jsonl") as f:
    stages = [json.loads(line)["stage"] for line in f]
  assert stages == ["pretrain", "convert", "bsq"]

  Run(_config(), str(tmp_path / "one"), devices=jax.local_devices()[:1]).run()
  two = load_result(str(tmp_path / "mh"), "bsq")
  one = load_result(str(tmp_path / "one"), "bsq")
  assert two.scheme == one.scheme
  for a, b in zip(jax.tree.leaves(two.state.params),
                  jax.tree.leaves(one.state.params)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
