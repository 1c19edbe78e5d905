"""BSQ on a plain-Flax Vision Transformer: Fashion-MNIST, several alphas.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/vit_sweep.py --preset cpu --out results/fashion_mnist_vit.md

The ViT of configs/fashion_mnist_vit.py (bsq_jax/models/vit.py, ordinary
Flax that knows nothing of BSQ) through the whole pipeline: one float
pretraining and its 8-bit conversion, shared; then BSQ at each alpha of the
preset, each finetuned. The report gives the accuracies and average bits,
the precision of every quantized tensor (per block: query, key, value and
output projections, the two MLP layers), and a PNG of those precisions in
the style of the paper's per-layer figure (`<out stem>/layers.png`).
Each run is a workdir under --workdir, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
from bsq_jax.checkpoint import copy_stages
from configs import fashion_mnist_vit
from sweep import last, records

Schedule = Tuple[int, Tuple[int, ...]]  # (epochs, lr milestones)


@dataclasses.dataclass(frozen=True)
class Preset:
  train_subset: int
  pretrain: Schedule
  bsq: Schedule
  finetune: Schedule
  requant_interval: int
  alphas: Tuple[float, ...]


PRESETS = {
    # 2 CPU cores, about 40 minutes: 24,000 images (187 steps of 128), no
    # augmentation (the ViT learns much faster without it on this budget:
    # 72% after 2 float epochs against 48% with crops and flips).
    # A calibration from a 5-epoch float model: alpha 0.05 left 7.4 bits
    # after 4 BSQ epochs, 0.4 reached 4.6 bits after 3, and 1.0 took the
    # model to 1.3 bits and chance accuracy in one epoch.
    "cpu": Preset(train_subset=24000, pretrain=(8, (6,)), bsq=(6, (5,)),
                  finetune=(3, (2,)), requant_interval=1,
                  alphas=(0.1, 0.2, 0.4, 0.7, 1.2, 2.0)),
    # A tiny run of every step, for the tests.
    "tiny": Preset(train_subset=256, pretrain=(1, ()), bsq=(1, ()),
                   finetune=(1, ()), requant_interval=1, alphas=(5.0, 50.0)),
}

# Per block: the tensor kinds, in the order of the report's columns.
KINDS = (("query", "attn/query"), ("key", "attn/key"), ("value", "attn/value"),
         ("out", "attn/out"), ("mlp1", "mlp1"), ("mlp2", "mlp2"))


def config_for(p: Preset, stages: str, alpha: float = 0.0, **changes):
  c = fashion_mnist_vit.get_config()
  c.data.train_subset = p.train_subset
  c.data.augment = False
  for name in ("pretrain", "bsq", "finetune"):
    c[name].epochs, c[name].lr_milestones = getattr(p, name)
  c.bsq.requant_interval = p.requant_interval
  c.bsq.alpha = alpha
  c.eval_every = 10**6  # the test set only at the end of each stage
  c.stages = stages
  c.update_from_flattened_dict(changes)
  return c


def run_all(p: Preset, workdir: str, **changes) -> Dict[str, float]:
  """Runs (or resumes) the base and every alpha; seconds per run, added up
  over resumptions in <workdir>/times.json."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  from bsq_jax import report  # pylint: disable=import-outside-toplevel
  from bsq_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.INFO)
  report.quiet_libraries()
  times = read_times(workdir)
  runs = [("base", "pretrain,convert", 0.0)] + [
      (f"alpha_{a:g}", "bsq,finetune", a) for a in p.alphas]
  for name, stages, alpha in runs:
    dst = os.path.join(workdir, name)
    if name != "base" and not os.path.exists(dst):
      copy_stages(os.path.join(workdir, "base"), dst, ("pretrain", "convert"))
    print(f"vit sweep: {name} ({stages})", flush=True)
    t0 = time.time()
    train_and_evaluate(config_for(p, stages, alpha, **changes), dst)
    times[name] = times.get(name, 0.0) + time.time() - t0
    with open(os.path.join(workdir, "times.json"), "w") as f:
      json.dump(times, f, indent=1)
  return times


