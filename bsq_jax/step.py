"""One train step and one eval step: pure functions of (state, batch).

Both run inside `jax.pmap` with `axis_name`: gradients, metrics and (inside
the model) BatchNorm statistics and activation scales are reduced across
devices, so the result does not depend on the device count.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from bsq_jax import optim

AUX_WEIGHT = 0.4  # Inception-V3's auxiliary-classifier loss weight


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def _pmean(x, axis_name: Optional[str]):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def make_train_step(model, tx: optax.GradientTransformation, roles: Any,
                    total_params: int, axis_name: Optional[str]) -> Callable:
  """(state, images, labels, key) -> (state, metrics), for use under pmap.

  `key` feeds dropout (Inception-V3's head); models without dropout ignore
  it, and XLA drops it from their step.
  """

  def loss_fn(params, batch_stats, images, labels, key):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                               images, train=True, mutable=["batch_stats"],
                               rngs={"dropout": key})
    logits, aux = out if isinstance(out, tuple) else (out, None)
    loss = cross_entropy(logits, labels)
    if aux is not None:
      loss = loss + AUX_WEIGHT * cross_entropy(aux, labels)
    return loss, (logits, updates["batch_stats"])

  def step(state: TrainState, images, labels, key) -> Tuple[TrainState, Dict]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, images, labels, key)
    grads = _pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.project(optax.apply_updates(state.params, updates), roles)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "penalty": optim.penalty(state.params) / total_params,
    }
    return (TrainState(params, batch_stats, opt_state),
            _pmean(metrics, axis_name))

  return step


def make_eval_step(model, axis_name: Optional[str]) -> Callable:
  """(params, batch_stats, images, labels, mask) -> summed loss/correct/count."""

  def step(params, batch_stats, images, labels, mask):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         images, train=False)
    labels = jnp.maximum(labels, 0)  # padding (-1) counts 0 through the mask
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {"loss": jnp.sum(losses * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "count": jnp.sum(mask)}
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)

  return step
