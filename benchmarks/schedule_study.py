"""Does BSQ catch up with HAWQ-V2 when it has time? Matched bits, longer
schedules, on Fashion-MNIST.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/schedule_study.py --out results/fashion_mnist_schedule.md

At a fixed target of average bits, the BSQ schedule is lengthened 1x, 3x
and 9x. Each length's row is a fixed-alpha BSQ run whose alpha a short
search finds (alpha x steps held at first, then bisected until the bits
land within 0.3 of the target). At each length every method gets the same
finetuning, which grows with it (about half the BSQ epochs, at least 3):
BSQ then finetuned; HAWQ-V2 at BSQ's finetuned size; from-scratch at BSQ's
scheme; uniform at the nearest whole precision. Learning-rate drops sit at
the same fractions of every schedule and BSQ re-quantizes every third of
its schedule. Besides:
- 1x BSQ with the longest finetuning: what longer finetuning alone gives;
- 1x again from another seed (its own float model): the noise;
- budget mode (`bsq.target_bits`) at each length, beside the rows.

All runs share one float pretraining (per seed), tested every epoch so that
its curve shows it has flattened. Each run is a workdir under --workdir:
an interrupted study resumes where it stopped, and --report-only rewrites
the report from finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from bsq_jax.checkpoint import copy_stages
from configs import fashion_mnist_resnet20
import sweep
from sweep import Planned as Run
from sweep import last, nearest_bits, noise, pct, records

Schedule = Tuple[int, Tuple[int, ...]]  # (epochs, lr milestones)


@dataclasses.dataclass(frozen=True)
class Study:
  depth: int                  # CIFAR ResNet depth (6k+2)
  train_subset: int           # first N training images
  image_size: int             # 28: Fashion-MNIST unpadded
  pretrain: Schedule
  bsq_epochs: int             # at 1x
  lengths: Tuple[int, ...]    # multiples of the 1x BSQ schedule
  targets: Tuple[float, ...]  # average bits, budget mode
  # The rows' fixed alpha at 1x, searched: a schedule n times longer takes
  # 1/n of it (the same alpha x steps) times the search's scale.
  fixed_alpha: float
  # Budget mode's first alpha and its floor at 1x, scaled alike.
  start_alpha: float
  floor_alpha: float
  alpha_max: float
  tolerance: float = 0.3      # bits from the target that a row may land
  tries: int = 6              # fixed-alpha runs per length at most
  step: float = 1.6           # the search's factor before it brackets
  repeat_seed: int = 1


STUDY = Study(depth=8, train_subset=6000, image_size=28,
              pretrain=(20, (12, 17)), bsq_epochs=6, lengths=(1, 3, 9),
              targets=(2.0,), fixed_alpha=0.7, start_alpha=1.0,
              floor_alpha=0.4, alpha_max=20.0)

# Fractions of a schedule where the learning rate drops: BSQ's as the cpu
# sweep's (5 of 6 epochs), finetuning's as its 3-epoch default (2 of 3).
BSQ_DROP, FINETUNE_DROP = 5 / 6, 2 / 3


def bsq_schedule(s: Study, length: int) -> Tuple[Schedule, int]:
  """BSQ's (epochs, milestones) at `length` times 1x, and its interval
  between host passes (a third of the schedule)."""
  epochs = s.bsq_epochs * length
  return (epochs, (round(epochs * BSQ_DROP),)), max(1, round(epochs / 3))


def finetune_schedule(s: Study, length: int) -> Schedule:
  """About half of BSQ's epochs at that length, never fewer than 3."""
  epochs = max(3, round(s.bsq_epochs * length / 2))
  return epochs, (round(epochs * FINETUNE_DROP),)


def base_name(seed: int) -> str:
  return f"base_seed{seed}"


def bsq_name(target: float, length: int, seed: int = 0) -> str:
  return f"t{target:g}_x{length}" + (f"_seed{seed}" if seed else "")


def schedules(s: Study, bsq_length: int, ft_length: int) -> Dict[str, object]:
  (epochs, drops), interval = bsq_schedule(s, bsq_length)
  ft_epochs, ft_drops = finetune_schedule(s, ft_length)
  return {"bsq.epochs": epochs, "bsq.lr_milestones": drops,
          "bsq.requant_interval": interval, "finetune.epochs": ft_epochs,
          "finetune.lr_milestones": ft_drops}


