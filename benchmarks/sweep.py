"""Fashion-MNIST alpha sweep: BSQ's accuracy / compression trade-off on real data.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/sweep.py --preset cpu --out results/fashion_mnist.md

ResNet-20 with 4-bit activations, following the paper's procedure:
- one float pretraining and its 8-bit conversion, shared by every run;
- BSQ at each alpha of the preset, then finetuning;
- from-scratch at the middle alpha: the float model converted to the scheme
  BSQ found, finetuned with the same schedule;
- budget mode (issue #8) at each target of average bits, then finetuning;
- uniform baselines: the float model at 2, 3 and 4 bits everywhere, finetuned.

Each run is a workdir under --workdir, so an interrupted sweep resumes where
it stopped (finished stages are skipped). The report, with the command at the
top, goes to --out and the PNG plots beside it in `<out stem>/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from bsq_jax.checkpoint import copy_stages
from bsq_jax.hawq import TraceCache
from configs import fashion_mnist_resnet20

Schedule = Tuple[int, Tuple[int, ...]]  # (epochs, lr milestones)


@dataclasses.dataclass(frozen=True)
class Preset:
  train_subset: int            # first N training images (0 = all 60,000)
  pretrain: Schedule
  bsq: Schedule
  finetune: Schedule           # also scratch's, hawq's and the uniform ones'
  requant_interval: int        # BSQ epochs between host passes
  alphas: Tuple[float, ...]
  targets: Tuple[float, ...] = ()   # budget mode, average bits
  uniform_bits: Tuple[int, ...] = ()  # besides each alpha's nearest precision


PRESETS = {
    # 2 CPU cores, about 90 minutes under tcmalloc (issue 17): the regime in
    # which the authors' release was run here, 12,000 images (94 steps of
    # 128 an epoch) and 6 BSQ epochs (563 steps), a host pass every 2; there
    # alphas of about 0.1 to 2 took the average precision from about 7 bits
    # to under 2. A log grid over that range, factor 2.
    "cpu": Preset(train_subset=12000, pretrain=(6, (4,)), bsq=(6, (5,)),
                  finetune=(1, ()), requant_interval=2,
                  alphas=(0.1, 0.2, 0.4, 0.8, 1.6)),
    # The paper's epochs and alphas, for an accelerator.
    "full": Preset(train_subset=0, pretrain=(350, (150, 250, 325)),
                   bsq=(350, (250,)), finetune=(300, (150, 250)),
                   requant_interval=100,
                   alphas=(1e-3, 2e-3, 5e-3, 1e-2, 2e-2),
                   targets=(4.0, 3.0, 2.0)),
}

# Every alpha's run: BSQ, its finetuning, and the two baselines at its size.
ALPHA_STAGES = "bsq,finetune,scratch,hawq"


def scaled(preset: Preset, factor: float) -> Preset:
  """Every epoch count, milestone and the re-quantization interval times
  `factor` (at least 1 epoch each)."""
  def sched(s: Schedule) -> Schedule:
    return (max(1, round(s[0] * factor)),
            tuple(max(1, round(m * factor)) for m in s[1]))
  return dataclasses.replace(
      preset, pretrain=sched(preset.pretrain), bsq=sched(preset.bsq),
      finetune=sched(preset.finetune),
      requant_interval=max(1, round(preset.requant_interval * factor)))


@dataclasses.dataclass
class Planned:
  name: str
  stages: str
  changes: Dict[str, object]   # config overrides ("a.b": value)
  copy_from: Optional[str]     # a run whose stages this one starts from
  copy_stages: Tuple[str, ...] = ()


def middle(alphas) -> float:
  return sorted(alphas)[len(alphas) // 2]


def nearest_bits(average_bits: float) -> int:
  """The whole precision nearest an average (halves up), within 1..8."""
  return int(min(8, max(1, math.floor(average_bits + 0.5))))


def plan(p: Preset, measured_bits: Sequence[float] = ()) -> List[Planned]:
  """The runs in order: the shared base first, then everything built on it.
  The uniform baselines are at `p.uniform_bits` and at the nearest whole
  precision of each of `measured_bits` (the alpha runs' results)."""
  mid = middle(p.alphas)
  runs = [Planned("base", "pretrain,convert", {}, None)]
  for a in p.alphas:
    # The middle alpha's run is tested at every host pass: its curve is
    # plotted.
    changes = {"bsq.alpha": a,
               **({"eval_every": p.requant_interval} if a == mid else {})}
    runs.append(Planned(f"alpha_{a:g}", ALPHA_STAGES, changes, "base",
                        ("pretrain", "convert")))
  for t in p.targets:
    runs.append(Planned(f"target_{t:g}", "bsq,finetune",
                        {"bsq.alpha": None, "bsq.target_bits": t,
                         # Start low: an alpha that wrecks the model in
                         # the first epoch cannot be taken back.
                         "bsq.default_alpha": sorted(p.alphas)[1],
                         "bsq.budget_alpha_min": min(p.alphas) / 10,
                         "bsq.budget_alpha_max": max(p.alphas) * 10},
                        "base", ("pretrain", "convert")))
  uniform = set(p.uniform_bits) | {nearest_bits(b) for b in measured_bits}
  for b in sorted(uniform):
    runs.append(Planned(f"uniform_{b}", "convert,uniform",
                        {"convert.bits": b}, "base", ("pretrain",)))
  return runs


def config_for(p: Preset, run: Planned, seed: int = 0):
  c = fashion_mnist_resnet20.get_config()
  c.seed = seed
  c.data.train_subset = p.train_subset
  for name in ("pretrain", "bsq", "finetune"):
    c[name].epochs, c[name].lr_milestones = getattr(p, name)
  c.bsq.requant_interval = p.requant_interval
  # The 10,000 test images cost about a short epoch on CPU: test only at the
  # end of each stage, except where a run's curve is plotted.
  c.eval_every = 10**6
  c.stages = run.stages
  c.update_from_flattened_dict(run.changes)
  return c


# -- running ------------------------------------------------------------------

def run_all(p: Preset, workdir: str, seed: int = 0) -> Dict[str, float]:
  """Runs (or resumes) every planned run; returns seconds spent per run,
  kept in <workdir>/times.json across resumptions. The uniform runs are
  planned once the alpha runs have given their bits."""
  from bsq_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  quiet_and_cached(workdir)
  times_path = os.path.join(workdir, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}

  def run_one(run: Planned) -> None:
    dst = os.path.join(workdir, run.name)
    if run.copy_from and not os.path.exists(dst):
      copy_stages(os.path.join(workdir, run.copy_from), dst, run.copy_stages)
    share_traces(workdir, dst)
    print(f"sweep: {run.name} ({run.stages})", flush=True)
    t0 = time.time()
    train_and_evaluate(config_for(p, run, seed), dst)
    times[run.name] = times.get(run.name, 0.0) + time.time() - t0
    with open(times_path, "w") as f:
      json.dump(times, f, indent=1)

  for run in plan(p):
    if not run.name.startswith("uniform_"):
      run_one(run)
  for run in plan(p, alpha_bits(p, workdir)):
    if run.name.startswith("uniform_"):
      run_one(run)
  return times


def quiet_and_cached(workdir: str) -> None:
  """Libraries quiet (the runs' own progress lines stay), and a compile
  cache in `workdir` (unless the environment names one): every run compiles
  the same 8-bit BSQ step and the same evaluation, once, and again for
  nothing when a study resumes."""
  from bsq_jax import report  # pylint: disable=import-outside-toplevel
  report.quiet_libraries()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir",
                      os.path.abspath(os.path.join(workdir, "xla_cache")))


