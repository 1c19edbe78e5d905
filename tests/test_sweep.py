"""benchmarks/sweep.py: the run plan, the configs, and the report read back
from metrics files (fabricated here; the real sweep takes an hour)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import sweep  # pylint: disable=wrong-import-position
from bsq_jax import config_check  # pylint: disable=wrong-import-position

SMALL = sweep.Preset(train_subset=100, pretrain=(2, (1,)), bsq=(4, (3,)),
                     finetune=(1, ()), requant_interval=2,
                     alphas=(0.5, 1.0, 2.0), targets=(3.0,), uniform_bits=(2, 4))


@pytest.mark.parametrize("name", sorted(sweep.PRESETS))
def test_every_planned_config_passes_the_checks(name):
  preset = sweep.PRESETS[name]
  for run in sweep.plan(preset):
    config_check.check(sweep.config_for(preset, run))


def test_plan_shares_one_pretraining():
  runs = {r.name: r for r in sweep.plan(SMALL)}
  assert list(runs)[0] == "base" and runs["base"].copy_from is None
  for a in SMALL.alphas:  # BSQ and both baselines at every alpha
    assert runs[f"alpha_{a:g}"].stages == "bsq,finetune,scratch,hawq"
  mid = sweep.config_for(SMALL, runs["alpha_1"])
  assert mid.eval_every == SMALL.requant_interval and mid.bsq.alpha == 1.0
  assert sweep.config_for(SMALL, runs["alpha_2"]).eval_every > SMALL.bsq[0]
  target = sweep.config_for(SMALL, runs["target_3"])
  assert target.bsq.alpha is None and target.bsq.target_bits == 3.0
  uniform = runs["uniform_2"]
  assert uniform.copy_stages == ("pretrain",)  # converts at its own bits
  assert sweep.config_for(SMALL, uniform).convert.bits == 2
  assert sweep.config_for(SMALL, uniform, seed=3).seed == 3


def test_uniform_runs_follow_the_measured_bits():
  names = [r.name for r in sweep.plan(SMALL, [6.4, 2.5, 2.49, 0.3, 9.0])]
  # SMALL's own 2 and 4, and the nearest whole precision of each, in 1..8.
  assert [n for n in names if n.startswith("uniform_")] == [
      "uniform_1", "uniform_2", "uniform_3", "uniform_4", "uniform_6",
      "uniform_8"]
  assert sweep.nearest_bits(2.5) == 3 and sweep.nearest_bits(2.49) == 2


def test_scale_multiplies_every_epoch_count():
  half = sweep.scaled(sweep.PRESETS["full"], 0.5)
  assert half.pretrain == (175, (75, 125, 162))
  assert half.bsq == (175, (125,)) and half.requant_interval == 50
  assert sweep.scaled(SMALL, 0.01).bsq == (1, (1,))  # never below 1


def _write(workdir, run, records):
  os.makedirs(os.path.join(workdir, run), exist_ok=True)
  with open(os.path.join(workdir, run, "metrics.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _bsq(bits, acc, alpha=1.0, **extra):
  return dict(stage="bsq", epoch=4, alpha=alpha, average_bits=bits,
              compression=32 / bits, test_accuracy=acc,
              bits={"fc/kernel": 8, "conv1/kernel": 6, "layer1_0/conv1/kernel": 4},
              **extra)


@pytest.fixture
def fake_sweep(tmp_path):
  w = str(tmp_path)
  _write(w, "base", [dict(stage="pretrain", epoch=2, test_accuracy=0.90),
                     dict(stage="convert", epoch=0, test_accuracy=0.89)])
  # alpha 2 keeps more bits than alpha 1: a sweep that breaks the claim.
  for alpha, bits in ((0.5, 6.0), (1.0, 3.0), (2.0, 4.5)):
    recs = [dict(stage="bsq", epoch=1, alpha=alpha, average_bits=8.0),
            _bsq(bits, 0.80, alpha),
            dict(stage="finetune", epoch=1, test_accuracy=0.85)]
    if alpha == 1.0:
      recs.append(dict(stage="scratch", epoch=1, test_accuracy=0.87))
    _write(w, f"alpha_{alpha:g}", recs)
  _write(w, "target_3", [
      dict(stage="bsq", epoch=1, alpha=1.0, average_bits=8.0),
      _bsq(3.1, 0.70, 2.5, budget_report={"met": False}),
      dict(stage="finetune", epoch=1, test_accuracy=0.84)])
  for b in (2, 4):
    _write(w, f"uniform_{b}", [
        dict(stage="convert", epoch=0, test_accuracy=0.1 * b),
        dict(stage="uniform", epoch=1, test_accuracy=0.2 * b,
             compression=32 / b)])
  return w


def test_report_reads_every_run(fake_sweep, tmp_path):
  result = sweep.collect(SMALL, fake_sweep)
  assert result["float"] == 0.90
  assert [x["bits"] for x in result["alphas"]] == [6.0, 3.0, 4.5]
  assert result["alphas"][1]["scratch_acc"] == 0.87
  assert result["alphas"][0]["scratch_acc"] is None
  assert result["curve"]["alpha"] == 1.0
  assert result["curve"]["bits"] == [8.0, 8.0, 3.0]  # starts at the conversion
  target = result["targets"][0]
  assert (target["alpha_first"], target["alpha_last"]) == (1.0, 2.5)
  assert target["met"] is False
  text = sweep.markdown(SMALL, result, "python benchmarks/sweep.py", {"base": 60},
                        str(tmp_path / "plots"), {"cpu": "x", "cores": 2,
                                                  "device": "cpu", "jax": "0"})
  assert text.splitlines()[2] == "Command: `python benchmarks/sweep.py`"
  assert "| 1 | 3.00 | 10.67x | 80.00% | 85.00% | 87.00% |" in text
  assert "| 3 | 3.10 | no |" in text
  assert "| 2 | 16.00x | 20.00% | 40.00% |" in text
  assert "Larger alpha gives fewer bits: no" in text
  assert "does not beat from-scratch" in text
  assert "Budget target 3 bits: 3.10 bits, 0.10 from the target" in text
  # 84% against the sweep's 85% at 3.10 bits (between 3.0 and 4.5 bits).
  assert ("finetuned 84.00%, worse than the sweep's curve at 3.10 bits "
          "(85.00%)") in text


def test_budget_runs_against_the_sweeps_curve():
  rows = [{"bits": 3.0, "ft_acc": 0.80}, {"bits": 5.0, "ft_acc": 0.84},
          {"bits": 7.0, "ft_acc": 0.86}]
  got = sweep.against_sweep(rows, {"bits": 4.0, "ft_acc": 0.82})
  assert got == ("finetuned 82.00%, no worse than the sweep's curve at 4.00 "
                 "bits (82.00%)")
  got = sweep.against_sweep(rows, {"bits": 2.0, "ft_acc": 0.79})
  assert got == ("finetuned 79.00%, worse than the sweep's nearest point, "
                 "3.00 bits (80.00%; the sweep spans 3.00-7.00 bits)")
  assert "no worse" in sweep.against_sweep(rows, {"bits": 7.5, "ft_acc": 0.9})
  assert sweep.against_sweep([], {"bits": 4.0, "ft_acc": 0.8}) == (
      "no alpha sweep to compare with")


def test_plots_are_written(fake_sweep, tmp_path):
  paths = sweep.plots(SMALL, sweep.collect(SMALL, fake_sweep),
                      str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == [
      "accuracy_vs_bits.png", "layer_bits.png", "bsq_by_epoch.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_shown_command_is_the_one_that_trains():
  assert sweep.shown_command(["--preset", "cpu", "--report-only", "--note",
                              "shared machine", "--out=x.md"]) == (
      "python benchmarks/sweep.py --preset cpu --out=x.md")
  assert sweep.shown_command(["--note=a b"]) == "python benchmarks/sweep.py "


def test_layers_go_from_input_to_classifier():
  names = ["fc/kernel", "layer2_0/conv1/kernel", "conv1/kernel",
           "layer1_0/conv1/kernel"]
  assert sorted(names, key=sweep.layer_order) == [
      "conv1/kernel", "layer1_0/conv1/kernel", "layer2_0/conv1/kernel",
      "fc/kernel"]
