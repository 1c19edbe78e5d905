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


LAYERS = {"fc/kernel": 8, "conv1/kernel": 6, "layer1_0/conv1/kernel": 4}


def _alpha_run(alpha, bits, ft, scratch, hawq, ft_bits=None):
  ft_bits = bits if ft_bits is None else ft_bits
  return [dict(stage="bsq", epoch=1, alpha=alpha, average_bits=8.0),
          _bsq(bits, 0.80, alpha),
          dict(stage="finetune", epoch=1, test_accuracy=ft,
               average_bits=ft_bits),
          dict(stage="scratch", epoch=1, test_accuracy=scratch,
               average_bits=ft_bits),
          dict(stage="hawq", epoch=0, average_bits=ft_bits - 0.01,
               bits=dict(LAYERS, fc=7)),
          dict(stage="hawq", epoch=1, test_accuracy=hawq,
               average_bits=ft_bits - 0.01, bits=dict(LAYERS, fc=7))]


def _fake(w, float_acc=0.90, shift=0.0, bits_shift=0.0):
  _write(w, "base", [dict(stage="pretrain", epoch=2, test_accuracy=float_acc),
                     dict(stage="convert", epoch=0, test_accuracy=0.89)])
  # alpha 2 keeps more bits than alpha 1: a sweep that breaks the claim.
  # BSQ: 2 points ahead of scratch at alpha 1 (beyond the ~0.8 point band),
  # 2 behind hawq at alpha 0.5, level elsewhere.
  rows = {0.5: (6.0, 0.85, 0.85, 0.87, None), 1.0: (3.0, 0.88, 0.86, 0.88, None),
          2.0: (4.5, 0.85, 0.85, 0.85, 4.25)}
  for alpha, (bits, ft, scratch, hawq, ft_bits) in rows.items():
    _write(w, f"alpha_{alpha:g}", _alpha_run(
        alpha, bits + bits_shift, ft + shift, scratch, hawq, ft_bits))
  _write(w, "target_3", [
      dict(stage="bsq", epoch=1, alpha=1.0, average_bits=8.0),
      _bsq(3.1, 0.70, 2.5, budget_report={"met": False}),
      dict(stage="finetune", epoch=1, test_accuracy=0.84)])
  for b in (2, 3, 4, 6):
    _write(w, f"uniform_{b}", [
        dict(stage="convert", epoch=0, test_accuracy=0.1 * b),
        dict(stage="uniform", epoch=1, test_accuracy=0.1 * b + 0.3,
             compression=32 / b)])
  return w


@pytest.fixture
def fake_sweep(tmp_path):
  return _fake(str(tmp_path / "run1"))


MACHINE = {"cpu": "x", "cores": 2, "device": "cpu", "jax": "0"}


def test_report_reads_every_run(fake_sweep, tmp_path):
  result = sweep.collect(SMALL, fake_sweep)
  assert result["float"] == 0.90
  assert [x["bits"] for x in result["alphas"]] == [6.0, 3.0, 4.5]
  row = result["alphas"][1]
  assert (row["scratch_acc"], row["hawq_acc"], row["hawq_bits"]) == (
      0.86, 0.88, 2.99)
  # Uniform at each result's nearest whole precision (4.5 -> 5: not run).
  assert [(x["uniform_bits"], x["uniform_acc"]) for x in result["alphas"]] == [
      (6, pytest.approx(0.9)), (3, pytest.approx(0.6)), (5, None)]
  assert [u["bits"] for u in result["uniform"]] == [2, 3, 4, 6]
  assert result["curve"]["alpha"] == 1.0
  assert result["curve"]["bits"] == [8.0, 8.0, 3.0]  # starts at the conversion
  target = result["targets"][0]
  assert (target["alpha_first"], target["alpha_last"]) == (1.0, 2.5)
  assert target["met"] is False
  text = sweep.markdown(SMALL, result, "python benchmarks/sweep.py", {"base": 60},
                        str(tmp_path / "plots"), MACHINE)
  assert text.splitlines()[2] == "Command: `python benchmarks/sweep.py`"
  assert ("| 1 | 3.00 | 80.00% | **88.00%** | 2.99 | 88.00% | 86.00% | 3 | "
          "60.00% |") in text
  assert "| 2 | 4.50 (4.25 finetuned) | 80.00% | **85.00%** | 4.24 |" in text
  assert "| 3 | 3.10 | no |" in text
  assert "| 2 | 16.00x | 20.00% | 50.00% |" in text
  assert "Larger alpha gives fewer bits: fails.** Average bits at alpha " \
         "0.5, 1, 2: 6.00, 3.00, 4.50." in text
  # 88% at 3.00 bits: 2 points below float 90%.
  assert "close to float at about 2-3 bits (within 1 point): fails." in text
  assert "BSQ beats from-scratch at the same scheme: holds** (BSQ ahead " \
         "beyond the noise at 1 of 3 alphas, behind at 0" in text
  assert "BSQ beats a Hessian-aware allocation at the same size: fails**" in text
  assert "Budget target 3 bits: 3.10 bits, 0.10 from the target" in text
  assert "Repeatability" not in text