def read_times(workdir: str) -> Dict[str, float]:
  path = os.path.join(workdir, "times.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def collect(p: Preset, workdir: str) -> dict:
  base = records(workdir, "base")
  out = {"float": last(base, "pretrain")["test_accuracy"],
         "convert8": last(base, "convert")["test_accuracy"], "alphas": [],
         "sizes": sizes(workdir)}
  for a in p.alphas:
    recs = records(workdir, f"alpha_{a:g}")
    bsq, ft = last(recs, "bsq"), last(recs, "finetune")
    out["alphas"].append({"alpha": a, "bits": bsq["average_bits"],
                          "compression": bsq["compression"],
                          "bsq_acc": bsq["test_accuracy"],
                          "ft_acc": ft["test_accuracy"],
                          "ft_bits": ft["average_bits"],
                          "layers": bsq["bits"], "ft_layers": ft["bits"]})
  return out


def sizes(workdir: str) -> Dict[str, int]:
  """Weights per quantized tensor, from the 8-bit conversion's checkpoint."""
  from bsq_jax import scheme as sch  # pylint: disable=import-outside-toplevel
  from bsq_jax.checkpoint import load_result  # pylint: disable=import-outside-toplevel
  found = sch.sizes_of(load_result(os.path.join(workdir, "base"),
                                   "convert").state.params)
  return {k: found[k] for k in layer_order(found)}


def blocks(layers: Dict[str, int]) -> List[int]:
  return sorted({int(m.group(1)) for k in layers
                 if (m := re.match(r"block(\d+)/", k))})


def layer_order(layers: Dict[str, int]) -> List[str]:
  """Network order: patch embedding, each block's six, the head."""
  order = [k for k in layers if k.startswith("patch_embed/")]
  for b in blocks(layers):
    order += [f"block{b}/{path}/kernel" for _, path in KINDS
              if f"block{b}/{path}/kernel" in layers]
  order += [k for k in layers if k.startswith("head/")]
  return order + [k for k in layers if k not in order]


def kind_means(layers: Dict[str, int]) -> Dict[str, float]:
  return {kind: float(np.mean([layers[f"block{b}/{path}/kernel"]
                               for b in blocks(layers)]))
          for kind, path in KINDS}


def report_text(p: Preset, data: dict, command: str, times, plot) -> str:
  lines = ["# BSQ on a plain-Flax Vision Transformer (Fashion-MNIST)", "",
           "    " + command, "",
           f"Preset: {p}.", "",
           "The ViT (`bsq_jax/models/vit.py`: patch 4 on the 32x32 padded "
           "images, pre-norm blocks with multi-head attention and a GELU MLP, "
           "class token) is ordinary Flax; BSQ reaches it through the rules "
           "of `configs/fashion_mnist_vit.py` (every kernel; biases, "
           "LayerNorms, class token and position embeddings float; no "
           "activation quantized).", "",
           f"Float: {data['float']:.4f} test accuracy; 8-bit conversion: "
           f"{data['convert8']:.4f}.", "",
           "| alpha | average bits (BSQ) | compression | after BSQ | "
           "finetuned | finetuned bits |", "|---|---|---|---|---|---|"]
  for r in data["alphas"]:
    lines.append(f"| {r['alpha']:g} | {r['bits']:.2f} | {r['compression']:.2f}x"
                 f" | {r['bsq_acc']:.4f} | {r['ft_acc']:.4f} | "
                 f"{r['ft_bits']:.2f} |")
  zeroed = [(r["alpha"], sum(1 for k, n in r["ft_layers"].items()
                              if n == 0 and r["layers"][k] == 1))
            for r in data["alphas"]]
  for alpha, count in zeroed:
    if count:
      lines += ["", f"alpha {alpha:g}: {count} of "
                f"{len(data['alphas'][0]['layers'])} tensors ended BSQ at 1 "
                f"bit with all planes zero, so finetuning holds them at 0 "
                f"bits (docs/algorithm.md): hence its lower bits."]
  lines += ["", "Sizes (weights per tensor): " + ", ".join(
      f"{k.removesuffix('/kernel')} {v}" for k, v in data["sizes"].items()
      if not k.startswith("block") or k.startswith("block0/")) + "; every "
      "block alike. The penalty weighs a tensor by its size times its bits "
      "(docs/algorithm.md).", "", "## Precision of every quantized tensor", ""]
  for r in data["alphas"]:
    layers = r["layers"]
    lines += [f"alpha {r['alpha']:g} ({r['bits']:.2f} average bits); "
              f"patch embedding {layers.get('patch_embed/kernel')}, head "
              f"{layers.get('head/kernel')} bits:", "",
              "| block | " + " | ".join(k for k, _ in KINDS) + " |",
              "|---" * (len(KINDS) + 1) + "|"]
    for b in blocks(layers):
      lines.append(f"| {b} | " + " | ".join(
          str(layers[f"block{b}/{path}/kernel"]) for _, path in KINDS) + " |")
    means = kind_means(layers)
    lines += ["| mean | " + " | ".join(f"{means[k]:.2f}" for k, _ in KINDS)
              + " |", ""]
  lines += [f"![precision per layer]({plot})", "",
            "Wall time per run (s): " + ", ".join(
                f"{k} {v:.0f}" for k, v in times.items()), ""]
  return "\n".join(lines)


def plot_layers(data: dict, path: str) -> None:
  """Bits per quantized tensor, network order, one bar group per alpha."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  order = layer_order(data["alphas"][0]["layers"])
  labels = [k.removesuffix("/kernel").replace("attn/", "") for k in order]
  n = len(data["alphas"])
  width = 0.8 / n
  fig, ax = plt.subplots(figsize=(max(8, len(order) * 0.45), 4))
  x = np.arange(len(order))
  for i, r in enumerate(data["alphas"]):
    ax.bar(x + (i - (n - 1) / 2) * width, [r["layers"][k] for k in order],
           width, label=f"alpha {r['alpha']:g} ({r['bits']:.2f} bits)")
  ax.set_xticks(x, labels, rotation=75, fontsize=7)
  ax.set_ylabel("precision (bits)")
  ax.set_ylim(0, 10)
  ax.set_yticks(range(9))
  ax.set_title("ViT on Fashion-MNIST: precision per layer after BSQ")
  ax.legend(fontsize=8, ncol=min(n, 6), loc="upper center")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--workdir", default="workdirs/vit_sweep")
  ap.add_argument("--out", default="results/fashion_mnist_vit.md")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the report from the runs already there")
  args, rest = ap.parse_known_args()
  from bsq_jax import allocator  # pylint: disable=import-outside-toplevel
  allocator.restart_under_tcmalloc(print)  # as main.py: faster on CPU
  changes = {}
  for item in rest:  # --set a.b=value: config overrides (tests use them)
    if not item.startswith("--set="):
      sys.exit(f"error: unknown argument {item!r}")
    key, _, value = item[6:].partition("=")
    changes[key] = json.loads(value)
  p = PRESETS[args.preset]
  times = (read_times(args.workdir) if args.report_only
           else run_all(p, args.workdir, **changes))
  data = collect(p, args.workdir)
  stem = os.path.splitext(args.out)[0]
  os.makedirs(stem, exist_ok=True)
  plot = os.path.join(stem, "layers.png")
  plot_layers(data, plot)
  command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)
  with open(args.out, "w") as f:
    f.write(report_text(p, data, command, times,
                        os.path.relpath(plot, os.path.dirname(args.out)
                                        or ".")))
  print(f"wrote {args.out} and {plot}")


if __name__ == "__main__":
  main()