def share_traces(workdir: str, dst: str) -> None:
  """Gives `dst` an earlier run's Hessian traces (bsq_jax/hawq.py): every
  alpha's hawq stage estimates them on the same float model. The run reuses
  them only if their key matches its own."""
  name = TraceCache.FILE
  if not os.path.exists(dst) or os.path.exists(os.path.join(dst, name)):
    return
  for run in sorted(os.listdir(workdir)):
    held = os.path.join(workdir, run, name)
    if os.path.exists(held):
      shutil.copyfile(held, os.path.join(dst, name))
      return


def alpha_bits(p: Preset, workdir: str) -> List[float]:
  """Each alpha run's average bits after BSQ."""
  return [last(records(workdir, f"alpha_{a:g}"), "bsq")["average_bits"]
          for a in p.alphas]


# -- reading the runs back ----------------------------------------------------

def records(workdir: str, run: str) -> List[dict]:
  with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def last(recs: List[dict], stage: str) -> Optional[dict]:
  found = [r for r in recs if r["stage"] == stage]
  return found[-1] if found else None


def collect(p: Preset, workdir: str) -> dict:
  """The figures of every run, as the report and the plots use them."""
  base = records(workdir, "base")
  out = {"float": last(base, "pretrain")["test_accuracy"],
         "convert8": last(base, "convert")["test_accuracy"],
         "alphas": [], "targets": [], "uniform": [], "curve": None}
  for name in sorted(os.listdir(workdir)):
    if name.startswith("uniform_") and os.path.exists(
        os.path.join(workdir, name, "metrics.jsonl")):
      recs = records(workdir, name)
      cv, ft = last(recs, "convert"), last(recs, "uniform")
      if ft is not None:
        out["uniform"].append({"bits": int(name.split("_")[1]),
                               "compression": ft["compression"],
                               "convert_acc": cv["test_accuracy"],
                               "ft_acc": ft["test_accuracy"]})
  out["uniform"].sort(key=lambda u: u["bits"])
  uniform = {u["bits"]: u["ft_acc"] for u in out["uniform"]}
  for a in p.alphas:
    out["alphas"].append(alpha_row(p, a, records(workdir, f"alpha_{a:g}"),
                                   uniform))
    if a == middle(p.alphas):
      out["curve"] = curve(out["convert8"], a, records(workdir, f"alpha_{a:g}"))
  for t in p.targets:
    out["targets"].append(target_row(t, records(workdir, f"target_{t:g}")))
  return out


