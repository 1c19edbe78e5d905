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


DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("case,taken", [
    (dict(), True),                                   # plain: hand-written
    (dict(rhs_dilation=(2, 2)), False),               # dilated: XLA's
    (dict(feature_group_count=2), False),             # grouped: XLA's
    (dict(window_strides=(1, 2)), False),             # uneven strides
    (dict(precision=jax.lax.Precision.HIGHEST), False),
])
def test_dispatch_takes_the_hand_written_kernel_gradient_only_when_plain(
    case, taken, monkeypatch):
  """What nn.Conv calls, `conv.conv_general_dilated`: the plain 2-D NHWC
  case goes to `conv2d`, everything else to lax, with the same output."""
  calls = []
  real = conv.conv2d
  monkeypatch.setattr(conv, "conv2d", lambda *a: calls.append(a) or real(*a))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 // case.get(
      "feature_group_count", 1), 6))
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)
  args.update(case)
  out = conv.conv_general_dilated(x, w, **args)
  np.testing.assert_allclose(out, jax.lax.conv_general_dilated(x, w, **args),
                             rtol=1e-5, atol=1e-5)
  assert bool(calls) == taken


def test_bsq_jax_conv_xla_turns_the_hand_written_path_off(monkeypatch):
  calls = []
  monkeypatch.setattr(conv, "conv2d", lambda *a: calls.append(a))
  monkeypatch.setenv("BSQ_JAX_CONV", "xla")
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  assert not calls
