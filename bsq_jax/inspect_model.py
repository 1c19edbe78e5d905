"""Per-layer report of a quantized model: precision, scale, bit-plane density.

The report describes the weights the network uses, w = s * q / K(n) (spec
section 2): for each quantized tensor its name, shape, precision n, scale s
and, for each bit plane of |q| (MSB first), the percentage of weights whose
bit is set (the authors' release prints, per plane, the % of nonzero
pos - neg: the same number once the planes are binary, as after every
re-quantization; for continuous mid-training planes this report describes
the weights the network rounds them to); then the paper's totals (spec section 9: TP, TB, average bits, compression) and, for
an exported file, its real size.

A training run (in memory or from its directory) and an exported file go
through the same table code: both are first reduced to integer levels
(`bsq_jax.packed_format.PackedTensor`), by the very function export uses
(`bsq_jax.model_tensors.model_tensors`).

`write_plots` draws two PNGs (matplotlib, Agg): the precision per layer (bar
chart, in layer order) and a heat map of bit-plane density (layers x bit
position). docs/inspect_bit_density_example_tiny_resnet8.png is such a heat
map for a tiny random ResNet-8 (width 4), not a trained model.

CLI:  python -m bsq_jax.inspect_model PATH_OR_WORKDIR [--stage S]
                                        [--plots OUTDIR]
(a file is read as a packed model file; a directory as a training run via
`bsq_jax.checkpoint.load_result`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from bsq_jax import export
from bsq_jax.model_tensors import model_tensors
from bsq_jax.packed_format import PackedTensor, read_packed

PRECISION_PNG = "precision.png"
DENSITY_PNG = "bit_density.png"


@dataclasses.dataclass(frozen=True)
class LayerRow:
  path: str
  shape: Tuple[int, ...]
  bits: int
  scale: float
  density: Tuple[float, ...]  # fraction of weights with plane b set, MSB first

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Report:
  source: str                # file path, run directory or "(in memory)"
  mode: str
  model_config: Mapping[str, Any]
  rows: Tuple[LayerRow, ...]
  float_elements: int        # values kept in float (BatchNorm, shortcuts, ...)
  file_bytes: Optional[int]  # exported file size; None for a run

  @property
  def total_params(self) -> int:  # TP
    return sum(r.size for r in self.rows)

  @property
  def total_bits(self) -> int:    # TB
    return sum(r.size * r.bits for r in self.rows)

  @property
  def average_bits(self) -> float:
    return self.total_bits / max(self.total_params, 1)

  @property
  def compression(self) -> float:
    return 32.0 * self.total_params / max(self.total_bits, 1)

  @property
  def float32_bytes(self) -> int:
    return 4 * (self.total_params + self.float_elements)

  def table(self) -> str:
    width = max([len(r.path) for r in self.rows] + [5])
    max_bits = max([r.bits for r in self.rows] + [1])
    lines = [f"{self.source} ({self.mode} model, "
             f"{_describe(self.model_config)})",
             f"{'layer':<{width}}  {'shape':<14} {'bits':>4} {'scale':>10}"
             f"  % nonzero per bit plane (MSB first)",
             f"{'':<{width}}  {'':<14} {'':>4} {'':>10}  " +
             " ".join(f"{f'b{b}':>5}" for b in range(max_bits))]
    for r in self.rows:
      shape = "x".join(str(d) for d in r.shape)
      dens = " ".join(f"{100 * d:5.1f}" for d in r.density) or "(all zero)"
      lines.append(f"{r.path:<{width}}  {shape:<14} {r.bits:>4} "
                   f"{r.scale:>10.4g}  {dens}")
    lines.append(f"total params (TP) {self.total_params}, total bits (TB) "
                 f"{self.total_bits}, average bits {self.average_bits:.3f}, "
                 f"compression {self.compression:.2f}x (paper's accounting)")
    if self.file_bytes is not None:
      lines.append(f"file size {self.file_bytes} bytes; float32 model "
                   f"{self.float32_bytes} bytes; real ratio "
                   f"{self.float32_bytes / self.file_bytes:.2f}x")
    return "\n".join(lines)


def _describe(cfg: Mapping[str, Any]) -> str:
  return ", ".join(f"{k} {v}" for k, v in cfg.items()) if cfg else "no config"


def report_from_levels(source: str, mode: str, model_config: Mapping[str, Any],
                       tensors: Sequence[PackedTensor],
                       float_elements: int,
                       file_bytes: Optional[int] = None) -> Report:
  """The one table code: rows from integer levels, in layer order."""
  rows = tuple(LayerRow(t.path, tuple(int(d) for d in t.shape), t.bits,
                        float(t.scale), tuple(float(d) for d in t.density()))
               for t in tensors)
  return Report(source, mode, dict(model_config), rows, int(float_elements),
                file_bytes)


def inspect_variables(model_cfg: Mapping[str, Any], mode: str,
                      scheme: Optional[Mapping[str, int]],
                      variables: Mapping[str, Any],
                      source: str = "(in memory)") -> Report:
  """Report for a model in memory (bsq: scheme may be None; finetune)."""
  _, entries = model_tensors(model_cfg, mode, scheme, variables)
  tensors = [v for _, _, v in entries if isinstance(v, PackedTensor)]
  floats = sum(v.size for _, _, v in entries
               if not isinstance(v, PackedTensor))
  return report_from_levels(source, mode, model_cfg, tensors, floats)


def inspect_file(path: str) -> Report:
  """Report for a packed model file (numpy only)."""
  packed = read_packed(path)
  return report_from_levels(path, packed.header["mode"], packed.model_config,
                            list(packed.quantized.values()),
                            packed.float_elements, packed.file_bytes)


def inspect_run(workdir: str, stage: Optional[str] = None) -> Report:
  """Report for a training run's result (`checkpoint.load_result`)."""
  result = export.load_run(workdir, stage)
  return inspect_variables(result.model_config, result.mode, result.scheme,
                           result.variables, source=workdir)


