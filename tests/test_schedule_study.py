"""benchmarks/schedule_study.py: the schedules the issue asks for, the run
plan, and the report read back from metrics files (fabricated here; the
real study takes over an hour)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import schedule_study as study  # pylint: disable=wrong-import-position
from bsq_jax import config_check  # pylint: disable=wrong-import-position

S = study.STUDY


def test_lengths_span_9x_and_keep_their_fractions():
  assert max(S.lengths) / min(S.lengths) >= 9 and S.targets[0] == 2.0
  for n in S.lengths:
    (epochs, drops), interval = study.bsq_schedule(S, n)
    assert epochs == S.bsq_epochs * n
    assert drops == (round(epochs * 5 / 6),)
    assert interval == round(epochs / 3)  # three host passes before the end
    ft_epochs, ft_drops = study.finetune_schedule(S, n)
    assert ft_epochs == max(3, round(epochs / 2))
    assert ft_drops == (round(ft_epochs * 2 / 3),)


def _done(bits, alpha=1.5):
  return {"average_bits": bits, "alpha": alpha}


def test_every_planned_config_passes_the_checks():
  measured = {study.fixed_name(2.0, n, 0): _done(2.1) for n in S.lengths}
  for run in study.plan(S, measured):
    config_check.check(study.config_for(S, run))


def test_alphas_scale_with_the_length():
  one, nine = study.budget(S, 2.0, 1), study.budget(S, 2.0, 9)
  assert one["bsq.default_alpha"] == pytest.approx(
      9 * nine["bsq.default_alpha"])
  assert one["bsq.budget_alpha_min"] == pytest.approx(
      9 * nine["bsq.budget_alpha_min"])
  assert one["bsq.alpha"] is None and one["bsq.target_bits"] == 2.0
  assert study.fixed(S, 1, 1.0)["bsq.alpha"] == pytest.approx(
      9 * study.fixed(S, 9, 1.0)["bsq.alpha"])


def test_the_search_steps_then_bisects_then_takes_the_nearest():
  # 2.96 bits: 0.96 above, so a larger alpha.
  runs = {r.name: r for r in study.plan(S, {"t2_x1_alpha1": _done(2.96)})}
  nxt = runs["t2_x1_alpha2"]
  assert nxt.stages == "bsq"  # no baselines for a run not accepted
  assert nxt.changes["bsq.alpha"] == pytest.approx(S.fixed_alpha * S.step)
  assert "t2_x1_ft9" not in runs and "t2_x1_seed1" not in runs
  # Then too far below: the next lies between the two.
  measured = {"t2_x1_alpha1": _done(2.96), "t2_x1_alpha2": _done(1.5)}
  name, scale, ok = study.attempts(S, 2.0, 1, measured)[-1]
  assert (name, ok) == ("t2_x1_alpha3", False)
  assert scale == pytest.approx(S.step ** 0.5)
  # Within the tolerance: accepted, with the baselines.
  measured["t2_x1_alpha3"] = _done(2.2)
  assert study.attempts(S, 2.0, 1, measured)[-1][1:] == (
      pytest.approx(S.step ** 0.5), True)
  runs = {r.name: r for r in study.plan(S, measured)}
  assert runs["t2_x1_alpha3"].stages == "bsq,finetune,scratch,hawq"
  assert runs["t2_x1_ft9"].copy_from == "t2_x1_alpha3"
  # Out of tries: the nearest to the target is taken.
  measured.update(t2_x1_alpha3=_done(2.45), t2_x1_alpha4=_done(1.45),
                  t2_x1_alpha5=_done(2.6), t2_x1_alpha6=_done(1.4))
  assert S.tries == 6
  assert study.accepted(S, 2.0, 1, measured) == ("t2_x1_alpha3",
                                                 pytest.approx(S.step ** 0.5))


def test_the_search_aims_at_the_size_as_finetuned():
  """A run that zeroed whole tensors is smaller as finetuned (0 bits
  there) than its BSQ average says: the search reads the former."""
  zeroed = dict(_done(2.1), finetune_average_bits=0.8)
  name, scale, ok = study.attempts(S, 2.0, 1, {"t2_x1_alpha1": zeroed})[-1]
  assert (name, ok) == ("t2_x1_alpha2", False) and scale < 1


def test_a_longer_search_starts_where_the_shorter_one_ended():
  measured = {"t2_x1_alpha1": _done(2.96), "t2_x1_alpha2": _done(2.1)}
  assert study.accepted(S, 2.0, 1, measured)[1] == pytest.approx(S.step)
  runs = {r.name: r for r in study.plan(S, measured)}
  assert runs["t2_x3_alpha1"].changes["bsq.alpha"] == pytest.approx(
      S.fixed_alpha * S.step / 3)
  # With two lengths done, the third extends their trend: 1x took scale
  # 1.6, 3x 1.6^2, so 9x (as far again in log length) starts at 1.6^3.
  measured.update(t2_x3_alpha1=_done(2.9), t2_x3_alpha2=_done(1.9))
  assert study.accepted(S, 2.0, 3, measured)[1] == pytest.approx(S.step ** 2)
  runs = {r.name: r for r in study.plan(S, measured)}
  assert runs["t2_x9_alpha1"].changes["bsq.alpha"] == pytest.approx(
      S.fixed_alpha * S.step ** 3 / 9)


def test_plan_adds_the_runs_that_need_an_accepted_one():
  before = [r.name for r in study.plan(S)]
  assert before == ["base_seed0", "t2_x1_alpha1", "t2_x3_alpha1",
                    "t2_x9_alpha1", "base_seed1", "t2_x1", "t2_x3", "t2_x9"]
  runs = {r.name: r for r in study.plan(S, {"t2_x9_alpha1": _done(1.8, 3.0),
                                            "t2_x1_alpha1": _done(2.1)})}
  assert runs["t2_x9_alpha1"].stages == "bsq,finetune,scratch,hawq"
  assert runs["uniform2_x9"].changes["convert.bits"] == 2
  assert runs["uniform2_x9"].changes["finetune.epochs"] == 27
  # Budget mode beside the rows: BSQ alone.
  assert runs["t2_x9"].stages == "bsq"
  assert runs["t2_x9"].changes["bsq.target_bits"] == 2.0
  # 1x BSQ, finetuned as long as 9x: its BSQ copied, only finetune run.
  long_ft = runs["t2_x1_ft9"]
  assert (long_ft.stages, long_ft.copy_from) == ("finetune", "t2_x1_alpha1")
  assert "bsq" in long_ft.copy_stages
  assert long_ft.changes["finetune.epochs"] == 27
  assert long_ft.changes["bsq.epochs"] == 6
  # The repeat has its own float model: the seed changes every stage.
  assert runs["t2_x1_seed1"].copy_from == "base_seed1"
  assert runs["t2_x1_seed1"].changes["seed"] == 1


def _write(workdir, run, records, config=None):
  os.makedirs(os.path.join(workdir, run), exist_ok=True)
  with open(os.path.join(workdir, run, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if config is not None:
    with open(os.path.join(workdir, run, "config.json"), "w") as f:
      json.dump(config, f)


LAYERS = {"conv1/kernel": 6, "fc/kernel": 2}


def _bsq_run(epochs, bits, ft, hawq, scratch, alphas):
  recs = [dict(stage="bsq", epoch=e + 1, alpha=a, steps=10, average_bits=8.0)
          for e, a in enumerate(alphas[:-1])]
  recs.append(dict(stage="bsq", epoch=epochs, alpha=alphas[-1], steps=10,
                   average_bits=bits, test_accuracy=0.5, bits=LAYERS,
                   budget_report={"met": True}))
  recs += [dict(stage="finetune", epoch=3, test_accuracy=ft,
                average_bits=bits),
           dict(stage="scratch", epoch=3, test_accuracy=scratch),
           dict(stage="hawq", epoch=3, test_accuracy=hawq,
                average_bits=bits - 0.01, bits={**LAYERS, "fc/kernel": 3})]
  return recs


def _fake(workdir):
  for seed in (0, 1):
    _write(workdir, f"base_seed{seed}",
           [dict(stage="pretrain", epoch=e, test_accuracy=0.8 + 0.01 * e)
            for e in (1, 2)])
  # BSQ 6 points behind HAWQ-V2 at 1x, 1 point at 9x.
  for n, (ft, hawq) in {1: (0.80, 0.86), 3: (0.82, 0.86), 9: (0.85, 0.86)}.items():
    _write(workdir, f"t2_x{n}_alpha1", _bsq_run(6 * n, 2.1, ft, hawq, 0.83,
                                               [0.7 / n] * 6 * n),
           {"bsq.alpha": 0.7 / n})
  _write(workdir, "t2_x9", _bsq_run(54, 2.3, None, None, None,
                                    [0.1] * 53 + [0.25])[:54],
         {"bsq.alpha": None, "bsq.default_alpha": 0.111,
          "bsq.budget_alpha_min": 0.0444})
  _write(workdir, "t2_x1_seed1", _bsq_run(6, 2.0, 0.81, 0.865, 0.835,
                                          [0.7] * 6))
  _write(workdir, "t2_x1_ft9", [dict(stage="finetune", epoch=27,
                                     test_accuracy=0.83, average_bits=2.1)])
  _write(workdir, "uniform2_x1", [dict(stage="uniform", epoch=3,
                                       test_accuracy=0.84)])
  return workdir


def test_report_reads_every_run(tmp_path):
  r = study.collect(S, _fake(str(tmp_path / "runs")))
  block = r["targets"][0]
  assert [x["steps"] for x in block["rows"]] == [60, 180, 540]
  assert block["rows"][0]["uniform_acc"] == 0.84
  assert block["rows"][1]["uniform_acc"] is None  # not run
  assert study.repeat_spread(block) == pytest.approx(0.01)
  text = study.markdown(S, r, "python benchmarks/schedule_study.py",
                        {"t2_x1": 60}, {"cpu": "x", "cores": 2, "device": "cpu",
                                        "jax": "0"},
                        str(tmp_path / "plots"), "", "It closes.")
  assert ("| 1x | 60 | 0.7 (fixed) | 2.10 | 50.00% | **80.00%** | 2.09 "
          "| 86.00% | 83.00% | 2 | 84.00% | -6.00 | -3.00 |") in text
  assert "| 9x | 540 |" in text and "| 1x, seed 1 | 60 |" in text
  assert "27 epochs instead of 3): 83.00% against 80.00%" in text
  assert "| conv1 | 6 | 6 | 6 | 6 | 6 | 6 |" in text
  assert "| fc | 2 | 3 | 2 | 3 | 2 | 3 |" in text
  assert "seed 0: 81.00, 82.00" in text
  assert "| t2_x9_alpha1 | 9x | 0.0778 | 2.10 | 2.10 | 50.00% |" in text
  assert ("| t2_x9 | 9x | 0.111 | 0.0444 | 0.25 | 2.30 | 2.30 | yes | "
          "50.00% |") in text
  assert "It closes." in text
  path = study.plot_gaps(S, r, str(tmp_path / "plots"))
  assert os.path.getsize(path) > 0
