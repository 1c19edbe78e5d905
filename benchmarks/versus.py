"""ResNet-20 step time of this tree against another commit, side by side.

    python benchmarks/versus.py --base e05e4db --reps 3 --out results/versus.md

Each side runs `benchmarks/speed.py --child` from its own tree (the other
commit is unpacked with `git archive` into a temporary folder), batch 128,
float and bsq (every layer at 8 bits). The children alternate (this tree,
base, base, this tree, ...) so a shared, noisy machine slows both alike;
figures are medians over the reps, and the ratio is this tree over base.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# pylint: disable=wrong-import-position
from machine import busy_processes, machine  # noqa: E402
from speed import run_child  # noqa: E402

MODES = ("float", "bsq")


def unpack(rev: str, folder: str) -> str:
  """The tree of commit `rev` in `folder`; returns its commit hash."""
  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify",
                           f"{rev}^{{commit}}"], capture_output=True,
                          text=True, check=False)
  if commit.returncode:
    sys.exit(f"error: --base {rev}: not a commit of {ROOT}")
  archive = subprocess.run(["git", "-C", ROOT, "archive", rev],
                           capture_output=True, check=True).stdout
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  return commit.stdout.strip()


def child(tree: str, preset: str) -> dict:
  """One speed.py child of `tree`: {"step_s": {mode: s}, ...} or an error."""
  return run_child([sys.executable, os.path.join(tree, "benchmarks",
                                                 "speed.py"),
                    "--child", json.dumps({"preset": preset})], "")


def measure(sides: dict, reps: int, preset: str, log=print) -> dict:
  """{side: [child results]}, the sides alternating in ABBA order."""
  names = list(sides)
  out = {n: [] for n in names}
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):
      t0 = time.time()
      result = child(sides[name], preset)
      if "error" in result:
        sys.exit(f"error: the {name} child failed: {result['error']}")
      out[name].append(result)
      log(f"rep {rep + 1} {name}: " + ", ".join(
          f"{m} {result['step_s'][m] * 1e3:.0f} ms" for m in MODES) +
          f" ({time.time() - t0:.0f} s)")
  return out


def report(args, commits: dict, results: dict, busy) -> str:
  med = {n: {m: statistics.median(r["step_s"][m] for r in rs) for m in MODES}
         for n, rs in results.items()}
  head, base = list(results)
  lines = [
      "# ResNet-20 step time: this tree against an earlier commit", "",
      "    " + " ".join(shlex.quote(a) for a in ["python"] + sys.argv), "",
      f"Machine: {machine()}.",
      f"This tree: {commits[head]}; base: {commits[base]}. "
      f"{args.reps} children per side, alternating; batch 128, "
      f"`speed.py --child` (preset {args.preset}).", ""]
  if busy:
    lines += [f"Other busy processes at the start: {busy}.", ""]
  # Children i of the two sides ran next to each other (ABBA order), so
  # their ratio cancels most of the machine's drift.
  paired = {m: statistics.median(a["step_s"][m] / b["step_s"][m] for a, b
                                 in zip(results[head], results[base]))
            for m in MODES}
  lines += ["| mode | this tree (ms) | base (ms) | ratio of medians | "
            "median of paired ratios |", "|---|---|---|---|---|"]
  for m in MODES:
    lines.append(f"| {m} | {med[head][m] * 1e3:.1f} | {med[base][m] * 1e3:.1f}"
                 f" | {med[head][m] / med[base][m]:.3f} | {paired[m]:.3f} |")
  lines += ["", "Every child (ms per step, float / bsq):", ""]
  for n, rs in results.items():
    lines.append(f"- {n}: " + "; ".join(
        f"{r['step_s']['float'] * 1e3:.0f} / {r['step_s']['bsq'] * 1e3:.0f}"
        for r in rs))
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="the commit to compare with")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--preset", default="quick", choices=("quick", "full"))
  p.add_argument("--out", default="results/versus.md")
  args = p.parse_args()
  if args.reps < 1:
    sys.exit(f"error: --reps: expected >= 1, got {args.reps}")
  busy = busy_processes()
  with tempfile.TemporaryDirectory() as folder:
    commits = {"this tree": subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
        text=True, check=True).stdout.strip() + (
            " (with uncommitted changes)" if subprocess.run(
                ["git", "-C", ROOT, "status", "--porcelain", "--",
                 "bsq_jax", "benchmarks"], capture_output=True, text=True,
                check=True).stdout.strip() else ""),
               "base": unpack(args.base, folder)}
    results = measure({"this tree": ROOT, "base": folder}, args.reps,
                      args.preset)
  text = report(args, commits, results, busy)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
