"""The pipeline end to end on synthetic data, on 8 forced CPU devices."""

import json
import os

import jax
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import load_result
from bsq_jax.train import Diverged, Run, train_and_evaluate
from tiny import copy_run, tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  table = train_and_evaluate(tiny_config(), workdir)
  return workdir, table


def test_all_stages_run_and_summarize(finished_run):
  workdir, table = finished_run
  for stage in ("pretrain", "convert", "bsq", "finetune", "scratch"):
    assert f"| {stage} |" in table
  with open(os.path.join(workdir, "summary.md")) as f:
    assert f.read() == table
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  bsq = [r for r in records if r["stage"] == "bsq"][-1]
  for field in ("lr", "train_loss", "penalty", "test_accuracy", "average_bits",
                "compression", "bits", "alpha"):
    assert field in bsq
  assert bsq["average_bits"] < 8.0  # alpha 20 removed planes in one epoch
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_rerun_skips_finished_stages(finished_run):
  workdir, table = finished_run
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  run = Run(tiny_config(), workdir)
  assert run.run() == table
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
  assert not run._trainers  # nothing was compiled: every stage was skipped


def test_results_rebuild_from_workdir(finished_run):
  workdir, _ = finished_run
  bsq = load_result(workdir, "bsq")
  assert bsq.mode == "bsq" and sch.scheme_of(bsq.state.params) == bsq.scheme
  ft = load_result(workdir)
  assert ft.stage == "finetune" and ft.mode == "finetune"
  scratch = load_result(workdir, "scratch")
  assert scratch.scheme == ft.scheme  # the scheme BSQ found
  # Finetuning keeps every c in [-1, 1].
  for _, levels in sch.quantized(ft.state.params):
    assert np.abs(np.asarray(levels.c)).max() <= 1.0


def test_export_and_inspect_a_finished_run(finished_run, tmp_path):
  """The packed file of a run reproduces its logits; run and file inspect alike."""
  from bsq_jax import export, inspect_model
  from bsq_jax.layers import Quant
  from bsq_jax.models import build_model
  workdir, _ = finished_run
  result = load_result(workdir)
  path = str(tmp_path / "model.bsq")
  stats = export.export_model(path, result.model_config, result.mode,
                              result.scheme, result.variables)
  assert stats.file_bytes == os.path.getsize(path)
  model, variables = export.load_model(path)
  trained = build_model(result.model_config,
                        Quant(result.mode, result.scheme))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.apply(variables, x),
                                trained.apply(result.variables, x))
  from_run = inspect_model.inspect_run(workdir)
  from_file = inspect_model.inspect_file(path)
  assert from_run.rows == from_file.rows
  assert from_run.total_bits == sch.account(result.state.params,
                                            result.scheme).total_bits


def test_workdir_of_another_model_is_refused(finished_run):
  workdir, _ = finished_run
  with pytest.raises(ValueError, match="holds a run of another model"):
    Run(tiny_config(**{"model.width": 8}), workdir)


def test_divergence_stops_with_epoch_and_steps(tmp_path):
  config = tiny_config(**{"stages": "pretrain", "pretrain.epochs": 2,
                          "pretrain.lr": 1e30})
  # Step 1 sees the initial weights; its update sends step 2 to nan/inf.
  with pytest.raises(Diverged, match=r"stage pretrain: loss became (nan|inf)"
                     r" in epoch 1, step 2; no checkpoint of this stage"):
    train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "pretrain" / "checkpoints" / "1")


