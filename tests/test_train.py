"""The pipeline end to end on synthetic data, on 8 forced CPU devices."""

import json
import struct
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from bsq_jax import augment
from bsq_jax import bitplanes as bp
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import load_result
from bsq_jax.stage_loop import Diverged
from bsq_jax.stages import Run
from bsq_jax.train import train_and_evaluate
from tiny import as_flags, copy_run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  scalars = tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  assert scalars["bsq/train_loss"] == pytest.approx(bsq["train_loss"],
                                                    rel=1e-6)
  assert scalars["bsq/average_bits"] == pytest.approx(bsq["average_bits"])


def tensorboard_scalars(folder):
  """{tag: last value} of the event files in `folder` (TFRecord framing:
  length, its CRC, an Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  values = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    at = 0
    while at + 12 <= len(data):
      length = struct.unpack("<Q", data[at:at + 8])[0]
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      for value in event.summary.value:
        values[value.tag] = value.simple_value
      at += 12 + length + 4
  return values


def test_rerun_skips_finished_stages(finished_run):
  workdir, table = finished_run
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  run = Run(tiny_config(), workdir)
  assert run.run() == table
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
  assert not run.loop._trainers  # nothing was compiled: every stage was skipped


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
  from bsq_jax.packed_loader import load_model
  workdir, _ = finished_run
  result = load_result(workdir)
  path = str(tmp_path / "model.bsq")
  stats = export.export_model(path, result.model_config, result.mode,
                              result.scheme, result.variables)
  assert stats.file_bytes == os.path.getsize(path)
  model, variables = load_model(path)
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
  with pytest.raises(ValueError, match="holds a run of other settings: "
                     "model.width"):
    Run(tiny_config(**{"model.width": 8}), workdir)


def test_divergence_stops_with_epoch_and_steps(tmp_path):
  config = tiny_config(**{"stages": "pretrain", "pretrain.epochs": 2,
                          "pretrain.lr": 1e30})
  # Step 1 sees the initial weights; its update sends step 2 to nan/inf.
  # The message names the first parameter that is no longer finite.
  with pytest.raises(Diverged, match=r"stage pretrain: loss became (nan|inf),"
                     r" parameter \S+ is not finite in epoch 1, step 2; no "
                     r"checkpoint of this stage"):
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
  trainer = run.loop.trainer("bsq", scheme, state.params, config.bsq)
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
  state = run.loop.fresh_momentum("bsq", scheme2,
                                 state._replace(params=params), config.bsq)
  trainer2 = run.loop.trainer("bsq", scheme2, params, config.bsq)
  assert trainer2 is not trainer
  for epoch in range(2):
    for state, _, _ in trainer2.train_epoch(state, run.train, 0, epoch):
      pass
  assert trainer2.traces == 1 and trainer.traces == 1


def test_budget_mode_reaches_4_bits_from_8(finished_run, tmp_path):
  """A tiny model asked for 4 average bits gets there from 8 within 0.5 bits,
  with alpha steered per epoch (seen: 3.996 bits, alpha 2 -> 4 -> ... ->
  1.84). Its plant has a cliff (alpha 8 took 4 bits in one epoch), so the
  controller gets 12 epochs, not 6: with 6 it ended at 1.9-3.3 bits."""
  config = tiny_config(**{"stages": "bsq",
                          "bsq.alpha": None, "bsq.target_bits": 4.0,
                          "bsq.epochs": 12, "bsq.requant_interval": 3,
                          "bsq.lr": 0.05, "bsq.default_alpha": 2.0,
                          "bsq.budget_alpha_min": 0.1,
                          "bsq.budget_alpha_max": 100.0, "eval_every": 100})
  workdir = copy_run(finished_run[0], tmp_path / "run")
  train_and_evaluate(config, workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  bsq = [r for r in records if r["stage"] == "bsq"]
  assert records[0]["average_bits"] == 8.0  # the conversion it started from
  assert len({r["alpha"] for r in bsq}) > 1
  assert all("budget_measured" in r for r in bsq)
  final = bsq[-1]
  assert abs(final["average_bits"] - 4.0) <= 0.5
  rep = final["budget_report"]
  assert rep["final"] == pytest.approx(final["average_bits"])
  assert rep["met"] == (final["average_bits"] <= 4.0)
  assert rep["excess"] == pytest.approx(max(0.0, final["average_bits"] - 4.0))


def test_bsq_that_zeroes_every_weight_says_so(finished_run, tmp_path,
                                              capsys):
  """alpha 2000 leaves every quantized weight tensor at 1 bit with no bit
  set; finetuning holds them at 0 bits (docs/algorithm.md). One
  warning says what happened and what to do, the records count the all-zero
  tensors, the summary gives the bsq row's bits as finetuned, and the test
  loss is the model's (XLA:CPU once computed 0.0 for it: see
  test_bitplanes' precision-zero test)."""
  workdir = copy_run(finished_run[0], tmp_path / "run")
  config = tiny_config(**{"stages": "bsq,finetune,scratch",
                          "bsq.alpha": 2000.0})
  table = train_and_evaluate(config, workdir)
  shown = capsys.readouterr().err.splitlines()
  warned = [l for l in shown
            if l.startswith("warning: BSQ left nothing to quantize")]
  # A Python caller sees the run's progress too, absl logging untouched:
  # the stage of the run, the precision each host pass reaches, the ETA.
  assert any(l.startswith("[1/3] bsq host pass after epoch 1: ") and
             "conv1=1" in l for l in shown), shown
  assert any(l.startswith("[1/3] bsq epoch 1/") and "run eta" in l
             for l in shown), shown
  assert len(warned) == 1 and "lower alpha (bsq.alpha)" in warned[0]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = {r["stage"]: r for r in map(json.loads, f)}
  bsq = last["bsq"]
  weights = [k for k in bsq["bits"] if not k.endswith("/bias")]
  assert all(bsq["bits"][k] == 1 for k in weights)
  assert bsq["zero_tensors"] >= len(weights)
  assert bsq["finetune_average_bits"] < bsq["average_bits"]
  shown = (f"| bsq | {bsq['average_bits']:.2f} "
           f"({bsq['finetune_average_bits']:.4f} as finetuned) |")
  assert shown in table
  assert (f"{bsq['zero_tensors']} of {len(bsq['bits'])} quantized tensors"
          in table)
  run = Run(config, workdir)  # finished: for its test set and models only
  images = augment.normalize(np.asarray(run.test.images.addressable_data(0)),
                             run.test.mean, run.test.std)
  labels = np.asarray(run.test.labels.addressable_data(0))
  for stage in ("finetune", "scratch"):
    record, result = last[stage], load_result(workdir, stage)
    assert record["zero_tensors"] == bsq["zero_tensors"]
    assert record["average_bits"] == bsq["finetune_average_bits"]
    # Op by op, outside jit: no fusion of XLA's between the layers.
    logits = run.loop.model("finetune", result.scheme).apply(
        result.variables, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert record["test_loss"] == pytest.approx(float(np.mean(loss)),
                                                rel=1e-5)


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


def test_damaged_conversion_is_set_aside_and_redone(finished_run, tmp_path):
  workdir = copy_run(finished_run[0], tmp_path / "run")
  want = load_result(workdir, "convert").state.params
  checkpoints = tmp_path / "run" / "convert" / "checkpoints"
  for f in (checkpoints / "0").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00")
  train_and_evaluate(tiny_config(**{"stages": "convert"}), workdir)
  assert (checkpoints / "0.unreadable").is_dir()
  got = load_result(workdir, "convert").state.params
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def _records(workdir):
  """metrics.jsonl without the wall-clock field, which no rerun repeats."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
            for line in f]


def test_sigkill_anywhere_then_resume_equals_uninterrupted(finished_run,
                                                           tmp_path):
  """BSQ is killed with SIGKILL right after a host pass that changed the
  precision, mid-epoch, and while a checkpoint is being written, each time
  restarted in the same workdir; the final parameters and metrics are those
  of a run that was never interrupted."""
  # Host passes at epochs 0 (no change from the conversion), 2 and 4; one
  # test evaluation. Each new scheme is a compile, so few of them.
  changes = {"stages": "bsq", "bsq.epochs": 4, "bsq.requant_interval": 2,
             "eval_every": 100}
  want = copy_run(finished_run[0], tmp_path / "want")
  train_and_evaluate(tiny_config(**changes), want)
  got = copy_run(finished_run[0], tmp_path / "got")
  for die_at in ("host_pass:1", "step:2", "save:1"):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/smoke.py",
         f"--workdir={got}", *as_flags(**changes)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, BSQ_JAX_DIE_AT=die_at),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, (die_at, result.stderr[-3000:])
  train_and_evaluate(tiny_config(**changes), got)  # the last restart ends it
  a, b = load_result(want, "bsq"), load_result(got, "bsq")
  assert a.epoch == b.epoch == 4 and a.scheme == b.scheme
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(x, y)
  assert _records(got) == _records(want)