def alpha_row(p: Preset, alpha: float, recs: List[dict],
              uniform: Dict[int, float]) -> dict:
  """One alpha's BSQ result and the three baselines at its size. `bits` is
  BSQ's average after BSQ; `ft_bits` the finetune scheme's (an all-zero
  layer counts 0 there), the size that scratch and hawq get."""
  bsq, ft = last(recs, "bsq"), last(recs, "finetune")
  sc, hq = last(recs, "scratch"), last(recs, "hawq")
  n = nearest_bits(bsq["average_bits"])
  get = lambda r, k: None if r is None else r.get(k)  # pylint: disable=unnecessary-lambda-assignment
  return {"alpha": alpha, "bits": bsq["average_bits"],
          "compression": bsq["compression"], "bsq_acc": bsq["test_accuracy"],
          "ft_acc": get(ft, "test_accuracy"), "ft_bits": get(ft, "average_bits"),
          "scratch_acc": get(sc, "test_accuracy"),
          "hawq_acc": get(hq, "test_accuracy"),
          "hawq_bits": get(hq, "average_bits"),
          "hawq_layers": get(hq, "bits"),
          "uniform_bits": n, "uniform_acc": uniform.get(n),
          "layers": bsq["bits"]}


def curve(convert8: float, alpha: float, recs: List[dict]) -> dict:
  """One BSQ run by epoch, from the 8-bit conversion on."""
  epochs = [r for r in recs if r["stage"] == "bsq"]
  return {"alpha": alpha, "epochs": [0] + [r["epoch"] for r in epochs],
          "acc": [convert8] + [r.get("test_accuracy") for r in epochs],
          "bits": [8.0] + [r["average_bits"] for r in epochs]}


def target_row(target: float, recs: List[dict]) -> dict:
  bsq, ft = last(recs, "bsq"), last(recs, "finetune")
  alphas = [r["alpha"] for r in recs if r["stage"] == "bsq"]
  rep = bsq.get("budget_report", {})
  return {"target": target, "bits": bsq["average_bits"],
          "compression": bsq["compression"], "met": rep.get("met"),
          "alpha_first": alphas[0], "alpha_last": alphas[-1],
          "alpha_min": min(alphas), "alpha_max": max(alphas),
          "bsq_acc": bsq["test_accuracy"], "ft_acc": ft["test_accuracy"]}