def test_same_parameters_on_one_and_eight_devices(tmp_path):
  """A BSQ stage (from the same converted model) on 1 and 8 devices.

  Only the float reduction order differs, so parameters agree to float
  tolerance. Float activations and a small lr keep those 1e-7 differences
  from being amplified by rounding ties in the 4-bit activation quantizer
  and by 12 steps of a tiny, noisy model.
  """
  config = tiny_config(**{"stages": "pretrain,convert",
                          "model.act_bits": 32, "pretrain.lr": 0.01,
                          "bsq.lr": 0.01})
  Run(config, str(tmp_path / "base"), devices=jax.local_devices()[:1]).run()
  config.stages = "bsq"
  params = {}
  for n in (1, 8):
    workdir = copy_run(str(tmp_path / "base"), tmp_path / f"d{n}")
    Run(config, workdir, devices=jax.local_devices()[:n]).run()
    params[n] = load_result(workdir, "bsq").state
  assert len(jax.local_devices()) == 8
  for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[8])):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_scheme_change_compiles_once(finished_run, tmp_path):
  config = tiny_config(stages="convert")
  workdir = copy_run(finished_run[0], tmp_path / "run")
  run = Run(config, workdir)
  start = load_result(workdir, "convert")
  state = start.state
  scheme = dict(start.scheme)
  trainer = run.trainer("bsq", scheme, state.params, config.bsq)
  for epoch in range(2):
    for state, _, _ in trainer.train_epoch(state, run.train, 0, epoch):
      pass
  assert trainer.traces == 1
  # A changed scheme: one new trainer, traced once, however many epochs.
  zero = lambda v: v._replace(pos=np.zeros_like(v.pos), neg=np.zeros_like(v.neg))
  params = sch.map_nodes(lambda p, v: bp.requantize(zero(v))
                         if p == "conv1/kernel" else v,
                         jax.device_get(state.params))
  scheme2 = sch.scheme_of(params)
  assert scheme2 != scheme
  state = run._fresh_momentum("bsq", scheme2, state._replace(params=params),
                              config.bsq)
  trainer2 = run.trainer("bsq", scheme2, params, config.bsq)
  assert trainer2 is not trainer
  for epoch in range(2):
    for state, _, _ in trainer2.train_epoch(state, run.train, 0, epoch):
      pass
  assert trainer2.traces == 1 and trainer.traces == 1


def test_budget_mode_steers_alpha(finished_run, tmp_path):
  """The controller changes alpha per epoch and reports on the target.

  A tiny model over 4 short epochs does not reach 4 bits (seen: 5.9 bits
  after 10 epochs); the simulated plants of test_budget.py test the rule.
  """
  config = tiny_config(**{"stages": "bsq",
                          "bsq.alpha": None, "bsq.target_bits": 4.0,
                          "bsq.epochs": 4, "bsq.requant_interval": 2,
                          "bsq.lr": 0.02, "bsq.default_alpha": 4.0,
                          "bsq.budget_alpha_max": 50.0})
  workdir = copy_run(finished_run[0], tmp_path / "run")
  train_and_evaluate(config, workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  bsq = [r for r in records if r["stage"] == "bsq"]
  assert len({r["alpha"] for r in bsq}) > 1
  assert all("budget_measured" in r for r in bsq)
  final = bsq[-1]
  assert final["average_bits"] < 8.0
  rep = final["budget_report"]
  assert rep["final"] == pytest.approx(final["average_bits"])
  assert rep["met"] == (final["average_bits"] <= 4.0)
  assert rep["excess"] == pytest.approx(max(0.0, final["average_bits"] - 4.0))


def test_uniform_baseline_and_eval_every(finished_run, tmp_path):
  """`uniform` finetunes the conversion at convert.bits in every layer; with
  eval_every 2 only epochs 2 and 3 (the last) are tested."""
  config = tiny_config(**{"stages": "convert,uniform", "convert.bits": 3,
                          "finetune.epochs": 3, "eval_every": 2})
  workdir = copy_run(finished_run[0], tmp_path / "run", ("pretrain",))
  table = train_and_evaluate(config, workdir)
  assert "| uniform |" in table
  result = load_result(workdir, "uniform")
  assert result.mode == "finetune" and set(result.scheme.values()) == {3}
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  uniform = [r for r in records if r["stage"] == "uniform"]
  assert [("test_accuracy" in r) for r in uniform] == [False, True, True]
  assert all(r["average_bits"] == 3.0 for r in uniform)


def test_unreadable_latest_checkpoint_is_set_aside_and_redone(tmp_path):
  """A damaged newest checkpoint is reported and moved aside, and its epoch
  is trained again from the one before: the result equals the undamaged
  run's, bit for bit (the data order depends only on seed and epoch)."""
  config = tiny_config(**{"stages": "pretrain", "pretrain.epochs": 2})
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  want = load_result(workdir, "pretrain").state.params
  checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
  for f in (checkpoints / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  train_and_evaluate(config, workdir)
  assert (checkpoints / "2.unreadable").is_dir()  # kept, not deleted
  got = load_result(workdir, "pretrain")
  assert got.epoch == 2 and got.meta["finished"]
  for a, b in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    epochs = [json.loads(line)["epoch"] for line in f]
  assert epochs == [1, 2]
