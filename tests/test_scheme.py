"""Model-level host pass, conversions and accounting (spec sections 6, 9, 10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant
from bsq_jax.models import build_model

TINY = {"name": "cifar_resnet", "depth": 8, "num_classes": 10, "act_bits": 4,
        "width": 4}
X = jnp.zeros((2, 32, 32, 3))


def init(mode, scheme=None, bits=8, cfg=TINY):
  model = build_model(cfg, Quant(mode, scheme, bits))
  return model, model.init(jax.random.key(0), X)


def test_resnet20_accounting_matches_hand_count():
  cfg = dict(TINY, depth=20, width=16)
  model = build_model(cfg)
  names = sch.quantized_names(model, X)
  assert "layer2_0/downsample_conv/kernel" not in names
  _, variables = init("bsq", cfg=cfg)
  acc = sch.account(variables["params"])
  # stem 3*3*3*16; stage 1: 6 convs 3*3*16*16; stage 2: 3*3*16*32 + 5 of
  # 3*3*32*32; stage 3: 3*3*32*64 + 5 of 3*3*64*64; fc 64*10 + 10 bias.
  hand = (432 + 6 * 2304 + (4608 + 5 * 9216) + (18432 + 5 * 36864) + 640 + 10)
  assert acc.total_params == hand == 268346
  assert len(acc.bits) == 19 + 2  # 19 convs + fc kernel + fc bias
  assert acc.average_bits == 8 and acc.compression == 4.0
  assert acc.total_bits == 8 * hand


def test_accounting_mixed_scheme():
  model, variables = init("bsq")
  names = sch.quantized_names(model, X)
  scheme = {n: (i % 4) + 1 for i, n in enumerate(names)}
  _, variables = init("bsq", scheme)
  acc = sch.account(variables["params"])
  sizes = sch.sizes_of(variables["params"])
  tb = sum(sizes[n] * scheme[n] for n in names)
  assert acc.total_bits == tb
  assert acc.compression == pytest.approx(32 * sum(sizes.values()) / tb)


def test_scheme_mismatch_is_an_error_not_silent():
  model, variables = init("bsq")
  names = sch.quantized_names(model, X)
  other = build_model(TINY, Quant("bsq", {n: 4 for n in names}))
  with pytest.raises(Exception, match="shape"):
    other.apply(variables, X)
  partial = build_model(TINY, Quant("bsq", {names[0]: 4}))
  with pytest.raises(KeyError, match="scheme has no precision"):
    partial.init(jax.random.key(0), X)


def perturbed(params, rng):
  """Continuous planes: the binary planes of `params` plus uniform noise."""
  return sch.map_nodes(lambda _, v: bp.BitPlanes(
      np.clip(np.asarray(v.pos) + rng.uniform(-0.4, 0.6, v.pos.shape), 0, 2
              ).astype(np.float32),
      np.asarray(v.neg, np.float32), v.scale)
      if isinstance(v, bp.BitPlanes) else v, params)


def test_host_pass_preserves_weights_and_returns_scheme():
  rng = np.random.default_rng(0)
  _, variables = init("bsq")
  params = perturbed(variables["params"], rng)
  new, scheme = sch.requantize_params(params)
  assert all(1 <= b <= 8 for b in scheme.values())
  # Each precision is the fewest planes that hold the tensor's levels: the
  # planes are binary, and neither the MSB nor the LSB plane is all zero
  # (either would have been dropped), unless one plane is left.
  lower = False
  for name, planes in sch.quantized(new):
    assert scheme[name] == planes.pos.shape[-1]
    either = np.maximum(np.asarray(planes.pos), np.asarray(planes.neg))
    assert set(np.unique(either)) <= {0.0, 1.0}, name
    used = either.reshape(-1, scheme[name]).any(axis=0)
    assert scheme[name] == 1 or (used[0] and used[-1]), (name, used)
    lower |= scheme[name] < 8
  assert lower  # the perturbation left some tensor fewer planes
  before, after = sch.used_weights(params), sch.used_weights(new)
  for name, planes in sch.quantized(params):
    c = np.asarray(bp.unscaled(planes))
    inside = np.abs(c) <= 1
    np.testing.assert_allclose(np.asarray(after[name])[inside],
                               np.asarray(before[name])[inside],
                               atol=1e-5 * float(planes.scale) + 1e-7)
  # The new scheme builds a model whose forward pass accepts the new params.
  model = build_model(TINY, Quant("bsq", scheme))
  logits = model.apply(dict(variables, params=new), X)
  assert logits.shape == (2, 10)


def test_float_to_bsq_to_finetune_and_back():
  model, fvars = init("float")
  names = sch.quantized_names(model, X)
  scheme = {n: 3 for n in names}
  params = sch.float_to_bsq(fvars["params"], scheme)
  assert sch.scheme_of(params) == scheme
  # Shortcut convolutions stay float arrays.
  assert not isinstance(params["layer2_0"]["downsample_conv"]["kernel"],
                        bp.BitPlanes)
  ft, ft_scheme = sch.bsq_to_finetune(params)
  assert ft_scheme == scheme
  back = sch.finetune_to_bsq(ft, ft_scheme)
  w1 = sch.used_weights(params)
  w2 = sch.used_weights(ft, ft_scheme)
  w3 = sch.used_weights(back)
  for n in names:
    np.testing.assert_allclose(w2[n], w1[n], atol=1e-6)
    np.testing.assert_array_equal(bp.integers(back_node(back, n)),
                                  bp.integers(back_node(params, n)))
    np.testing.assert_allclose(w3[n], w1[n], atol=1e-6)


def back_node(params, name):
  return dict(sch.quantized(params))[name]


def test_one_bit_all_zero_layer_becomes_precision_zero():
  _, variables = init("bsq", bits=1)
  params = variables["params"]
  name = "layer1_0/conv2/kernel"
  params = sch.map_nodes(lambda p, v: v._replace(
      pos=np.zeros_like(v.pos), neg=np.zeros_like(v.neg)) if p == name else v,
      params)
  ft, scheme = sch.bsq_to_finetune(params)
  assert scheme[name] == 0 and scheme["conv1/kernel"] == 1
  # The same scheme, read without converting (the records' `zero_tensors`).
  assert sch.finetune_scheme(params) == scheme
  # fc/bias starts at zero, so it too is a 1-bit tensor with no bit set.
  assert sch.zero_tensors(scheme) == (name, "fc/bias")
  eight = init("bsq")[1]["params"]  # only 1-bit tensors can become 0 bits
  assert sch.finetune_scheme(eight) == sch.scheme_of(eight)
  model = build_model(TINY, Quant("finetune", scheme))
  out = model.apply(dict(variables, params=ft), X)
  assert np.all(np.isfinite(np.asarray(out)))
  assert sch.account(ft, scheme).bits[name] == 0
  back = sch.finetune_to_bsq(ft, scheme)
  assert back_node(back, name).pos.shape[-1] == 0


def test_bit_density_counts_nonzero_planes():
  planes = bp.encode(np.array([0.5, -0.25, 0.1, -1.0]), 3)
  density = sch.bit_density({"x": {"kernel": planes}})["x/kernel"]
  np.testing.assert_allclose(density, [0.5, 0.5, 0.5])


def test_roles_mark_planes_levels_and_floats():
  _, variables = init("bsq")
  roles = sch.roles(variables["params"])
  assert roles["conv1"]["kernel"] == bp.BitPlanes(sch.PLANE, sch.PLANE,
                                                  sch.SCALE)
  assert roles["layer2_0"]["downsample_conv"]["kernel"] == sch.FLOAT
  assert roles["bn1"]["scale"] == sch.FLOAT