def inspect_path(path: str, stage: Optional[str] = None) -> Report:
  """A directory is a training run; anything else a packed model file."""
  return inspect_run(path, stage) if os.path.isdir(path) else inspect_file(path)


# --------------------------------------------------------------------------
# Plots.


def write_plots(report: Report, outdir: str) -> Tuple[str, str]:
  """Writes PRECISION_PNG and DENSITY_PNG under outdir; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(outdir, exist_ok=True)
  names = [r.path for r in report.rows]
  bits = [r.bits for r in report.rows]
  n = len(names)
  title = f"{os.path.basename(report.source) or report.source}: " \
          f"{report.average_bits:.2f} bits avg, {report.compression:.1f}x"

  fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 4.5))
  ax.bar(range(n), bits, color="tab:blue")
  ax.set_xticks(range(n))
  ax.set_xticklabels(names, rotation=90, fontsize=7)
  ax.set_ylabel("precision (bits)")
  ax.set_ylim(0, max(bits + [1]) + 0.5)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  precision_png = os.path.join(outdir, PRECISION_PNG)
  fig.savefig(precision_png, dpi=120)
  plt.close(fig)

  max_bits = max(bits + [1])
  grid = np.full((n, max_bits), np.nan)
  for i, r in enumerate(report.rows):
    grid[i, :r.bits] = 100.0 * np.asarray(r.density)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * max_bits + 3.5),
                                  max(3.0, 0.3 * n + 1.5)))
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100,
                 aspect="auto", interpolation="nearest")
  if n * max_bits <= 400:
    for i in range(n):
      for b in range(report.rows[i].bits):
        ax.text(b, i, f"{grid[i, b]:.0f}", ha="center", va="center",
                fontsize=6, color="white" if grid[i, b] < 60 else "black")
  ax.set_xticks(range(max_bits))
  ax.set_xticklabels([f"b{b}" for b in range(max_bits)], fontsize=7)
  ax.set_xlabel("bit plane (b0 = MSB; grey: beyond the layer's precision)")
  ax.set_yticks(range(n))
  ax.set_yticklabels([f"{name} ({b})" for name, b in zip(names, bits)],
                     fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="% of weights with the bit set")
  fig.tight_layout()
  density_png = os.path.join(outdir, DENSITY_PNG)
  fig.savefig(density_png, dpi=120)
  plt.close(fig)
  return precision_png, density_png


# --------------------------------------------------------------------------
# CLI.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bsq_jax.inspect_model",
      description="Per-layer precision and bit-plane density of a packed "
                  "model file or a training run.")
  parser.add_argument("path", help="a packed model file or a run directory")
  parser.add_argument("--stage", default=None,
                      help="for a run directory: which stage's result "
                           "(default: the last finished of finetune, bsq)")
  parser.add_argument("--plots", default=None, metavar="OUTDIR",
                      help="also write precision.png and bit_density.png")
  args = parser.parse_args(argv)
  try:
    report = inspect_path(args.path, args.stage)
    print(report.table())
    if args.plots:
      for png in write_plots(report, args.plots):
        print(f"wrote {png}")
  except (ValueError, KeyError, OSError, ImportError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"inspect_model: error: {msg}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
