"""Whole `main.py` runs on the default malloc against tcmalloc, alternated.

    python benchmarks/allocator_run.py --reps 2 --out results/allocator_run.md

speed.py times the step alone; this times what a user waits for: a short
Fashion-MNIST pipeline (pretrain 2, BSQ 2, finetune 1 epochs on 2,560
training images, 20 steps an epoch; the full 10,000-image test set after
every epoch), the same command under each allocator, alternated over reps.
Every run gets a fresh workdir under --workdirs. Needs Debian's
dataset-fashion-mnist and libtcmalloc-minimal4.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bsq_jax import allocator  # pylint: disable=wrong-import-position

OVERRIDES = ("--config.data.train_subset=2560", "--config.pretrain.epochs=2",
             "--config.pretrain.lr_milestones=(1,)", "--config.bsq.epochs=2",
             "--config.bsq.lr_milestones=(1,)", "--config.finetune.epochs=1",
             "--config.finetune.lr_milestones=()")


def run(workdir: str, preload) -> dict:
  """One main.py run; wall seconds and its metrics.jsonl epoch rows."""
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  if preload:
    env["LD_PRELOAD"] = preload
  cmd = [sys.executable, "main.py",
         "--config=configs/fashion_mnist_resnet20.py", *OVERRIDES,
         f"--workdir={workdir}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    tail = proc.stderr.strip().splitlines()[-1:]
    raise SystemExit(f"error: main.py exited {proc.returncode} under "
                     f"{preload or 'default malloc'}: {tail}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return {"wall": wall, "epochs": [r for r in rows if "epoch_seconds" in r]}


def report(runs, command: str) -> str:
  L = ["# Whole runs: default malloc against tcmalloc\n",
       "Written by `benchmarks/allocator_run.py`; every number comes from "
       "the runs.\n", "```\n" + command + "\n```\n",
       "Each run: `python main.py --config=configs/fashion_mnist_resnet20.py "
       + " ".join(OVERRIDES) + "`, alternated default / tcmalloc. The first "
       "epoch of each stage includes its compile; the second of pretrain and "
       "BSQ is a steady epoch of 20 one-step dispatches.\n",
       "| allocator | rep | wall (s) | epoch seconds (stage epoch) | "
       "test accuracy after each epoch |", "|---|---|---|---|---|"]
  for name, rep, r in runs:
    ep = ", ".join(f"{e['stage'][:2]}{e['epoch']} {e['epoch_seconds']:.1f}"
                   for e in r["epochs"])
    acc = ", ".join(f"{e['test_accuracy']:.4f}" for e in r["epochs"])
    L.append(f"| {name} | {rep} | {r['wall']:.1f} | {ep} | {acc} |")
  L.append("\n| allocator | wall (s, median) | steady epochs (s, median of "
           "pretrain 2 and BSQ 2) |")
  L.append("|---|---|---|")
  med = {}
  for name in ("default", "tcmalloc"):
    mine = [r for n, _, r in runs if n == name]
    steady = [e["epoch_seconds"] for r in mine for e in r["epochs"]
              if e["epoch"] == 2 and e["stage"] in ("pretrain", "bsq")]
    med[name] = (statistics.median(r["wall"] for r in mine),
                 statistics.median(steady))
    L.append(f"| {name} | {med[name][0]:.1f} | {med[name][1]:.1f} |")
  L.append(f"\ntcmalloc: wall {med['default'][0] / med['tcmalloc'][0]:.2f}x "
           f"faster, steady epochs {med['default'][1] / med['tcmalloc'][1]:.2f}x"
           " faster. Same accuracies under both: "
           f"{_same_accuracies(runs)}.\n")
  return "\n".join(L)


def _same_accuracies(runs) -> str:
  accs = {tuple(e["test_accuracy"] for e in r["epochs"]) for _, _, r in runs}
  return "yes" if len(accs) == 1 else f"no ({len(accs)} different sequences)"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--out", default="results/allocator_run.md")
  p.add_argument("--workdirs", default="/tmp/bsq_allocator_run")
  args = p.parse_args()
  preload = allocator.find("tcmalloc")
  if not preload:
    raise SystemExit("error: tcmalloc not found; apt-get install "
                     f"{allocator.LIBRARIES['tcmalloc'][0]}")
  if os.path.exists(args.workdirs):
    raise SystemExit(f"error: --workdirs {args.workdirs} exists; give a new "
                     "folder (runs are never written over)")
  runs = []
  for rep in range(1, args.reps + 1):
    for name, lib in (("default", None), ("tcmalloc", preload)):
      r = run(os.path.join(args.workdirs, f"{name}_{rep}"), lib)
      runs.append((name, rep, r))
      print(f"{name} rep {rep}: {r['wall']:.1f}s", flush=True)
  text = report(runs, "python " + " ".join(shlex.quote(a) for a in sys.argv))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