# -- report -------------------------------------------------------------------

TEST_IMAGES = 10_000
# Baselines in the matched-bits table: (key, name in the report).
BASELINES = (("hawq_acc", "HAWQ-V2 allocation"),
             ("scratch_acc", "from-scratch at BSQ's scheme"),
             ("uniform_acc", "uniform at the nearest whole precision"))


def pct(v: Optional[float]) -> str:
  return "-" if v is None else f"{100 * v:.2f}%"


def noise(acc: float, spread: Optional[float] = None) -> float:
  """The smallest difference of two test accuracies this report reads as
  real: 1.96 standard errors of a difference of two accuracies near `acc`
  on the 10,000 test images (as if independent), or the repeat's largest
  spread if that is larger."""
  band = 1.96 * math.sqrt(2 * acc * (1 - acc) / TEST_IMAGES)
  return max(band, spread or 0.0)


def compare(rows: List[dict], key: str, spread: Optional[float]) -> dict:
  """BSQ's finetuned accuracy against a baseline's, alpha by alpha: the
  verdict is `holds` if BSQ is ahead by more than the noise at some alpha
  and never behind by more, `fails` if behind by more at some alpha and
  never ahead, `mixed` if both, `within noise` if neither."""
  ahead = behind = 0
  parts = []
  for x in rows:
    if x["ft_acc"] is None or x[key] is None:
      continue
    d, band = x["ft_acc"] - x[key], noise(x["ft_acc"], spread)
    ahead, behind = ahead + (d > band), behind + (d < -band)
    parts.append(f"{x['bits']:.2f} bits: {pct(x['ft_acc'])} vs "
                 f"{pct(x[key])} ({100 * d:+.2f})")
  verdict = {(True, False): "holds", (False, True): "fails",
             (True, True): "mixed"}.get((ahead > 0, behind > 0), "within noise")
  return {"verdict": verdict, "ahead": ahead, "behind": behind,
          "compared": len(parts), "detail": "; ".join(parts)}


def claims(r: dict, spread: Optional[float] = None) -> List[str]:
  """The paper's claims, each marked by rules fixed before the runs."""
  rows = sorted(r["alphas"], key=lambda x: x["alpha"])
  bits = [x["bits"] for x in rows]
  fewer = all(b1 > b2 for b1, b2 in zip(bits, bits[1:]))
  alphas = ", ".join(f"{x['alpha']:g}" for x in rows)
  shown = (" > " if fewer else ", ").join(f"{b:.2f}" for b in bits)
  lines = [f"- **Larger alpha gives fewer bits: "
           f"{'holds' if fewer else 'fails'}.** Average bits at alpha "
           f"{alphas}: {shown}."]
  low = [x for x in rows if 2.0 <= x["bits"] <= 3.5 and x["ft_acc"] is not None]
  if low:
    gaps = [(x, r["float"] - x["ft_acc"]) for x in low]
    close = all(g <= 0.01 for _, g in gaps)
    lines.append(
        f"- **Finetuned accuracy stays close to float at about 2-3 bits "
        f"(within 1 point): {'holds' if close else 'fails'}.** Float "
        f"{pct(r['float'])}; " + "; ".join(
            f"{x['bits']:.2f} bits (alpha {x['alpha']:g}): {pct(x['ft_acc'])},"
            f" {100 * g:+.2f} points below float" for x, g in gaps) + ".")
  else:
    lines.append("- **Finetuned accuracy stays close to float at about 2-3 "
                 "bits: not tested.** No alpha landed at 2-3.5 average bits.")
  for key, name, claim in (
      ("scratch_acc", "from-scratch", "BSQ beats from-scratch at the same scheme"),
      ("hawq_acc", "HAWQ-V2", "BSQ beats a Hessian-aware allocation at the "
                              "same size")):
    c = compare(rows, key, spread)
    lines.append(f"- **{claim}: {c['verdict']}** (BSQ ahead beyond the "
                 f"noise at {c['ahead']} of {c['compared']} alphas, behind at "
                 f"{c['behind']}; BSQ vs {name}, finetuned: {c['detail']}).")
  for t in r["targets"]:
    lines.append(f"- Budget target {t['target']:g} bits: "
                 f"{t['bits']:.2f} bits, {abs(t['bits'] - t['target']):.2f} "
                 f"from the target (asked: within 0.25); "
                 f"{against_sweep(rows, t)}.")
  return lines


