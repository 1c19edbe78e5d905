"""Would bfloat16 bit planes keep the re-quantization exact? (issue #5)

Halving the planes' bytes (float32 -> bfloat16) would halve ResNet-50's
largest memory item, but only if the host pass still gives the same integer
levels and scheme. This rounds real trained planes (mid-BSQ checkpoints of a
finished run, where planes are continuous) to bfloat16 and back, re-quantizes
both, and counts the weights whose level changes and the layers whose
precision changes.

    python benchmarks/bf16_planes.py WORKDIR [--out results/bf16_planes.md]

WORKDIR: a run with a bsq stage (e.g. workdirs/sweep_cpu/alpha_2 from
benchmarks/sweep.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bsq_jax import bitplanes as bp  # pylint: disable=wrong-import-position
from bsq_jax import scheme as sch  # pylint: disable=wrong-import-position
from bsq_jax.checkpoint import StageCheckpoints, abstract_state  # pylint: disable=wrong-import-position


def to_bf16_and_back(params):
  def cast(_, v):
    if not isinstance(v, bp.BitPlanes):
      return v
    r = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    return bp.BitPlanes(r(v.pos), r(v.neg), v.scale)
  return sch.map_nodes(cast, params)


def compare(params, max_bits: int):
  """(weights, weights whose level changes, layers, layers whose bits change)."""
  exact, ex_scheme = sch.requantize_params(params, max_bits)
  lean, le_scheme = sch.requantize_params(to_bf16_and_back(params), max_bits)
  lean_planes = dict(sch.quantized(lean))
  total = changed = 0
  for path, planes in sch.quantized(exact):
    a = bp.integers(planes) * (2 ** (max_bits - ex_scheme[path]))
    b = bp.integers(lean_planes[path]) * (2 ** (max_bits - le_scheme[path]))
    total += a.size
    changed += int(np.sum(a != b))
  layers = sum(ex_scheme[p] != le_scheme[p] for p in ex_scheme)
  return total, changed, len(ex_scheme), layers


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdir")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  ck = StageCheckpoints(args.workdir, "bsq", read_only=True)
  rows = []
  for epoch in sorted(ck.manager.all_steps()):  # the ones kept
    result = ck.restore(epoch, abstract_state)
    rows.append((epoch,) + compare(result.state.params, 8))
  ck.close()
  lines = ["# bfloat16 bit planes against the re-quantization", "",
           f"`python benchmarks/bf16_planes.py {args.workdir}"
           f"{' --out ' + args.out if args.out else ''}`", "",
           "| bsq checkpoint (epoch) | weights | levels changed | layers | "
           "precisions changed |", "|---|---|---|---|---|"]
  for epoch, total, changed, layers, bits in rows:
    lines.append(f"| {epoch} | {total:,} | {changed:,} ({100 * changed / total:.3f}%)"
                 f" | {layers} | {bits} |")
  text = "\n".join(lines) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