def budget(s: Study, target: float, length: int,
           scale: float = 1.0) -> Dict[str, object]:
  """Budget mode at `length`: the start and floor of alpha at 1/length of
  1x's, times `scale` (a retry's)."""
  return {"bsq.alpha": None, "bsq.target_bits": target,
          "bsq.default_alpha": s.start_alpha * scale / length,
          "bsq.budget_alpha_min": s.floor_alpha * scale / length,
          "bsq.budget_alpha_max": s.alpha_max}


def finetuned_bits(rec: dict) -> float:
  """A finished BSQ stage's size as finetuned: a tensor BSQ left all zero
  counts 0 bits there (and at 1 bit in its own average)."""
  return rec.get("finetune_average_bits", rec["average_bits"])


def fixed(s: Study, length: int, scale: float) -> Dict[str, object]:
  return {"bsq.alpha": s.fixed_alpha * scale / length}


def fixed_name(target: float, length: int, k: int) -> str:
  return f"{bsq_name(target, length)}_alpha{k + 1}"


def attempts(s: Study, target: float, length: int,
             measured: Dict[str, dict]) -> List[Tuple[str, float, bool]]:
  """The fixed-alpha search at one length so far, as (name, scale,
  accepted). It starts where the next shorter length's ended. A run whose
  finetuned size is more than `tolerance` from the target is followed by
  one with alpha times `step` (it kept too many bits) or over it (too few),
  then, once runs lie on both sides, at the geometric middle of the nearest
  two. The one within the tolerance is accepted, or after `tries` the one
  nearest the target. The last entry without a record is the next to run."""
  out, scale = [], _first_scale(s, target, length, measured)
  above, below = math.inf, 0.0  # scales known to land below / above
  for k in range(s.tries):
    name = fixed_name(target, length, k)
    done = measured.get(name)
    if done is None:
      return out + [(name, scale, False)]
    miss = finetuned_bits(done) - target
    if abs(miss) <= s.tolerance:
      return out + [(name, scale, True)]
    out.append((name, scale, False))
    if miss > 0:  # too many bits: a larger alpha
      below = max(below, scale)
    else:
      above = min(above, scale)
    scale = (math.sqrt(below * above) if below and above < math.inf
             else scale * (s.step if miss > 0 else 1 / s.step))
  best = min(out, key=lambda a: abs(finetuned_bits(measured[a[0]]) - target))
  return out + [(best[0], best[1], True)]


def _first_scale(s: Study, target: float, length: int,
                 measured: Dict[str, dict]) -> float:
  """Where a length's search starts: the scales the two next shorter
  lengths accepted, extended in log scale over log length (the third
  length on); the next shorter one's alone (the second); 1 (the first)."""
  shorter = sorted(n for n in s.lengths if n < length)[-2:]
  got = [accepted(s, target, n, measured) for n in shorter]
  if len(got) == 2 and None not in got:
    (n1, (_, a1)), (n2, (_, a2)) = zip(shorter, got)
    return a2 * (a2 / a1) ** (math.log(length / n2) / math.log(n2 / n1))
  return got[-1][1] if got and got[-1] else 1.0


def accepted(s: Study, target: float, length: int,
             measured: Dict[str, dict]) -> Optional[Tuple[str, float]]:
  name, scale, ok = attempts(s, target, length, measured)[-1]
  return (name, scale) if ok else None