def against_sweep(rows: List[dict], t: dict) -> str:
  """The budget run's finetuned accuracy against the alpha sweep's curve
  (finetuned accuracy, linear in bits between neighbouring points) at the
  same bits; outside the curve, against its nearest end."""
  pts = sorted((x["bits"], x["ft_acc"]) for x in rows)
  bits, acc = t["bits"], t["ft_acc"]
  if not pts:
    return "no alpha sweep to compare with"
  if bits < pts[0][0] or bits > pts[-1][0]:
    end = pts[0] if bits < pts[0][0] else pts[-1]
    ref = end[1]
    where = (f"the sweep's nearest point, {end[0]:.2f} bits ({pct(ref)}; "
             f"the sweep spans {pts[0][0]:.2f}-{pts[-1][0]:.2f} bits)")
  else:
    ref = float(np.interp(bits, [b for b, _ in pts], [a for _, a in pts]))
    where = f"the sweep's curve at {bits:.2f} bits ({pct(ref)})"
  # Compared as printed (to 0.01 points), so that equal figures read equal.
  verdict = "no worse" if round(100 * acc, 2) >= round(100 * ref, 2) else "worse"
  return f"finetuned {pct(acc)}, {verdict} than {where}"


def spread(r: dict, other: dict) -> dict:
  """How far a repeat of the sweep moved: per alpha, the change of BSQ's
  bits and of every finetuned accuracy; the largest and the median."""
  acc_keys = ("ft_acc",) + tuple(k for k, _ in BASELINES)
  rows, accs, bits = [], [], []
  by_alpha = {x["alpha"]: x for x in other["alphas"]}
  for x in sorted(r["alphas"], key=lambda x: x["alpha"]):
    y = by_alpha.get(x["alpha"])
    if y is None:
      continue
    # A repeat's figures.json from an older report may lack a baseline.
    d = {k: (None if x.get(k) is None or y.get(k) is None else y[k] - x[k])
         for k in acc_keys}
    rows.append({"alpha": x["alpha"], "bits": (x["bits"], y["bits"]), **d})
    bits.append(abs(y["bits"] - x["bits"]))
    accs += [abs(v) for v in d.values() if v is not None]
  return {"rows": rows, "float": other["float"] - r["float"],
          "max_bits": max(bits, default=0.0),
          "median_bits": float(np.median(bits)) if bits else 0.0,
          "max_acc": max(accs, default=0.0),
          "median_acc": float(np.median(accs)) if accs else 0.0}


def read_repeat(p: Preset, where: str) -> dict:
  """A second run's figures: its workdir, or the figures.json its report
  wrote (when its workdirs are gone)."""
  if where.endswith(".json"):
    with open(where) as f:
      return json.load(f)
  return collect(p, where)


