"""Quantized layers, activation quantization and the CIFAR ResNet (spec 2, 7, 8)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import layers
from bsq_jax.layers import Quant
from bsq_jax.models import build_model
from bsq_jax.models.cifar_resnet import check_depth

TINY = {"name": "cifar_resnet", "depth": 8, "num_classes": 10, "act_bits": 4,
        "width": 4}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantizer_levels_and_gradient(bits):
  x = jnp.asarray(np.random.default_rng(bits).uniform(0, 6, (64,)), jnp.float32)
  xq = layers.quantize_activation(x, bits, None)
  k = bp.steps(bits)
  s = float(jnp.max(x))
  levels = np.asarray(xq) / s * k
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert np.max(np.abs(np.asarray(xq - x))) <= s / k / 2 + 1e-6
  g = jax.grad(lambda v: jnp.sum(layers.quantize_activation(v, bits, None)))(x)
  np.testing.assert_allclose(g, np.ones(64))
  # Zero stays zero, and an all-zero input gives no NaN.
  z = layers.quantize_activation(jnp.zeros(4), bits, None)
  assert not np.any(np.asarray(z)) and np.all(np.isfinite(np.asarray(z)))


def test_activation_scale_is_global_over_devices():
  n = jax.local_device_count()
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 6, (n, 16)), jnp.float32)
  per_device = jax.pmap(lambda v: layers.quantize_activation(v, 3, "d"),
                        axis_name="d")(x)
  whole = layers.quantize_activation(x.reshape(-1), 3, None).reshape(n, 16)
  np.testing.assert_allclose(per_device, whole, rtol=1e-6)


class _Act(nn.Module):
  """The block activation as the activation rules apply it."""
  act_bits: int

  @nn.compact
  def __call__(self, x):
    return layers.quantize_output(self, x, self.act_bits, "relu", None)


def test_act_kinds_relu6_and_pact():
  x = jnp.linspace(-2.0, 12.0, 57)
  relu6 = _Act(4)
  out = relu6.apply({}, x)
  assert float(out.max()) <= 6.0 + 1e-6 and float(out.min()) == 0.0
  pact = _Act(2)
  v = pact.init(jax.random.key(0), x)
  assert float(v["params"]["pact_alpha"]) == 10.0
  out = pact.apply(v, x)
  assert float(out.max()) <= 10.0 + 1e-6
  g = jax.grad(lambda p: jnp.sum(pact.apply(p, x)))(v)
  assert float(g["params"]["pact_alpha"]) > 0  # x above alpha pulls on alpha


@pytest.mark.parametrize("depth,ok", [(20, True), (8, True), (56, True),
                                      (21, False), (2, False), (18, False)])
def test_depth_must_be_6k_plus_2(depth, ok):
  if ok:
    assert check_depth(depth) == (depth - 2) // 6
  else:
    with pytest.raises(ValueError, match="6k\\+2"):
      check_depth(depth)


def test_three_modes_give_same_logits_for_same_weights():
  """float, bsq and finetune forward passes agree when weights are levels."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  from bsq_jax import scheme as sch
  fmodel = build_model(TINY)
  fvars = fmodel.init(jax.random.key(0), x)
  names = sch.quantized_names(fmodel, x)
  scheme = {n: 5 for n in names}
  bsq_params = sch.float_to_bsq(fvars["params"], scheme)
  ft_params, _ = sch.bsq_to_finetune(bsq_params)
  used = sch.used_weights(bsq_params)
  float_params = sch.map_nodes(lambda p, v: used[p] if p in used else v,
                               bsq_params)
  out = {}
  for mode, params in [("float", float_params), ("bsq", bsq_params),
                       ("finetune", ft_params)]:
    model = build_model(TINY, Quant(mode, scheme))
    out[mode] = model.apply(dict(fvars, params=params), x)
  np.testing.assert_allclose(out["bsq"], out["float"], atol=1e-5)
  np.testing.assert_allclose(out["finetune"], out["float"], atol=1e-5)


def test_quant_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    Quant("int8")


def test_bias_is_quantized_with_own_planes():
  model = build_model(TINY, Quant("bsq", None, 4))
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  bias = v["params"]["fc"]["bias"]
  assert isinstance(bias, bp.BitPlanes) and bias.pos.shape == (10, 4)