def plan(s: Study, measured: Optional[Dict[str, dict]] = None) -> List[Run]:
  """The runs, most needed first. `measured` (run name -> its finished BSQ
  stage's last record) steers the search and adds the runs that need an
  accepted one: its baselines, uniform at its nearest whole precision, 1x
  with the longest finetuning, and the repeat; then budget mode at each
  length beside the rows (`budget_name`)."""
  measured = measured or {}
  floats = ("pretrain", "convert")
  longest = max(s.lengths)
  runs = [Run(base_name(0), "pretrain,convert", {"eval_every": 1}, None)]
  for t in s.targets:
    for n in s.lengths:  # each length's row, then its uniform baseline
      name, scale, ok = attempts(s, t, n, measured)[-1]
      runs.append(Run(name, "bsq,finetune,scratch,hawq" if ok else "bsq",
                      {**fixed(s, n, scale), **schedules(s, n, n)},
                      base_name(0), floats))
      if ok:
        bits = nearest_bits(finetuned_bits(measured[name]))
        runs.append(Run(f"uniform{bits}_x{n}", "convert,uniform",
                        {"convert.bits": bits, **schedules(s, n, n)},
                        base_name(0), ("pretrain",)))
  for t in s.targets:
    one = accepted(s, t, 1, measured)
    if one is not None:
      runs.append(Run(f"{bsq_name(t, 1)}_ft{longest}", "finetune",
                      {**fixed(s, 1, one[1]), **schedules(s, 1, longest)},
                      one[0], floats + ("bsq",)))
  seed = {"seed": s.repeat_seed}
  runs.append(Run(base_name(s.repeat_seed), "pretrain,convert",
                  {"eval_every": 1, **seed}, None))
  for t in s.targets:
    one = accepted(s, t, 1, measured)
    if one is not None:  # the accepted 1x alpha, from another seed
      runs.append(Run(bsq_name(t, 1, s.repeat_seed),
                      "bsq,finetune,scratch,hawq",
                      {**fixed(s, 1, one[1]), **schedules(s, 1, 1), **seed},
                      base_name(s.repeat_seed), floats))
  for t in s.targets:
    runs += [Run(budget_name(t, n), "bsq",
                 {**budget(s, t, n), **schedules(s, n, n)}, base_name(0),
                 floats) for n in s.lengths]
  return runs


def budget_name(target: float, length: int) -> str:
  return bsq_name(target, length)


def config_for(s: Study, run: Run):
  c = fashion_mnist_resnet20.get_config()
  c.model.depth = s.depth
  c.model.image_size = c.data.image_size = s.image_size
  c.data.train_subset = s.train_subset
  c.pretrain.epochs, c.pretrain.lr_milestones = s.pretrain
  c.eval_every = 10**6  # the test set only at the end of each stage
  c.stages = run.stages
  c.update_from_flattened_dict(run.changes)
  return c


# -- running ------------------------------------------------------------------

def run_records(workdir: str, name: str) -> List[dict]:
  """A run's metrics records; none for a run not started (or not a run)."""
  if not os.path.exists(os.path.join(workdir, name, "metrics.jsonl")):
    return []
  return records(workdir, name)


def measured_bsq(s: Study, workdir: str) -> Dict[str, dict]:
  """Each run's last BSQ record, by run name, where its BSQ stage ran to
  the end of its schedule."""
  found = {}
  for name in sorted(os.listdir(workdir)):
    rec = last(run_records(workdir, name), "bsq")
    length = _length(name)
    if (rec is not None and length is not None
        and rec["epoch"] == bsq_schedule(s, length)[0][0]):
      found[name] = rec
  return found


def _length(name: str) -> Optional[int]:
  """The schedule length a run name says ("t2_x9_try2" -> 9)."""
  for part in name.split("_"):
    if part.startswith("x") and part[1:].isdigit():
      return int(part[1:])
  return None