def spread_lines(s: dict, note: str) -> List[str]:
  lines = ["## Repeatability", "", note, "",
           "| alpha | bits, run 1 -> 2 | BSQ | HAWQ-V2 | scratch | uniform |",
           "|---|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{100 * v:+.2f}"  # pylint: disable=unnecessary-lambda-assignment
  for x in s["rows"]:
    lines.append(f"| {x['alpha']:g} | {x['bits'][0]:.2f} -> {x['bits'][1]:.2f}"
                 f" | {fmt(x['ft_acc'])} | {fmt(x['hawq_acc'])} | "
                 f"{fmt(x['scratch_acc'])} | {fmt(x['uniform_acc'])} |")
  lines += ["", f"Accuracies in points, run 2 minus run 1, finetuned. Float "
            f"moved {100 * s['float']:+.2f} points. Average bits moved at most "
            f"{s['max_bits']:.2f} (median {s['median_bits']:.2f}); finetuned "
            f"accuracies at most {100 * s['max_acc']:.2f} points (median "
            f"{100 * s['median_acc']:.2f}). The claims above count a "
            f"difference as real only beyond the larger of this largest "
            f"spread and the test set's 95% band.", ""]
  return lines


def markdown(p: Preset, r: dict, command: str, times: Dict[str, float],
             plot_dir: str, machine: dict, note: str = "",
             repeat: Optional[Tuple[dict, str]] = None) -> str:
  total = sum(times.values())
  rel = os.path.basename(plot_dir)
  s = spread(r, repeat[0]) if repeat else None
  lines = [
      "# Fashion-MNIST: BSQ against HAWQ-V2, from-scratch and uniform at "
      "matched bits", "",
      f"Command: `{command}`", "",
      f"Machine: {machine['cpu']}, {machine['cores']} cores, "
      f"{machine['device']}, jax {machine['jax']}. Run time: "
      f"{total / 60:.1f} min (sum over runs).", ""]
  if note:
    lines += [f"Note: {note}", ""]
  lines += [
      f"ResNet-20 (4-bit activations, 1x1 shortcuts float), batch 128. "
      f"Training images: "
      f"{p.train_subset or 60000:,} (the first of 60,000); test: all 10,000. "
      f"Epochs: pretrain {p.pretrain[0]} (lr 0.1, x0.1 at {list(p.pretrain[1])}), "
      f"BSQ {p.bsq[0]} (lr 0.1, x0.1 at {list(p.bsq[1])}, re-quantization "
      f"every {p.requant_interval}), then finetune, scratch, hawq and uniform "
      f"alike: {p.finetune[0]} (lr 0.01, x0.1 at {list(p.finetune[1])}).", "",
      f"Float baseline: **{pct(r['float'])}**; its 8-bit conversion: "
      f"{pct(r['convert8'])}.", "",
      "## Matched bits", "",
      "Every row is one BSQ run. Its finetune scheme (all-zero layers at 0 "
      "bits) sets the size of the baselines: HAWQ-V2 allocates that many "
      "bits by Hessian trace (bsq_jax/hawq.py), from-scratch takes BSQ's "
      "scheme itself; both start from the float model, as does uniform at "
      "the whole precision nearest BSQ's average. All four are finetuned "
      "with the same schedule.", "",
      "| alpha | BSQ bits | after BSQ | **BSQ, finetuned** | HAWQ-V2 bits | "
      "HAWQ-V2, finetuned | from scratch, BSQ's scheme | uniform bits | "
      "uniform, finetuned |",
      "|---|---|---|---|---|---|---|---|---|"]
  for x in sorted(r["alphas"], key=lambda x: x["alpha"]):
    hb = "-" if x["hawq_bits"] is None else f"{x['hawq_bits']:.2f}"
    bits = f"{x['bits']:.2f}"
    if x["ft_bits"] is not None and abs(x["ft_bits"] - x["bits"]) >= 0.005:
      bits += f" ({x['ft_bits']:.2f} finetuned)"
    lines.append(f"| {x['alpha']:g} | {bits} | {pct(x['bsq_acc'])} | "
                 f"**{pct(x['ft_acc'])}** | {hb} | {pct(x['hawq_acc'])} | "
                 f"{pct(x['scratch_acc'])} | {x['uniform_bits']} | "
                 f"{pct(x['uniform_acc'])} |")
  if r["targets"]:
    lines += ["", "## Budget mode (target average bits instead of alpha)", "",
              "| target | average bits | met | compression | alpha first -> "
              "last (range) | after BSQ | after finetune |",
              "|---|---|---|---|---|---|---|"]
    for t in r["targets"]:
      lines.append(f"| {t['target']:g} | {t['bits']:.2f} | "
                   f"{'yes' if t['met'] else 'no'} | {t['compression']:.2f}x | "
                   f"{t['alpha_first']:.3g} -> {t['alpha_last']:.3g} "
                   f"({t['alpha_min']:.3g}-{t['alpha_max']:.3g}) | "
                   f"{pct(t['bsq_acc'])} | {pct(t['ft_acc'])} |")
  lines += ["", "## Uniform precision baselines (every layer, finetuned)", "",
            "| bits | compression | after conversion | after finetune |",
            "|---|---|---|---|"]
  for u in r["uniform"]:
    lines.append(f"| {u['bits']} | {u['compression']:.2f}x | "
                 f"{pct(u['convert_acc'])} | {pct(u['ft_acc'])} |")
  lines += ["", "## The paper's claims on these figures", "",
            "Marked by rules fixed in `benchmarks/sweep.py` before the runs: "
            "a difference counts only beyond the noise (1.96 standard errors "
            "of a difference of two accuracies on 10,000 test images, about "
            "0.9 points near 88%" + (", or the repeat's largest spread" if s
                                     else "") + ").", ""]
  lines += claims(r, s["max_acc"] if s else None) + [""]
  if s:
    lines += spread_lines(s, repeat[1])
  lines += ["## Plots", "",
            f"![accuracy against bits]({rel}/accuracy_vs_bits.png)", "",
            f"![per-layer precision]({rel}/layer_bits.png)", "",
            f"![one run by epoch]({rel}/bsq_by_epoch.png)", "",
            "## Time per run (seconds)", "",
            "| run | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
  return "\n".join(lines) + "\n"


def layer_order(name: str):
  """Input to output: the stem, the residual stages, then the classifier."""
  return (name.startswith("fc"), name)


# The accuracy-against-bits curves: (x, y, matplotlib style, label); x is the
# average bits of the model as finetuned.
CURVES = (("ft_bits", "ft_acc", "o-", "BSQ, finetuned"),
          ("hawq_bits", "hawq_acc", "s-", "HAWQ-V2 allocation, finetuned"),
          ("ft_bits", "scratch_acc", "v-", "from scratch at BSQ's scheme"),
          ("uniform_bits", "uniform_acc", "^-", "uniform, nearest whole bits"))


def plots(p: Preset, r: dict, plot_dir: str) -> List[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(plot_dir, exist_ok=True)
  paths = []

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  rows = sorted(r["alphas"], key=lambda x: x["bits"])
  for xkey, ykey, style, label in CURVES:
    pts = sorted((x[xkey], x[ykey]) for x in rows
                 if x[xkey] is not None and x[ykey] is not None)
    ax.plot([b for b, _ in pts], [100 * a for _, a in pts], style, label=label)
  for x in rows:
    if x["ft_acc"] is not None:
      ax.annotate(f"{x['alpha']:g}", (x["ft_bits"], 100 * x["ft_acc"]),
                  fontsize=7, textcoords="offset points", xytext=(3, 3))
  if r["targets"]:
    ax.plot([t["bits"] for t in r["targets"]],
            [100 * t["ft_acc"] for t in r["targets"]], "s",
            label="budget mode, finetuned")
  ax.axhline(100 * r["float"], color="gray", ls="--", label="float")
  ax.set_xlabel("average bits per weight of the finetuned model")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("finetuned alike; numbers: BSQ's alpha", fontsize=9)
  ax.legend(fontsize=8)
  paths.append(save_figure(fig, plot_dir, "accuracy_vs_bits.png"))

  fig, ax = plt.subplots(figsize=(8, 4))
  for i, x in enumerate(sorted(r["alphas"], key=lambda x: x["alpha"])):
    names = sorted(x["layers"], key=layer_order)
    ax.plot(range(len(names)), [x["layers"][n] for n in names], "o-",
            color=f"C{i}", label=f"alpha {x['alpha']:g}: BSQ {x['bits']:.2f}")
    if x["hawq_layers"]:
      ax.plot(range(len(names)), [x["hawq_layers"].get(n) for n in names],
              "x--", color=f"C{i}", lw=0.8,
              label=f"HAWQ-V2 at that size, {x['hawq_bits']:.2f}")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels([n.removesuffix("/kernel") for n in names], rotation=90,
                     fontsize=6)
  ax.set_ylabel("bits")
  ax.legend(fontsize=6, ncol=2)
  paths.append(save_figure(fig, plot_dir, "layer_bits.png"))

  curve = r["curve"]
  fig, ax = plt.subplots(figsize=(6, 4))
  pts = [(e, a) for e, a in zip(curve["epochs"], curve["acc"]) if a is not None]
  ax.plot([e for e, _ in pts], [100 * a for _, a in pts], "o-", color="C0")
  ax.set_xlabel("BSQ epoch")
  ax.set_ylabel("test accuracy (%)", color="C0")
  ax2 = ax.twinx()
  ax2.step(curve["epochs"], curve["bits"], where="pre", color="C1")
  ax2.set_ylabel("average bits", color="C1")
  for e in range(0, p.bsq[0] + 1, p.requant_interval):
    ax.axvline(e, color="gray", ls=":", lw=0.8)
  if p.bsq[0] % p.requant_interval:
    ax.axvline(p.bsq[0], color="gray", ls=":", lw=0.8)
  ax.set_title(f"alpha {curve['alpha']:g}; dotted: re-quantization")
  paths.append(save_figure(fig, plot_dir, "bsq_by_epoch.png"))
  return paths


def save_figure(fig, plot_dir: str, name: str) -> str:
  path = os.path.join(plot_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


# Flags about the report, not the runs: left out of the command it shows.
REPORT_FLAGS = ("--note", "--repeat", "--repeat-note", "--reading")


def shown_command(argv: List[str],
                  script: str = "benchmarks/sweep.py") -> str:
  """The command that reproduces the runs: without --report-only and the
  report's own flags (REPORT_FLAGS) and their values."""
  kept, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in REPORT_FLAGS:
      skip = True
    elif a != "--report-only" and not a.startswith(
        tuple(f + "=" for f in REPORT_FLAGS)):
      kept.append(a)
  return f"python {script} " + shlex.join(kept)


def write_report(out: str, text: str, figures: dict) -> None:
  """The report at `out`, its figures as JSON in its plot folder (what a
  later report compares with), and the text on stdout."""
  with open(out, "w") as f:
    f.write(text)
  with open(os.path.join(os.path.splitext(out)[0], "figures.json"), "w") as f:
    json.dump(figures, f, indent=1)
  print(text)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  ap.add_argument("--scale", type=float, default=1.0,
                  help="multiplies every epoch count of the preset")
  ap.add_argument("--workdir", default=None,
                  help="where the runs live (default workdirs/sweep_<preset>)")
  ap.add_argument("--out", default="results/fashion_mnist.md")
  ap.add_argument("--seed", type=int, default=0,
                  help="config.seed of every run (initialization, data order, "
                       "probes): a repeat with another seed")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the report from finished runs, train nothing")
  ap.add_argument("--note", default="",
                  help="a line for the report about how it was run (e.g. "
                       "what else ran on the machine)")
  ap.add_argument("--repeat", default=None, metavar="WORKDIR_OR_JSON",
                  help="a second run of the same preset (another day, "
                       "machine or seed), its workdir or its figures.json: "
                       "the report adds how far it moved")
  ap.add_argument("--repeat-note", default="",
                  help="how the --repeat run was made (its command, machine)")
  args = ap.parse_args(argv)
  if args.scale <= 0:
    ap.error(f"--scale: expected a positive factor, got {args.scale}")
  preset = scaled(PRESETS[args.preset], args.scale)
  workdir = args.workdir or os.path.join("workdirs", f"sweep_{args.preset}")
  os.makedirs(workdir, exist_ok=True)
  if args.report_only:
    with open(os.path.join(workdir, "times.json")) as f:
      times = json.load(f)
  else:
    from bsq_jax import allocator  # pylint: disable=import-outside-toplevel
    allocator.restart_under_tcmalloc(print)  # as main.py: faster on CPU
    times = run_all(preset, workdir, args.seed)
  from machine import machine as describe  # pylint: disable=import-outside-toplevel
  command = shown_command(argv if argv is not None else sys.argv[1:])
  result = collect(preset, workdir)
  repeat = None
  if args.repeat:
    repeat = (read_repeat(preset, args.repeat), args.repeat_note or
              f"Run 2: the runs in {args.repeat}.")
  plot_dir = os.path.splitext(args.out)[0]
  plots(preset, result, plot_dir)
  write_report(args.out, markdown(preset, result, command, times, plot_dir,
                                  describe(), args.note, repeat), result)


if __name__ == "__main__":
  main()
