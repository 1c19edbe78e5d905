"""Spec sections 2-4 and 6 on single tensors, with the spec's worked examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import bitplanes as bp


def planes_of(ints, n, scale=1.0):
  """Binary planes holding the signed integers `ints` at precision n."""
  q = np.asarray(ints)
  return bp.BitPlanes(bp._to_planes(np.maximum(q, 0), n),
                      bp._to_planes(np.maximum(-q, 0), n),
                      np.float32(scale))


def test_encode_worked_example():
  planes = bp.encode(np.array([0.5, -0.25, 0.1, -1.0]), 3)
  np.testing.assert_array_equal(
      planes.pos, [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(
      planes.neg, [[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
  assert planes.scale == 1.0 and planes.bits == 3
  np.testing.assert_allclose(bp.weight(planes), [4 / 7, -2 / 7, 1 / 7, -1.0],
                             rtol=1e-6)


def test_encode_zero_tensor_has_zero_scale_and_planes():
  planes = bp.encode(np.zeros((2, 3)), 4)
  assert float(planes.scale) == 0.0 and not planes.pos.any()
  assert np.all(np.asarray(bp.weight(planes)) == 0)


def test_encode_traced_equals_host():
  w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
  host = bp.encode(w, 6)
  traced = jax.jit(lambda v: bp.encode(v, 6, jnp))(w)
  for a, b in zip(host, traced):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", range(1, 9))
def test_encode_roundtrip_error_is_half_a_step(n):
  w = np.random.default_rng(n).normal(size=(200,)).astype(np.float32)
  used = np.asarray(bp.weight(bp.encode(w, n)))
  step = np.abs(w).max() / bp.steps(n)
  assert np.max(np.abs(used - w)) <= step / 2 + 1e-6


def test_group_lasso_worked_example():
  planes = bp.encode(np.array([0.5, -0.25, 0.1, -1.0]), 3)
  m, n = 4, 3
  assert m * n * float(bp.group_lasso(planes)) == pytest.approx(50.9117, abs=1e-4)


def test_group_lasso_gradient_matches_formula():
  rng = np.random.default_rng(1)
  planes = bp.BitPlanes(rng.uniform(0, 2, (5, 3, 4)).astype(np.float32),
                        rng.uniform(0, 2, (5, 3, 4)).astype(np.float32),
                        np.float32(0.7))
  def formula(pos, neg):
    per_bit = jnp.sum(pos**2, axis=(0, 1)) + jnp.sum(neg**2, axis=(0, 1))
    return jnp.sum(jnp.sqrt(1e-8 + per_bit))
  got = jax.grad(lambda p: bp.group_lasso(p))(planes)
  want_pos, want_neg = jax.grad(formula, argnums=(0, 1))(planes.pos, planes.neg)
  np.testing.assert_allclose(got.pos, want_pos, rtol=1e-6)
  np.testing.assert_allclose(got.neg, want_neg, rtol=1e-6)
  # Analytically, d/d pos_b = pos_b / norm_b.
  norms = np.sqrt(1e-8 + (planes.pos**2).sum((0, 1)) + (planes.neg**2).sum((0, 1)))
  np.testing.assert_allclose(got.pos, planes.pos / norms, rtol=1e-5)
  assert float(np.asarray(got.scale)) == 0.0


@pytest.mark.parametrize("n", [1, 3, 8])
def test_weight_gradient_is_straight_through(n):
  rng = np.random.default_rng(n)
  planes = bp.BitPlanes(rng.uniform(0, 2, (7, n)).astype(np.float32),
                        rng.uniform(0, 2, (7, n)).astype(np.float32),
                        np.float32(0.3))
  upstream = rng.normal(size=(7,)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.sum(bp.weight(p) * upstream))(planes)
  place = 2.0**(n - 1 - np.arange(n)) / bp.steps(n)
  want = 0.3 * place[None, :] * upstream[:, None]
  np.testing.assert_allclose(grads.pos, want, rtol=1e-5)
  np.testing.assert_allclose(grads.neg, -want, rtol=1e-5)


def test_weight_at_precision_zero_is_zero_without_nan():
  planes = bp.BitPlanes(np.zeros((3, 2, 0), np.float32),
                        np.zeros((3, 2, 0), np.float32), np.float32(0.5))
  w = bp.weight(planes)
  assert w.shape == (3, 2) and not np.any(np.asarray(w))
  g = jax.grad(lambda p: jnp.sum(bp.weight(p)))(planes)
  assert np.all(np.isfinite(np.asarray(g.scale)))
  assert float(bp.group_lasso(planes)) == 0.0


@pytest.mark.parametrize("mode", ["finetune", "bsq"])
def test_precision_zero_dense_after_a_pool_gives_its_bias_under_jit(mode):
  """A 0-bit dense layer after a global average pool, jitted: the output
  is the bias, every call. With `zeros * scale` as the weight, XLA:CPU's
  YNNPACK fusion (jaxlib 0.10.2) of the pool and the dot returned garbage
  here (NaN or 1e30 logits, a different one per call): the finetune test
  loss of a run whose BSQ zeroed every layer read 0.0."""
  scale = np.float32(0.002)
  node = (bp.Levels(np.zeros((32, 10), np.float32), scale) if mode == "finetune"
          else bp.BitPlanes(np.zeros((32, 10, 0), np.float32),
                            np.zeros((32, 10, 0), np.float32), scale))
  used = ((lambda v: bp.level_weight(v, 0)) if mode == "finetune"
          else bp.weight)

  @jax.jit
  def head(x, node, bias):
    pooled = jnp.mean(jnp.maximum(x, 0.1), axis=(1, 2))
    return pooled @ used(node) + bias

  x = np.random.default_rng(0).random((128, 8, 8, 32), np.float32)
  bias = np.arange(10, dtype=np.float32)
  for _ in range(5):
    np.testing.assert_array_equal(head(x, node, bias),
                                  np.broadcast_to(bias, (128, 10)))


def test_weight_rounds_half_to_even_and_clips():
  # c = 1.5 / 3 = 0.5 -> 0.5 * 3 = 1.5 rounds to 2; c > 1 is clipped.
  planes = bp.BitPlanes(np.array([[0.75, 0.0], [2.0, 2.0]], np.float32),
                        np.zeros((2, 2), np.float32), np.float32(1.0))
  np.testing.assert_allclose(bp.weight(planes), [2 / 3, 1.0], rtol=1e-6)


@pytest.mark.parametrize("ints,n,want_n,want_s,want_ints", [
    ([3, -2, 1, 0], 4, 2, 0.2, [3, -2, 1, 0]),
    ([6, -4, 2, 0], 3, 2, 6 / 7, [3, -2, 1, 0]),
    ([0, 0, 0, 0], 3, 1, 1 / 7, [0, 0, 0, 0]),
])
def test_requantize_worked_examples(ints, n, want_n, want_s, want_ints):
  out = bp.requantize(planes_of(ints, n))
  assert out.bits == want_n
  assert float(out.scale) == pytest.approx(want_s, rel=1e-6)
  np.testing.assert_array_equal(bp.integers(out), want_ints)


def test_requantize_clips_at_max_bits():
  planes = bp.BitPlanes(np.full((4, 8), 2.0, np.float32),
                        np.zeros((4, 8), np.float32), np.float32(1.0))
  out = bp.requantize(planes)
  assert out.bits == 8 and float(out.scale) == pytest.approx(1.0)
  np.testing.assert_array_equal(bp.integers(out), [255] * 4)


def test_requantize_grows_precision_by_one():
  planes = bp.BitPlanes(np.array([[1.9, 1.0], [0, 0]], np.float32),
                        np.zeros((2, 2), np.float32), np.float32(1.0))
  out = bp.requantize(planes)
  assert out.bits == 3
  assert float(out.scale) == pytest.approx(7 / 3, rel=1e-6)
  np.testing.assert_array_equal(bp.integers(out), [5, 0])


def test_requantize_keeps_precision_zero():
  planes = bp.BitPlanes(np.zeros((3, 0), np.float32),
                        np.zeros((3, 0), np.float32), np.float32(1.0))
  assert bp.requantize(planes).bits == 0


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("spread", [1.0, 2.0])
def test_requantize_gives_nearest_level(n, spread):
  """s * round(c K) / K to 1e-6, precision +1 exactly when a level overflows.

  spread=1 keeps planes in [0, 1] (|c| <= 1 mostly); spread=2 uses [0, 2].
  """
  rng = np.random.default_rng(10 * n + int(spread))
  shape = (6, 5, n)
  planes = bp.BitPlanes(rng.uniform(0, spread, shape).astype(np.float32),
                        rng.uniform(0, spread, shape).astype(np.float32),
                        np.float32(rng.uniform(0.1, 2.0)))
  k = bp.steps(n)
  c = bp.unscaled(planes, np)
  q = np.round(c * k)
  out = bp.requantize(planes)
  overflow = np.abs(q).max() > k
  if n == 8:
    q = np.clip(q, -k, k)
    assert out.bits <= 8
  elif overflow:
    assert out.bits <= n + 1 and np.abs(bp.integers(out)).max() > 0
  else:
    assert out.bits <= n
  want = float(planes.scale) * q / k
  got = float(out.scale) * bp.integers(out) / bp.steps(out.bits)
  np.testing.assert_allclose(got, want, atol=1e-6 * float(planes.scale) * 4)
  # Where |c| <= 1 this is exactly the weight the forward pass used.
  inside = np.abs(c) <= 1
  np.testing.assert_allclose(got[inside], np.asarray(bp.weight(planes))[inside],
                             atol=1e-5)
  # The result is binary planes, and requantizing again changes nothing.
  assert set(np.unique(out.pos)) <= {0.0, 1.0}
  again = bp.requantize(out)
  assert again.bits == out.bits
  np.testing.assert_array_equal(bp.integers(again), bp.integers(out))


def test_requantize_growth_happens_exactly_when_levels_overflow():
  rng = np.random.default_rng(3)
  grown = 0
  for trial in range(40):
    n = int(rng.integers(1, 8))
    planes = bp.BitPlanes(rng.uniform(0, 2, (4, n)).astype(np.float32),
                          np.zeros((4, n), np.float32), np.float32(1.0))
    q = np.round(bp.unscaled(planes, np) * bp.steps(n))
    out = bp.requantize(planes)
    # The new top level needs n+1 bits iff some q > K(n).
    needs = int(q.max()).bit_length() if q.max() > 0 else 1
    assert out.bits <= max(needs, 1) <= n + 1
    grown += q.max() > bp.steps(n)
    if q.max() > bp.steps(n):
      # Growth: the largest level uses the new MSB.
      assert np.abs(bp.integers(out)).max() >= 2**(out.bits - 1)
  assert grown > 0


def test_encode_levels_keeps_scale():
  c = np.array([0.5, -1.0, 0.3, 1.4], np.float32)
  planes = bp.encode_levels(c, 3, np.float32(0.25))
  assert float(planes.scale) == 0.25
  np.testing.assert_array_equal(bp.integers(planes), [4, -7, 2, 7])
