"""2-D convolution with a kernel gradient that XLA's CPU backend runs fast.

XLA lowers a convolution's kernel gradient to a convolution whose window is
the whole output map; its CPU backend runs that about 20x slower than the
forward convolution (3x3, 16 -> 16 channels, 32x32, batch 128: forward
14 ms, kernel gradient 262 ms on a 2-core machine). Written as one matrix
product per kernel tap, sum over positions of x[tap-shifted] * dy, it
takes 68 ms. The input gradient keeps XLA's own transpose (12 ms).
The gain depends on the machine: the whole ResNet-20 step was 2.7x faster
with it on that machine, 1.34-1.43x on a later one of the same kind
(results/speed.md, the `BSQ_JAX_CONV=xla` trial).

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature, so
it is what `nn.Conv` calls (`bsq_jax.quantize` sets it on every plain
`nn.Conv`); the cases the per-tap gradient does not cover (dilation,
groups, other layouts or ranks) go to XLA unchanged.

Only on CPU: GPU libraries have fast kernel gradients of their own.
`BSQ_JAX_CONV=xla` in the environment keeps XLA's gradient on CPU too
(benchmarks/speed.py compares the two that way).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def _conv(x, w, stride: int, pad: Padding):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _use_cpu_kernel_grad() -> bool:
  return (jax.default_backend() == "cpu"
          and os.environ.get("BSQ_JAX_CONV") != "xla")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None,
                         **extra):
  """`jax.lax.conv_general_dilated`, with the per-tap kernel gradient on CPU
  for the plain 2-D NHWC x HWIO case. `extra`: newer arguments of lax's
  (NNX's Conv passes `out_sharding`), passed on to it."""
  plain = (lhs.ndim == 4 and _is_nhwc_hwio(dimension_numbers, lhs, rhs)
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and feature_group_count == 1 and batch_group_count == 1
           and precision is None and preferred_element_type is None
           and all(v is None for v in extra.values())
           and len(set(window_strides)) == 1)
  if not (plain and _use_cpu_kernel_grad()):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, **extra)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                      window_strides, padding)
  return conv2d(lhs, rhs, int(window_strides[0]), padding)


def _is_nhwc_hwio(dimension_numbers, lhs, rhs) -> bool:
  want = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is None:
    return False
  return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        dimension_numbers) == want


def conv2d(x: jax.Array, w: jax.Array, stride: int,
           pad: Union[str, Sequence[Sequence[int]]]) -> jax.Array:
  """NHWC x HWIO convolution; `pad` is "VALID" or (lo, hi) per side."""
  if pad == "VALID":
    pad = ((0, 0), (0, 0))
  pad = tuple(tuple(int(v) for v in p) for p in pad)
  if _use_cpu_kernel_grad():
    return _cpu_conv(x, w, stride, pad)
  return _conv(x, w, stride, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv(x, w, stride: int, pad: Padding):
  return _conv(x, w, stride, pad)


def _cpu_conv_fwd(x, w, stride, pad):
  return _conv(x, w, stride, pad), (x, w)


def _cpu_conv_bwd(stride, pad, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda v: _conv(v, w, stride, pad), x)
  return input_vjp(dy)[0], kernel_grad(x, dy, w.shape, stride, pad)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def kernel_grad(x, dy, shape, stride: int, pad: Padding) -> jax.Array:
  """d loss / d w for y = conv(x, w): one (Cin x M) @ (M x Cout) per tap."""
  kh, kw, cin, cout = shape
  n, ho, wo, _ = dy.shape
  xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  flat_dy = dy.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = jax.lax.slice(
          xp, (0, i, j, 0),
          (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
          (1, stride, stride, 1))
      taps.append(jax.lax.dot_general(patch.reshape(-1, cin), flat_dy,
                                      (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(kh, kw, cin, cout).astype(dy.dtype)