def run_all(s: Study, workdir: str) -> Dict[str, float]:
  """Runs (or resumes) every planned run; seconds per run are kept in
  <workdir>/times.json across resumptions."""
  from bsq_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  sweep.quiet_and_cached(workdir)
  times_path = os.path.join(workdir, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  done = set()
  while True:  # the plan grows as runs finish
    # A run accepted by the search runs again with its baselines' stages.
    todo = [r for r in plan(s, measured_bsq(s, workdir))
            if (r.name, r.stages) not in done]
    if not todo:
      return times
    run = todo[0]
    dst = os.path.join(workdir, run.name)
    if run.copy_from and not os.path.exists(dst):
      copy_stages(os.path.join(workdir, run.copy_from), dst, run.copy_stages)
    sweep.share_traces(workdir, dst)
    print(f"study: {run.name} ({run.stages})", flush=True)
    t0 = time.time()
    train_and_evaluate(config_for(s, run), dst)
    times[run.name] = times.get(run.name, 0.0) + time.time() - t0
    with open(times_path, "w") as f:
      json.dump(times, f, indent=1)
    done.add((run.name, run.stages))


# -- reading the runs back ----------------------------------------------------

def bsq_row(workdir: str, name: str) -> Optional[dict]:
  """A BSQ run's figures and its baselines' (those it ran), or None if its
  BSQ stage has not finished."""
  recs = run_records(workdir, name)
  epochs = [r for r in recs if r["stage"] == "bsq"]
  bsq = last(recs, "bsq")
  if bsq is None or "test_accuracy" not in bsq:
    return None
  get = lambda stage, key: (last(recs, stage) or {}).get(key)  # pylint: disable=unnecessary-lambda-assignment
  alphas = [r["alpha"] for r in epochs]
  return {"name": name, "steps": sum(r["steps"] for r in epochs),
          "epochs": len(epochs), "alphas": alphas,
          "met": bsq.get("budget_report", {}).get("met"),
          "bits": bsq["average_bits"], "bsq_acc": bsq["test_accuracy"],
          "ft_bits": get("finetune", "average_bits"),
          "ft_acc": get("finetune", "test_accuracy"),
          "ft_epochs": get("finetune", "epoch"),
          "hawq_bits": get("hawq", "average_bits"),
          "hawq_acc": get("hawq", "test_accuracy"),
          "scratch_acc": get("scratch", "test_accuracy"),
          "layers": bsq["bits"], "hawq_layers": get("hawq", "bits")}


def finetuned_only(workdir: str, name: str) -> Optional[dict]:
  """A run that only finetunes another's BSQ result: its BSQ figures are
  the copied run's, its finetuning its own."""
  ft = last(run_records(workdir, name), "finetune")
  return None if ft is None else {"ft_acc": ft["test_accuracy"],
                                  "ft_bits": ft["average_bits"],
                                  "ft_epochs": ft["epoch"]}


def uniform_acc(workdir: str, length: int, bits: int) -> Optional[float]:
  rec = last(run_records(workdir, f"uniform{bits}_x{length}"), "uniform")
  return None if rec is None else rec["test_accuracy"]


def float_curve(workdir: str, seed: int) -> List[float]:
  """Test accuracy by pretraining epoch; empty if that run has not started."""
  return [r["test_accuracy"] for r in run_records(workdir, base_name(seed))
          if r["stage"] == "pretrain"]


def _tried(workdir: str, name: str, length: int, rec: dict) -> dict:
  """One BSQ run of a search or of budget mode: its alpha settings (from
  the config it ran under), where it ended, and its accuracy."""
  with open(os.path.join(workdir, name, "config.json")) as f:
    config = json.load(f)
  budget_mode = config["bsq.alpha"] is None
  return {"run": name, "length": length,
          "alpha": (config["bsq.default_alpha"] if budget_mode
                    else config["bsq.alpha"]),
          "floor": config["bsq.budget_alpha_min"] if budget_mode else None,
          "last_alpha": rec["alpha"], "bits": rec["average_bits"],
          "ft_bits": finetuned_bits(rec),
          "met": rec.get("budget_report", {}).get("met"),
          "bsq_acc": rec.get("test_accuracy")}


def collect(s: Study, workdir: str) -> dict:
  out = {"float": {seed: float_curve(workdir, seed)
                   for seed in (0, s.repeat_seed)},
         "targets": []}
  longest = max(s.lengths)
  measured = measured_bsq(s, workdir)
  for t in s.targets:
    rows, tried = [], []
    for n in s.lengths:
      for name, _, _ in attempts(s, t, n, measured):
        if name in measured and name not in [a["run"] for a in tried]:
          tried.append(_tried(workdir, name, n, measured[name]))
      got = accepted(s, t, n, measured)
      row = bsq_row(workdir, got[0]) if got else None
      if row is not None:
        row.update(length=n, uniform_bits=nearest_bits(
            finetuned_bits(measured[got[0]])))
        row["uniform_acc"] = uniform_acc(workdir, n, row["uniform_bits"])
        rows.append(row)
    budgets = [_tried(workdir, name, _length(name), rec)
               for name, rec in measured.items()
               if re.fullmatch(rf"t{t:g}_x\d+(_try\d+)?", name)]
    repeat = bsq_row(workdir, bsq_name(t, 1, s.repeat_seed))
    long_ft = finetuned_only(workdir, f"{bsq_name(t, 1)}_ft{longest}")
    out["targets"].append({"target": t, "rows": rows, "repeat": repeat,
                           "long_ft": long_ft, "attempts": tried,
                           "budget": sorted(budgets, key=lambda b: (
                               b["length"], b["run"]))})
  return out


# -- report -------------------------------------------------------------------

def repeat_spread(block: dict) -> Optional[float]:
  """The largest move of a finetuned accuracy (BSQ, HAWQ-V2, scratch)
  between the 1x run and its repeat from another seed."""
  first = next((r for r in block["rows"] if r["length"] == 1), None)
  other = block["repeat"]
  if first is None or other is None:
    return None
  moves = [abs(first[k] - other[k]) for k in ("ft_acc", "hawq_acc",
                                              "scratch_acc")
           if first[k] is not None and other[k] is not None]
  return max(moves, default=None)


def alpha_path(row: dict) -> str:
  a = row["alphas"]
  if len(set(a)) == 1:
    return f"{a[0]:.3g} (fixed)"
  return f"{a[0]:.3g} -> {a[-1]:.3g} ({min(a):.3g}-{max(a):.3g})"


def gap(row: dict, key: str) -> Optional[float]:
  if row["ft_acc"] is None or row[key] is None:
    return None
  return row["ft_acc"] - row[key]


def table(block: dict) -> List[str]:
  lines = ["| run | BSQ steps | alpha | bits after "
           "BSQ (finetuned) | after BSQ | **BSQ, finetuned** | HAWQ-V2 bits "
           "| HAWQ-V2 | from scratch | uniform bits | uniform | BSQ - HAWQ-V2 "
           "| BSQ - scratch |", "|" + "---|" * 13]
  fmt = lambda v: "-" if v is None else f"{100 * v:+.2f}"  # pylint: disable=unnecessary-lambda-assignment
  named = [(f"{r['length']}x", r) for r in block["rows"]]
  if block["repeat"]:
    named.append(("1x, seed 1", dict(block["repeat"], uniform_bits=None,
                                     uniform_acc=None)))
  for label, r in named:
    bits = f"{r['bits']:.2f}"
    if r["ft_bits"] is not None and abs(r["ft_bits"] - r["bits"]) >= 0.005:
      bits += f" ({r['ft_bits']:.2f})"
    hb = "-" if r["hawq_bits"] is None else f"{r['hawq_bits']:.2f}"
    lines.append(
        f"| {label} | {r['steps']:,} | {alpha_path(r)} | {bits} | "
        f"{pct(r['bsq_acc'])} | **{pct(r['ft_acc'])}** | {hb} | "
        f"{pct(r['hawq_acc'])} | {pct(r['scratch_acc'])} | "
        f"{r['uniform_bits'] or '-'} | {pct(r['uniform_acc'])} | "
        f"{fmt(gap(r, 'hawq_acc'))} | {fmt(gap(r, 'scratch_acc'))} |")
  return lines


def search_lines(block: dict) -> List[str]:
  """Every fixed-alpha run of the search, and every budget-mode run beside
  the rows: the alpha it ran with, where it ended (after BSQ, and as
  finetuned, the size the search aims at), its accuracy."""
  lines = ["", "The search: every fixed-alpha BSQ run (the accepted one is "
           "the row above).", "", "| run | length | alpha | bits after BSQ | "
           "as finetuned (all-zero tensors at 0) | after BSQ |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {a['run']} | {a['length']}x | {a['alpha']:.3g} | "
            f"{a['bits']:.2f} | {a['ft_bits']:.2f} | {pct(a['bsq_acc'])} |"
            for a in block["attempts"]]
  lines += ["", f"Budget mode beside them (`bsq.target_bits` "
            f"{block['target']:g}): every run, with its start and floor of "
            f"alpha, the alpha it ended with and the bits it reached.", "",
            "| run | length | alpha start | floor | last alpha | reached "
            "| as finetuned | met | after BSQ |",
            "|---|---|---|---|---|---|---|---|---|"]
  for b in block["budget"]:
    met = {True: "yes", False: "no"}.get(b["met"], "-")
    lines.append(f"| {b['run']} | {b['length']}x | {b['alpha']:.3g} | "
                 f"{b['floor']:.3g} | {b['last_alpha']:.3g} | "
                 f"{b['bits']:.2f} | {b['ft_bits']:.2f} | {met} | "
                 f"{pct(b['bsq_acc'])} |")
  return lines


def layers_table(block: dict) -> List[str]:
  """Each layer's bits: BSQ's and HAWQ-V2's at each length."""
  rows = block["rows"]
  if not rows:
    return []
  names = sorted(rows[0]["layers"], key=sweep.layer_order)
  head = ["layer"] + [f"{r['length']}x {m}" for r in rows
                      for m in ("BSQ", "HAWQ-V2")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for n in names:
    cells = []
    for r in rows:
      cells += [str(r["layers"].get(n, "-")),
                str((r["hawq_layers"] or {}).get(n, "-"))]
    lines.append(f"| {n.removesuffix('/kernel')} | " + " | ".join(cells) + " |")
  return lines


def setup_lines(s: Study, r: dict) -> List[str]:
  lines = [f"ResNet-{s.depth} (CIFAR family, 4-bit activations, 1x1 "
           f"shortcuts float), batch 128, {s.image_size}x{s.image_size} "
           f"images. Training images: the first {s.train_subset:,} of 60,000; "
           f"test: all 10,000. Float pretraining: {s.pretrain[0]} epochs (lr "
           f"0.1, x0.1 at {list(s.pretrain[1])}), shared by every run of a "
           f"seed.", "",
           f"Each row's alpha is searched, aimed at the size as finetuned "
           f"(a tensor left all zero counts 0 bits): at 1x from "
           f"{s.fixed_alpha:g}, at a longer length from the trend of the "
           f"shorter lengths' alpha x steps; times or over {s.step:g} until "
           f"runs lie on both sides of the target, then the geometric middle "
           f"of the nearest two; within {s.tolerance:g} bits it is accepted, "
           f"after {s.tries} tries the nearest is. Budget mode beside the "
           f"rows starts at alpha {s.start_alpha:g} with a floor of "
           f"{s.floor_alpha:g} at 1x and at 1/n of both at nx, at most "
           f"{s.alpha_max:g} (t2_x1_try2-4 were retries of an earlier rule "
           f"of this script: start and floor doubled, halved, bisected).", "",
           "| length | BSQ epochs | lr x0.1 at | host pass every | finetune "
           "epochs (all four methods) | lr x0.1 at |", "|---|---|---|---|---|---|"]
  for n in s.lengths:
    (e, d), k = bsq_schedule(s, n)
    fe, fd = finetune_schedule(s, n)
    lines.append(f"| {n}x | {e} | {list(d)} | {k} | {fe} | {list(fd)} |")
  lines += ["", "Float test accuracy by pretraining epoch:", ""]
  for seed, accs in r["float"].items():
    lines.append(f"- seed {seed}: " + (", ".join(f"{100 * a:.2f}" for a in accs)
                                       or "not run yet"))
  return lines + [""]


def markdown(s: Study, r: dict, command: str, times: Dict[str, float],
             machine: dict, plot_dir: str, note: str, reading: str) -> str:
  rel = os.path.basename(plot_dir)
  lines = ["# Does BSQ catch up when it has time? Matched bits, longer "
           "schedules (Fashion-MNIST)", "", f"Command: `{command}`", "",
           f"Machine: {machine['cpu']}, {machine['cores']} cores, "
           f"{machine['device']}, jax {machine['jax']}. Run time: "
           f"{sum(times.values()) / 60:.1f} min (sum over runs).", ""]
  if note:
    lines += [f"Note: {note}", ""]
  lines += setup_lines(s, r)
  for block in r["targets"]:
    spread = repeat_spread(block)
    first = block["rows"][0]["ft_acc"] if block["rows"] else None
    band = noise(first, spread) if first is not None else None
    lines += [f"## Target {block['target']:g} average bits", "",
              "Each length's row is the fixed-alpha BSQ run the search "
              "accepted (below); it sets the size of its "
              "baselines: HAWQ-V2 allocates BSQ's finetuned size by Hessian "
              "trace, from-scratch takes BSQ's scheme; both start from the "
              "float model, as does uniform. All four are finetuned alike "
              "at that length. Gaps in points, finetuned.", ""]
    lines += table(block) + [""]
    if band is not None:
      lines.append(
          f"Noise: a difference counts only beyond {100 * band:.2f} points "
          f"(the larger of 1.96 standard errors of a difference of two "
          f"accuracies on 10,000 images and the 1x repeat's largest move"
          + (f", {100 * spread:.2f}" if spread is not None else
             "; the repeat has not run yet") + ").")
    if block["long_ft"]:
      lf, base = block["long_ft"], block["rows"][0]
      lines.append(
          f"1x BSQ with the longest finetuning ({lf['ft_epochs']} epochs "
          f"instead of {base['ft_epochs']}): {pct(lf['ft_acc'])} against "
          f"{pct(base['ft_acc'])}, at {lf['ft_bits']:.2f} bits.")
    lines += search_lines(block)
    lines += ["", "Bits per layer after BSQ, and HAWQ-V2's at the same size:",
              ""] + layers_table(block) + [""]
  lines += ["## Gap against schedule length", "",
            f"![BSQ minus HAWQ-V2 and from-scratch against BSQ steps]"
            f"({rel}/gap_vs_steps.png)", ""]
  lines += ["## Reading (written by hand after the figures)", "",
            reading.strip() or "(not written yet)", ""]
  lines += ["## Time per run (seconds)", "", "| run | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
  return "\n".join(lines) + "\n"


def plot_gaps(s: Study, r: dict, plot_dir: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(plot_dir, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for i, block in enumerate(r["targets"]):
    rows = block["rows"]
    if not rows:
      continue
    band = noise(rows[0]["ft_acc"], repeat_spread(block))
    steps = [x["steps"] for x in rows]
    ax.fill_between(steps, -100 * band, 100 * band, color="gray", alpha=0.2,
                    label="noise band" if i == 0 else None)
    for key, style, name in (("hawq_acc", "o-", "HAWQ-V2"),
                             ("scratch_acc", "s--", "from scratch")):
      pts = [(x["steps"], gap(x, key)) for x in rows if gap(x, key) is not None]
      ax.plot([p for p, _ in pts], [100 * g for _, g in pts], style,
              color=f"C{2 * i + (key == 'scratch_acc')}",
              label=f"target {block['target']:g} bits: BSQ - {name}")
    for x in rows:  # each row's own size: the search may land off target
      if gap(x, "hawq_acc") is not None and x["ft_bits"] is not None:
        ax.annotate(f"{x['ft_bits']:.2f} bits", (x["steps"],
                                                 100 * gap(x, "hawq_acc")),
                    fontsize=7, textcoords="offset points", xytext=(4, -10))
  ax.axhline(0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("BSQ steps (log)")
  ax.set_ylabel("finetuned accuracy gap (points)")
  ax.set_title("BSQ against baselines at BSQ's size, finetuned alike",
               fontsize=9)
  ax.legend(fontsize=8)
  return sweep.save_figure(fig, plot_dir, "gap_vs_steps.png")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default=os.path.join("workdirs",
                                                    "schedule_study"))
  ap.add_argument("--out", default="results/fashion_mnist_schedule.md")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the report from finished runs, train nothing")
  ap.add_argument("--note", default="",
                  help="a line for the report about how it was run")
  ap.add_argument("--reading", default=None, metavar="MARKDOWN",
                  help="the hand-written reading, put into the report")
  args = ap.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  if args.report_only:
    with open(os.path.join(args.workdir, "times.json")) as f:
      times = json.load(f)
  else:
    from bsq_jax import allocator  # pylint: disable=import-outside-toplevel
    allocator.restart_under_tcmalloc(print)  # as main.py: faster on CPU
    times = run_all(STUDY, args.workdir)
  from machine import machine as describe  # pylint: disable=import-outside-toplevel
  reading = open(args.reading).read() if args.reading else ""
  result = collect(STUDY, args.workdir)
  plot_dir = os.path.splitext(args.out)[0]
  plot_gaps(STUDY, result, plot_dir)
  command = sweep.shown_command(argv if argv is not None else sys.argv[1:],
                                script="benchmarks/schedule_study.py")
  sweep.write_report(args.out, markdown(STUDY, result, command, times,
                                        describe(), plot_dir, args.note,
                                        reading), result)


if __name__ == "__main__":
  main()
