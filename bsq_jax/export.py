"""Export: a trained model written as a deployable packed file, and its CLI.

A training checkpoint holds 16 float planes per 8-bit weight; the packed file
(`bsq_jax.packed_format`) holds the small model itself: every quantized
tensor bit-packed at its own precision, the float parts as float32, and a
JSON header that says how to rebuild the Flax model. This module joins the
two ends: the model's tensors as integer levels (`bsq_jax.model_tensors`)
go into a file, and `ExportStats` says what it cost, by the paper's
accounting (n bits per weight) and in real bytes (n+1 bits, scales, float
parts, header). `bsq_jax.packed_loader.load_model` reads it back.

API: `export_model` -> `ExportStats`; `load_run` (a run's result).

CLI:  python -m bsq_jax.export --workdir DIR [--stage finetune|bsq] --out FILE
(the run is read with `bsq_jax.checkpoint.load_result`; the stage defaults to
the last finished of finetune, bsq).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional

from bsq_jax.model_tensors import model_tensors
from bsq_jax.packed_format import (SCALE_BYTES, ExportError, PackedModel,
                                   packed_bytes, write_packed)


@dataclasses.dataclass(frozen=True)
class ExportStats:
  """Sizes of one exported file, with the paper's and the real ratios."""
  path: str
  mode: str
  file_bytes: int
  header_bytes: int         # 20-byte prefix + JSON header
  packed_weight_bytes: int  # sign + n magnitude bits per weight, packed
  scale_bytes: int          # 4 per quantized tensor
  float_bytes: int          # BatchNorm, float shortcuts, PACT alphas (f32)
  float32_bytes: int        # the whole model at 4 bytes per value
  total_params: int         # TP (quantized weights)
  total_bits: int           # TB = sum m n (paper's count, no sign bit)
  average_bits: float
  paper_compression: float  # 32 TP / TB
  real_ratio: float         # float32_bytes / file_bytes

  @classmethod
  def of(cls, written: PackedModel) -> "ExportStats":
    """The sizes of a file as `write_packed` wrote it."""
    header, quantized = written.header, written.quantized.values()
    accounting = header["accounting"]
    tp = accounting["total_params"]
    float32_bytes = 4 * (tp + written.float_elements)
    return cls(
        path=written.path, mode=header["mode"], file_bytes=written.file_bytes,
        header_bytes=written.file_bytes - header["payload_bytes"],
        packed_weight_bytes=sum(packed_bytes(t.size, t.bits)
                                for t in quantized),
        scale_bytes=SCALE_BYTES * len(quantized),
        float_bytes=4 * written.float_elements, float32_bytes=float32_bytes,
        total_params=tp, total_bits=accounting["total_bits"],
        average_bits=accounting["average_bits"],
        paper_compression=accounting["compression"],
        real_ratio=float32_bytes / written.file_bytes)

  def summary(self) -> str:
    return (
        f"{self.path}: {self.file_bytes} bytes ({self.mode} model; header "
        f"{self.header_bytes}, packed weights {self.packed_weight_bytes}, "
        f"scales {self.scale_bytes}, float parts {self.float_bytes})\n"
        f"paper's accounting: {self.total_params} weights, {self.total_bits} "
        f"bits, {self.average_bits:.3f} bits/weight, compression "
        f"{self.paper_compression:.2f}x (n bits per weight, quantized layers "
        f"only)\n"
        f"real size: float32 model {self.float32_bytes} bytes / file "
        f"{self.file_bytes} bytes = {self.real_ratio:.2f}x (n+1 bits per "
        f"weight, scales, float parts and header included)")


def export_model(path: str, model_cfg: Mapping[str, Any], mode: str,
                 scheme: Optional[Mapping[str, int]],
                 variables: Mapping[str, Any]) -> ExportStats:
  """Writes the packed file for a trained model; returns its sizes.

  mode: "bsq" (params hold BitPlanes; `scheme` may be None, it is read off
  the planes) or "finetune" (params hold Levels; `scheme` is required).
  variables: {"params": ..., "batch_stats": ...}, checked against the model
  `model_cfg` builds (collections the model does not declare are left out).
  Tensors are written in network order (the order the model creates them).
  """
  path = os.fspath(path)
  try:
    _, entries = model_tensors(model_cfg, mode, scheme, variables)
  except ExportError as e:
    raise ExportError(f"{path}: cannot export: {e}") from None
  return ExportStats.of(write_packed(path, model_cfg, mode, entries))


# --------------------------------------------------------------------------
# CLI.


def load_run(workdir: str, stage: Optional[str] = None):
  """A training run's result via `bsq_jax.checkpoint.load_result`: an object
  with model_config, mode, scheme and variables (imported only here, so that
  reading a packed file needs no orbax)."""
  from bsq_jax import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.load_result(workdir, stage=stage)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bsq_jax.export",
      description="Write a training run's result as a packed model file.")
  parser.add_argument("--workdir", required=True, help="the run directory")
  parser.add_argument("--stage", default=None,
                      help="which stage's result, e.g. finetune or bsq "
                           "(default: the last finished of finetune, bsq)")
  parser.add_argument("--out", required=True, help="the file to write")
  args = parser.parse_args(argv)
  try:
    result = load_run(args.workdir, args.stage)
    stats = export_model(args.out, result.model_config, result.mode,
                         result.scheme, result.variables)
  except (ExportError, ValueError, KeyError, OSError, ImportError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"export: error: {msg}", file=sys.stderr)
    return 1
  print(stats.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
