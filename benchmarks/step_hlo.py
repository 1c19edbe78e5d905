"""The ResNet-20 train step as the program XLA gets: a hash of its lowered
StableHLO, float and bsq (every layer at 8 bits), for the tree it runs in.

    python benchmarks/step_hlo.py

Two trees that print the same hashes compile the same step, so a timing
difference between them (benchmarks/versus.py) is the machine's noise.
"""

import hashlib
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from bsq_jax import optim  # noqa: E402
from bsq_jax import scheme as sch  # noqa: E402
from bsq_jax.layers import Quant, freeze_scheme  # noqa: E402
from bsq_jax.models import build_model  # noqa: E402
from bsq_jax.step import TrainState, make_train_step  # noqa: E402
from configs import cifar_resnet20  # noqa: E402


def step_hash(mode: str) -> str:
  cfg = cifar_resnet20.get_config().model.to_dict()
  x, y = jnp.zeros((8, 32, 32, 3)), jnp.zeros((8,), jnp.int32)
  floating = build_model(cfg, Quant("float"))
  variables = floating.init(jax.random.key(0), x[:1])
  params, scheme = variables["params"], None
  if mode == "bsq":
    scheme = sch.uniform_scheme(floating, x[:1], 8)
    params = sch.float_to_bsq(jax.device_get(params), scheme)
  model = build_model(cfg, Quant(mode, freeze_scheme(scheme)))
  tx = optim.make_optimizer(0.1, 0.0, 1e-4, 0.9, 1000)
  step = make_train_step(model, tx, sch.roles(params), 1000, None)
  state = TrainState(params, variables["batch_stats"], tx.init(params))
  text = jax.jit(step).lower(state, x, y, jax.random.key(1)).as_text()
  return hashlib.sha256(text.encode()).hexdigest()[:16]


if __name__ == "__main__":
  for name in ("float", "bsq"):
    print(f"{name} {step_hash(name)}")
