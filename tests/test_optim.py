"""The optax chain (spec sections 4, 5) against a hand-written PyTorch SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import optim
from bsq_jax import scheme as sch


def toy_params(rng):
  return {
      "conv": {"kernel": bp.BitPlanes(
          rng.uniform(0, 1.9, (3, 4, 3)).astype(np.float32),
          rng.uniform(0, 1.9, (3, 4, 3)).astype(np.float32), np.float32(0.5))},
      "bn": {"scale": rng.normal(size=(4,)).astype(np.float32)},
      "shortcut": {"kernel": rng.normal(size=(4, 4)).astype(np.float32) * 3},
  }


def torch_style_sgd(params, grads_seq, lr, wd, momentum, alpha, tp):
  """PyTorch's SGD: g += wd p; buf = m buf + g; p -= lr buf (numpy, by hand)."""
  leaves, treedef = jax.tree.flatten(params)
  leaves = [np.asarray(x, np.float64) for x in leaves]
  bufs = [np.zeros_like(x) for x in leaves]
  for grads in grads_seq:
    p_tree = jax.tree.unflatten(treedef, [np.float32(x) for x in leaves])
    reg = jax.tree.leaves(jax.grad(optim.penalty)(p_tree))
    for i, (p, g, r) in enumerate(zip(leaves, jax.tree.leaves(grads), reg)):
      d = np.asarray(g) + alpha / tp * np.asarray(r) + wd * p
      bufs[i] = momentum * bufs[i] + d
      leaves[i] = p - lr * bufs[i]
  return jax.tree.unflatten(treedef, leaves)


def test_chain_matches_pytorch_sgd():
  rng = np.random.default_rng(0)
  params = toy_params(rng)
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(
      np.float32) * 0.1, params) for _ in range(4)]
  tx = optim.make_optimizer(0.1, alpha=0.05, weight_decay=1e-4, total_params=12)
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  want = torch_style_sgd(params, grads_seq, 0.1, 1e-4, 0.9, 0.05, 12)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_penalty_is_m_n_group_lasso():
  planes = bp.encode(np.array([0.5, -0.25, 0.1, -1.0]), 3)
  params = {"a": {"kernel": planes}, "bn": {"scale": np.ones(3, np.float32)}}
  assert float(optim.penalty(params)) == pytest.approx(50.9117, abs=1e-4)


def test_lasso_gradient_scaled_by_alpha_over_tp():
  rng = np.random.default_rng(1)
  params = toy_params(rng)
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optim.bit_lasso(alpha=2.0, total_params=8)
  updates, _ = tx.update(zero, tx.init(params), params)
  want = jax.grad(optim.penalty)(params)
  np.testing.assert_allclose(updates["conv"]["kernel"].pos,
                             0.25 * np.asarray(want["conv"]["kernel"].pos),
                             rtol=1e-6)
  assert not np.any(np.asarray(updates["bn"]["scale"]))
  assert not np.any(np.asarray(updates["shortcut"]["kernel"]))


def test_projection_clips_only_planes():
  rng = np.random.default_rng(2)
  params = toy_params(rng)
  shifted = jax.tree.map(lambda x: x * 5.0 - 4.0, params)
  out = optim.project(shifted, sch.roles(params))
  planes = out["conv"]["kernel"]
  assert float(jnp.min(planes.pos)) >= 0.0 and float(jnp.max(planes.pos)) <= 2.0
  assert float(jnp.min(planes.pos)) == 0.0  # something was clipped
  # Scale, BatchNorm and the float shortcut pass through untouched.
  np.testing.assert_array_equal(planes.scale, shifted["conv"]["kernel"].scale)
  np.testing.assert_array_equal(out["bn"]["scale"], shifted["bn"]["scale"])
  np.testing.assert_array_equal(out["shortcut"]["kernel"],
                                shifted["shortcut"]["kernel"])
  assert np.abs(np.asarray(out["shortcut"]["kernel"])).max() > 2.0


def test_projection_clips_finetune_levels_into_unit_range():
  params = {"fc": {"kernel": bp.Levels(np.array([-3.0, 0.5, 2.0], np.float32),
                                       np.float32(4.0))}}
  out = optim.project(params, sch.roles(params))
  np.testing.assert_array_equal(out["fc"]["kernel"].c, [-1.0, 0.5, 1.0])
  assert float(out["fc"]["kernel"].scale) == 4.0


def test_set_hyperparams_changes_lr_without_new_optimizer():
  params = toy_params(np.random.default_rng(3))
  tx = optim.make_optimizer(0.1, total_params=12, weight_decay=0.0)
  state = optim.set_hyperparams(tx.init(params), learning_rate=0.0, alpha=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  with pytest.raises(KeyError, match="unknown hyperparameter"):
    optim.set_hyperparams(state, lr=1.0)
