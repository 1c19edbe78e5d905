"""benchmarks/bf16_planes.py: its comparison, on planes made here."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import bf16_planes  # pylint: disable=wrong-import-position
from bsq_jax import bitplanes as bp  # pylint: disable=wrong-import-position


def test_binary_planes_survive_bf16_and_continuous_ones_move():
  rng = np.random.default_rng(0)
  planes = bp.encode(rng.standard_normal((64, 64)), 8)
  assert bf16_planes.compare({"fc": {"kernel": planes}}, 8) == (4096, 0, 1, 0)
  # Mid-BSQ planes are continuous: bfloat16's 8-bit mantissa moves some
  # re-quantized levels, never all of them.
  pos = np.clip(planes.pos + rng.uniform(-0.3, 0.3, planes.pos.shape), 0, 2)
  trained = bp.BitPlanes(pos.astype(np.float32), planes.neg, planes.scale)
  total, changed, layers, _ = bf16_planes.compare({"fc": {"kernel": trained}},
                                                  8)
  assert (total, layers) == (4096, 1) and 0 < changed < total // 10
