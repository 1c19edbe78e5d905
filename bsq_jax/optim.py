"""The optimizer as optax pieces (spec sections 4, 5).

    bit_lasso(alpha, tp)         adds d/dp of alpha * sum_layers m n R / TP
    add_decayed_weights(wd)      coupled decay, g + wd * p (PyTorch's SGD)
    trace(momentum)              buf = momentum * buf + g
    scale_by_learning_rate(lr)   -lr * buf

`learning_rate` and `alpha` are injected hyperparameters: the host sets them
per epoch (`set_hyperparams`) without a recompile. After `apply_updates`,
`project` clips the bit planes into [0, 2] (and finetune c into [-1, 1]);
which leaves those are comes from `scheme.roles`, decided where the model is
built.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bsq_jax import bitplanes as bp
from bsq_jax import scheme as sch


def penalty(params: Any) -> jax.Array:
  """sum over bsq tensors of m * n * group_lasso (section 4, before alpha/TP)."""
  total = jnp.float32(0.0)
  for _, planes in sch.quantized(params):
    if isinstance(planes, bp.BitPlanes):
      m = planes.pos.size // max(planes.bits, 1)
      total += m * planes.bits * bp.group_lasso(planes)
  return total


class BitLassoState(NamedTuple):
  """Stateless; present so optax's inject_hyperparams can carry alpha."""


def bit_lasso(alpha: float, total_params: int) -> optax.GradientTransformation:
  """Adds the gradient of alpha * penalty(params) / TP to the updates."""
  def init_fn(params):
    del params
    return BitLassoState()

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("bit_lasso needs params in update()")
    grad = jax.grad(penalty)(params)
    scale = alpha / total_params
    updates = jax.tree.map(lambda u, g: u + scale * g, updates, grad)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _chain(learning_rate, alpha, weight_decay, momentum, total_params):
  return optax.chain(
      bit_lasso(alpha, total_params),
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate))


def make_optimizer(learning_rate: float, alpha: float = 0.0,
                   weight_decay: float = 1e-4, momentum: float = 0.9,
                   total_params: int = 1) -> optax.GradientTransformation:
  """The BSQ chain with lr and alpha injectable (see `set_hyperparams`)."""
  return optax.inject_hyperparams(_chain, static_args=("total_params",))(
      learning_rate=learning_rate, alpha=alpha, weight_decay=weight_decay,
      momentum=momentum, total_params=total_params)


def set_hyperparams(opt_state, **values):
  """Returns opt_state with new hyperparameter values (e.g. lr, alpha)."""
  hp = dict(opt_state.hyperparams)
  for name, value in values.items():
    if name not in hp:
      raise KeyError(f"unknown hyperparameter {name!r}; have {sorted(hp)}")
    hp[name] = jnp.asarray(value, jnp.asarray(hp[name]).dtype)
  return opt_state._replace(hyperparams=hp)


_BOUNDS = {sch.PLANE: (0.0, 2.0), sch.LEVEL: (-1.0, 1.0)}


def project(params, roles):
  """Clips bit planes into [0, 2] and finetune c into [-1, 1]; nothing else."""
  def clip(role, p):
    bounds = _BOUNDS.get(role)
    return p if bounds is None else jnp.clip(p, *bounds)
  return jax.tree.map(clip, roles, params)
