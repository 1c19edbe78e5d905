"""The CPU convolution's hand-written kernel gradient equals XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import conv


@pytest.mark.parametrize("k,stride,pad,size", [
    (3, 1, ((1, 1), (1, 1)), 8),
    (3, 2, ((1, 1), (1, 1)), 8),   # odd output alignment: 8 -> 4
    (3, 2, ((1, 1), (1, 1)), 7),
    (1, 2, "VALID", 8),            # the ResNet shortcut
    (5, 1, ((2, 1), (0, 3)), 9),   # uneven padding
])
def test_gradients_match_xla(k, stride, pad, size):
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, size, size, 4))
  w = jax.random.normal(kw, (k, k, 4, 5))
  lax_pad = ((0, 0), (0, 0)) if pad == "VALID" else pad
  ref = lambda x, w: conv._conv(x, w, stride, lax_pad)
  out = conv._cpu_conv(x, w, stride, lax_pad)
  np.testing.assert_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5)
  r = jax.random.normal(kr, out.shape)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * r)
  got = jax.grad(loss(lambda x, w: conv.conv2d(x, w, stride, pad)), (0, 1))(x, w)
  want = jax.grad(loss(ref), (0, 1))(x, w)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
  assert jax.default_backend() == "cpu"  # the hand-written path was taken