def test_claims_read_differences_within_the_noise_as_ties():
  rows = [{"alpha": a, "bits": b, "ft_acc": 0.880, "scratch_acc": s,
           "hawq_acc": 0.880} for a, b, s in ((0.1, 7.0, 0.875), (1.0, 2.5, 0.873))]
  r = {"alphas": rows, "float": 0.885, "targets": []}
  text = "\n".join(sweep.claims(r))
  assert "Larger alpha gives fewer bits: holds.** Average bits at alpha " \
         "0.1, 1: 7.00 > 2.50." in text
  assert "(within 1 point): holds." in text  # 0.5 points below float
  assert "from-scratch at the same scheme: within noise**" in text
  # A spread of the repeat larger than 1 point widens the band: still ties;
  # a 0.1 point band (impossible on 10,000 images) is not used below 0.9.
  assert sweep.noise(0.88) == pytest.approx(0.009, abs=3e-4)
  assert sweep.noise(0.88, 0.02) == 0.02
  assert sweep.compare(rows, "scratch_acc", None)["verdict"] == "within noise"
  worse = [dict(x, scratch_acc=0.90) for x in rows]
  assert sweep.compare(worse, "scratch_acc", None)["verdict"] == "fails"
  mixed = [dict(rows[0], scratch_acc=0.90), dict(rows[1], scratch_acc=0.86)]
  assert sweep.compare(mixed, "scratch_acc", None)["verdict"] == "mixed"
  assert sweep.compare(mixed, "scratch_acc", 0.03)["verdict"] == "within noise"


def test_repeat_gives_the_spread(fake_sweep, tmp_path):
  other = _fake(str(tmp_path / "run2"), float_acc=0.91, shift=0.01,
                bits_shift=0.2)
  r1, r2 = sweep.collect(SMALL, fake_sweep), sweep.collect(SMALL, other)
  s = sweep.spread(r1, r2)
  assert s["max_bits"] == pytest.approx(0.2)
  assert s["max_acc"] == pytest.approx(0.01)  # BSQ moved; baselines did not
  assert s["median_acc"] == pytest.approx(0.0)
  assert s["float"] == pytest.approx(0.01)
  text = sweep.markdown(SMALL, r1, "c", {"base": 1}, str(tmp_path / "p"),
                        MACHINE, repeat=(r2, "Run 2: seed 1."))
  assert "## Repeatability\n\nRun 2: seed 1." in text
  assert "| 1 | 3.00 -> 3.20 | +1.00 | +0.00 | +0.00 | +0.00 |" in text
  assert "| 2 | 4.50 -> 4.70 | +1.00 | +0.00 | +0.00 | - |" in text
  assert "Average bits moved at most 0.20" in text


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
                              "shared machine", "--out=x.md", "--repeat", "w2",
                              "--repeat-note=seed 1"]) == (
      "python benchmarks/sweep.py --preset cpu --out=x.md")
  assert sweep.shown_command(["--note=a b"]) == "python benchmarks/sweep.py "


def test_layers_go_from_input_to_classifier():
  names = ["fc/kernel", "layer2_0/conv1/kernel", "conv1/kernel",
           "layer1_0/conv1/kernel"]
  assert sorted(names, key=sweep.layer_order) == [
      "conv1/kernel", "layer1_0/conv1/kernel", "layer2_0/conv1/kernel",
      "fc/kernel"]


def test_repeat_from_an_older_figures_json(fake_sweep, tmp_path):
  """A repeat whose workdirs are gone: its figures.json, written by an
  older report without the hawq and uniform columns, still gives the
  spread of what it has; the columns it lacks show '-'."""
  r1 = sweep.collect(SMALL, fake_sweep)
  old = json.loads(json.dumps(sweep.collect(SMALL, _fake(
      str(tmp_path / "run0"), shift=-0.02))))
  for x in old["alphas"]:
    for key in ("hawq_acc", "hawq_bits", "hawq_layers", "uniform_acc",
                "uniform_bits", "ft_bits"):
      del x[key]
  path = tmp_path / "figures.json"
  path.write_text(json.dumps(old))
  r2 = sweep.read_repeat(SMALL, str(path))
  s = sweep.spread(r1, r2)
  assert s["max_acc"] == pytest.approx(0.02)
  assert [x["hawq_acc"] for x in s["rows"]] == [None, None, None]
  text = "\n".join(sweep.spread_lines(s, "Run 2: older."))
  assert "| 1 | 3.00 -> 3.00 | -2.00 | - | +0.00 | - |" in text
