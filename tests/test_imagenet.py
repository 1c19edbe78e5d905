"""ImageNet models (ResNet-50, Inception-V3), torchvision import, data pipeline.

The torchvision comparisons run only where torch and torchvision are installed
(not in CI); everything else runs on the JAX CPU backend in seconds.
"""

import functools
import importlib
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from bsq_jax import bitplanes as bp
from bsq_jax import pretrained
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.models import build_model, input_shape
from bsq_jax.models import memory_bytes
from bsq_jax.train import train_and_evaluate


def _shapes(cfg, mode="float", bits=8):
  return _cached_shapes(tuple(sorted(cfg.items())), mode, bits)


@functools.lru_cache(maxsize=None)
def _cached_shapes(cfg_items, mode, bits):
  cfg = dict(cfg_items)
  model = build_model(cfg, Quant(mode, None, bits))
  x = jax.ShapeDtypeStruct((1,) + input_shape(cfg), jnp.float32)
  return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), x)


def _count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))


RESNET50 = {"name": "resnet50", "act_bits": 32}
INCEPTION = {"name": "inception_v3", "act_bits": 32}


# --------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("cfg, expected", [
    (RESNET50, 25_557_032),
    (INCEPTION, 27_161_264),
    (dict(INCEPTION, aux_logits=False), 23_834_568),
])
def test_parameter_counts_equal_torchvision(cfg, expected):
  # torchvision's sum(p.numel() for p in model.parameters()), BN stats excluded.
  assert _count(_shapes(cfg)["params"]) == expected


def test_input_shapes_default_and_override():
  assert input_shape(RESNET50) == (224, 224, 3)
  assert input_shape(INCEPTION) == (299, 299, 3)
  assert input_shape(dict(RESNET50, image_size=64)) == (64, 64, 3)


def test_inception_aux_head_needs_299():
  with pytest.raises(ValueError, match="aux_logits"):
    build_model(dict(INCEPTION, image_size=128))
  build_model(dict(INCEPTION, image_size=128, aux_logits=False))


def test_resnet50_quantizes_every_conv_and_fc_shortcuts_by_flag():
  names = set(sch.scheme_of(_shapes(RESNET50, "bsq")["params"]))
  assert len(names) == 53 + 2  # 49 + 4 shortcut convs, fc kernel and bias
  assert "conv1/kernel" in names and "fc/bias" in names
  assert "layer2_0/downsample_conv/kernel" in names
  off = set(sch.scheme_of(_shapes(dict(RESNET50, quantize_shortcut=False),
                                  "bsq")["params"]))
  assert names - off == {f"layer{i}_0/downsample_conv/kernel"
                         for i in range(1, 5)}


def test_inception_quantizes_every_conv_and_both_classifiers():
  params = _shapes(INCEPTION, "bsq")["params"]
  names = set(sch.scheme_of(params))
  assert len(names) == 96 + 4  # 94 convs + the auxiliary head's 2
  assert {"fc/kernel", "fc/bias", "AuxLogits/fc/kernel", "AuxLogits/fc/bias",
          "Mixed_6b/branch7x7_2/conv/kernel"} <= names
  assert params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].pos.shape == (
      1, 7, 128, 128, 8)


def test_activation_quantizers_sit_where_the_docstrings_say():
  # With PACT (act_bits <= 3) every quantized activation owns a pact_alpha.
  def quantized_acts(cfg):
    flat = jax.tree_util.tree_flatten_with_path(_shapes(cfg)["params"])[0]
    return {"/".join(k.key for k in p[:-1]) for p, _ in flat
            if p[-1].key == "pact_alpha"}

  acts = quantized_acts(dict(RESNET50, act_bits=2))
  assert len(acts) == 16 * 3
  assert {"layer1_0/act1", "layer1_0/act2", "layer4_2/act3"} <= acts
  acts = quantized_acts(dict(INCEPTION, act_bits=2))
  assert len(acts) == 96 - 1
  assert "Conv2d_1a_3x3/act" not in acts and "Conv2d_2a_3x3/act" in acts


def test_memory_bytes_bsq_holds_2_bits_planes_per_weight():
  for cfg in (RESNET50, INCEPTION):
    f, b = memory_bytes(cfg, "float"), memory_bytes(cfg, "bsq", 8)
    sizes = sch.sizes_of(_shapes(cfg, "bsq")["params"])
    m, layers = sum(sizes.values()), len(sizes)
    # Each quantized weight: 4 bytes -> 2 * 8 planes * 4 bytes; + a scale each.
    assert b["params"] - f["params"] == m * 4 * 15 + 4 * layers
    # The planes grow the gradients and the momentum as much as the params.
    assert b["total"] - f["total"] == 3 * (b["params"] - f["params"])
    assert b["batch_stats"] == f["batch_stats"]
  assert memory_bytes(RESNET50, "float")["params"] == 25_557_032 * 4
  # torchvision's 25,557,032 less BatchNorm's 53,120: every conv kernel and
  # the head's kernel and bias are quantized.
  assert sum(sch.sizes_of(_shapes(RESNET50, "bsq")["params"]).values()) == (
      25_503_912)


# --------------------------------------------------------------------------
# torchvision import without torch: a state_dict made from Flax shapes.


def _fake_state_dict(model, x, seed=0):
  """Random numpy state_dict in torch layout (OIHW, (out, in)) for `model`."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path[1:])
    value = rng.normal(size=leaf.shape).astype(np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
    out[pretrained.cifar_torch_name(keys)] = value
  return out


def test_load_resnet50_state_dict_with_pact_activations():
  from bsq_jax.models.imagenet_resnet import ImageNetResNet
  sd = _fake_state_dict(ImageNetResNet(),  # plain: float ReLUs, no PACT
                        jnp.zeros((1, 32, 32, 3)))
  model, variables = pretrained.load_torchvision_resnet50(sd, act_bits=2)
  p = variables["params"]
  np.testing.assert_array_equal(
      p["layer3_1"]["conv2"]["kernel"],
      sd["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"],
                                sd["bn1.running_var"])
  assert float(p["layer1_0"]["act3"]["pact_alpha"]) == 10.0
  with pytest.raises(ValueError, match="missing key 'layer4.2.bn3.bias'"):
    pretrained.load_torchvision_resnet50(
        {k: v for k, v in sd.items() if k != "layer4.2.bn3.bias"}, act_bits=4)


# --------------------------------------------------------------------------
# One BSQ step on each model, re-quantization, finetune forward.


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# XLA's CPU backend at optimisation level 0 compiles these graphs ~5x faster.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _float_variables(model, x, seed=0):
  """Random float variables from shapes alone (no init to compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      return np.ones(leaf.shape, np.float32)
    if name in ("mean", "bias"):
      return np.zeros(leaf.shape, np.float32)
    if name in ("scale", "pact_alpha"):
      return np.full(leaf.shape, 1.0 if name == "scale" else 10.0, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _bsq_cycle(cfg, batch=2):
  """Float start -> 8-bit planes -> one SGD step -> requantize -> finetune."""
  x = jax.random.normal(jax.random.key(1), (batch,) + input_shape(cfg))
  labels = jnp.arange(batch) % cfg["num_classes"]
  variables = _float_variables(build_model(cfg), x)
  scheme = sch.uniform_scheme(build_model(cfg), x, 8)
  params = sch.float_to_bsq(variables["params"], scheme)
  stats = variables["batch_stats"]
  model = build_model(cfg, Quant("bsq", freeze_scheme(scheme)))

  def loss_fn(p):
    out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
    if isinstance(out, tuple):  # Inception in training: (logits, aux)
      loss = _cross_entropy(out[0], labels) + 0.4 * _cross_entropy(out[1],
                                                                   labels)
    else:
      loss = _cross_entropy(out, labels)
    return loss, new["batch_stats"]

  (loss, stats), grads = _run(jax.value_and_grad(loss_fn, has_aux=True),
                              params)
  assert np.isfinite(float(loss))
  assert float(jnp.abs(grads["fc"]["kernel"].pos).sum()) > 0
  # SGD and the plane clip on the host (eager JAX would compile every op).
  params = jax.tree.map(
      lambda r, p, g: (np.clip if r == sch.PLANE else lambda v, *_: v)(
          np.asarray(p) - 0.1 * np.asarray(g), 0.0, 2.0),
      sch.roles(params), params, grads)
  params, _ = sch.requantize_params(params, max_bits=8)
  fparams, fscheme = sch.bsq_to_finetune(params)
  fmodel = build_model(cfg, Quant("finetune", freeze_scheme(fscheme)))
  logits = _run(lambda p: fmodel.apply({"params": p, "batch_stats": stats},
                                       x), fparams)
  assert logits.shape == (batch, cfg["num_classes"])
  assert np.all(np.isfinite(np.asarray(logits)))
  return sch.account(params)


SLOW = pytest.mark.skipif(not os.environ.get("BSQ_JAX_SLOW_TESTS"),
                          reason="a minute or more on 2 CPU cores; set "
                                 "BSQ_JAX_SLOW_TESTS=1")


@SLOW
def test_inception_bsq_step_with_aux_requantize_finetune():
  # The auxiliary head needs 299x299; a thin network keeps it fast (50 s).
  _bsq_cycle({"name": "inception_v3", "act_bits": 4, "num_classes": 10,
              "width_mult": 1 / 32}, batch=1)


# --------------------------------------------------------------------------
# Against torchvision (skipped without it).


def _randomize(torch_model, seed=0):
  """Random weights that keep activations O(1), and non-trivial BN stats."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in torch_model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      u = torch.rand(t.shape, generator=gen)
      if name.endswith("running_var") or (t.ndim == 1 and
                                          name.endswith(".weight")):  # BN
        t.copy_(0.5 + u)
      elif t.ndim == 1:
        t.copy_(0.2 * (u - 0.5))
      else:
        fan_in = t[0].numel()
        t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
  return torch_model.eval()


def _quantize_like_bsq(sd, quantized_torch_names, bits):
  """Spec section 3 in float32: q = round(|w| K / s), w_q = s q / K sign(w)."""
  k = np.float32(bp.steps(bits))
  out = dict(sd)
  for name in quantized_torch_names:
    w = sd[name].astype(np.float32)
    s = np.abs(w).max()
    q = np.round(np.maximum(w, 0) * k / s) - np.round(np.maximum(-w, 0) * k / s)
    out[name] = (s * (q / k)).astype(np.float32)
  return out


def _compare(torch_model, load, x_nchw, **kw):
  import torch
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x_nchw)).numpy()
  model, variables = load(sd, act_bits=32, **kw)
  err_float = np.abs(np.asarray(model.apply(variables, x)) - ref).max()

  model, variables = load(sd, act_bits=32, weight_bits=8, **kw)
  names = [pretrained.cifar_torch_name(tuple(n.split("/")))
           for n in sch.scheme_of(variables["params"])]
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in
                               _quantize_like_bsq(sd, names, 8).items()})
  with torch.no_grad():
    ref8 = torch_model(torch.from_numpy(x_nchw)).numpy()
  out8 = np.asarray(model.apply(variables, x))
  err8 = np.abs(out8 - ref8).max()
  print(f"max |logit| {np.abs(ref).max():.3g}; max abs error float "
        f"{err_float:.3g}, 8-bit {err8:.3g}; 8-bit vs float "
        f"{np.abs(out8 - ref).max():.3g}")
  scale = np.abs(ref).max()
  assert err_float <= 1e-4 * scale
  assert err8 <= 1e-4 * scale


def test_resnet50_matches_torchvision():
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = _randomize(tv.models.resnet50(weights=None))
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  _compare(net, pretrained.load_torchvision_resnet50, x)


def test_inception_v3_matches_torchvision():
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  # transform_input=True, as torchvision's pretrained weights use.
  net = _randomize(tv.models.inception_v3(weights=None, aux_logits=True,
                                          init_weights=False,
                                          transform_input=True))
  x = np.random.default_rng(0).normal(size=(1, 3, 299, 299)).astype(np.float32)
  _compare(net, pretrained.load_torchvision_inception_v3, x)


# --------------------------------------------------------------------------
# Data pipeline on synthetic JPEGs (no tfds preparation).


@pytest.fixture(scope="module")
def tf():
  from bsq_jax.data import imagenet
  return imagenet._tf()


def _jpegs(tf, shapes):
  rng = np.random.default_rng(0)
  return [tf.io.encode_jpeg(rng.integers(0, 256, s, dtype=np.uint8)).numpy()
          for s in shapes]


def test_missing_manual_dir_is_one_line_value_error(tmp_path):
  from bsq_jax.data import imagenet
  with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar") as e:
    imagenet.check_manual_dir(str(tmp_path))
  assert "\n" not in str(e.value) and "ILSVRC2012_img_val.tar" in str(e.value)
  (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"")
  (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
  imagenet.check_manual_dir(str(tmp_path))


def test_iterators_without_data_raise_value_error(tmp_path, tf):
  from bsq_jax.data import imagenet
  cfg = {"data_dir": str(tmp_path / "tfds"), "manual_dir": str(tmp_path)}
  with pytest.raises(ValueError, match="ILSVRC2012_img_val.tar"):
    imagenet.imagenet_iterators(cfg, 8, 224)


def test_train_and_eval_preprocessing_shapes(tf):
  from bsq_jax.data import imagenet
  big, wide = _jpegs(tf, [(60, 90, 3), (40, 30, 3)])
  for img in (big, wide):
    out = imagenet.preprocess_train(tf.constant(img), tf.constant([1, 2]), 32)
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    out = imagenet.preprocess_eval(tf.constant(img), 32)
    assert out.shape == (32, 32, 3)
  # Stateless: the same seed gives the same crop, another seed another one.
  a = imagenet.preprocess_train(tf.constant(big), tf.constant([1, 2]), 32)
  b = imagenet.preprocess_train(tf.constant(big), tf.constant([1, 2]), 32)
  c = imagenet.preprocess_train(tf.constant(big), tf.constant([3, 4]), 32)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0


def test_eval_is_resize_then_center_crop(tf):
  from bsq_jax.data import imagenet
  # A flat image stays flat: the normalised value of one grey level.
  img = tf.io.encode_jpeg(np.full((50, 70, 3), 128, np.uint8)).numpy()
  out = np.asarray(imagenet.preprocess_eval(tf.constant(img), 28))
  expected = (128 / 255 - np.asarray(imagenet.MEAN_RGB)) / np.asarray(
      imagenet.STD_RGB)
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape),
                             atol=0.05)


def test_batched_datasets_and_prefetch(tf):
  from bsq_jax.data import imagenet
  images = _jpegs(tf, [(40, 48, 3)] * 5)
  ds = tf.data.Dataset.from_tensor_slices({"image": images,
                                           "label": np.arange(5)})
  train = list(imagenet.prefetch(
      imagenet.train_dataset(ds, 16, 2, seed=0, steps=2).as_numpy_iterator()))
  assert len(train) == 2
  assert train[0]["images"].shape == (2, 16, 16, 3)
  assert train[0]["labels"].dtype == np.int32
  ev = list(imagenet.eval_dataset(ds, 16, 2, num_batches=4)
            .as_numpy_iterator())
  assert len(ev) == 4 and all(b["images"].shape == (2, 16, 16, 3) for b in ev)
  labels = np.concatenate([b["labels"] for b in ev])
  mask = np.concatenate([b["mask"] for b in ev])
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, -1, -1, -1])
  np.testing.assert_array_equal(mask, labels >= 0)


def test_prefetch_reraises_and_transforms():
  from bsq_jax.data import imagenet

  def broken():
    yield 1
    raise RuntimeError("boom")

  it = imagenet.prefetch(broken(), transform=lambda v: v * 10)
  assert next(it) == 10
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


# --------------------------------------------------------------------------
# The ImageNet configs through the pipeline, host-fed, on 8 CPU devices.


def _small(name, **model):
  """configs/<name>.py on the host-fed synthetic stream, 1 image per device:
  pretrain 0 epochs (the init), convert, 1 BSQ epoch (2 steps, the host
  pass before it and the final one after), 1 finetune epoch."""
  c = importlib.import_module(f"configs.{name}").get_config()
  c.model.update(dict(num_classes=10, **model))
  c.data.update(dict(name="synthetic_stream", num_classes=10,
                     synthetic_train=16, synthetic_test=8))
  c.update_from_flattened_dict({
      "stages": "pretrain,convert,bsq,finetune", "batch_size": 8,
      "eval_batch_size": 8, "pretrain.epochs": 0, "bsq.epochs": 1,
      "bsq.requant_interval": 1, "finetune.epochs": 1, "bsq.alpha": 2.0})
  return c


@pytest.mark.parametrize("name, model", [
    ("imagenet_resnet50", dict(image_size=32, width=4,
                               stage_sizes=(1, 1, 1, 1))),
    # Inception's ~100 convolutions compile for minutes on 2 CPU cores; 299
    # for its auxiliary head (trained, dropped in evaluation).
    pytest.param("imagenet_inception_v3", dict(width_mult=1 / 32),
                 marks=SLOW),
])
def test_imagenet_config_runs_bsq_host_pass_finetune_on_8_devices(
    name, model, tmp_path):
  assert jax.device_count() == 8
  train_and_evaluate(_small(name, **model), str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  by_stage = {r["stage"]: r for r in records}
  assert set(by_stage) == {"convert", "bsq", "finetune"}  # pretrain: 0 epochs
  bsq, ft = by_stage["bsq"], by_stage["finetune"]
  assert bsq["steps"] == ft["steps"] == 2  # 16 images, 8 per step
  for r in (bsq, ft):
    assert np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"])
    assert 0.0 <= r["test_accuracy"] <= 1.0
  # The host passes dropped planes (alpha 2); finetuning keeps the scheme
  # but counts an all-zero 1-bit tensor as 0 bits.
  assert by_stage["convert"]["average_bits"] == 8.0
  assert bsq["penalty"] > 0 and ft["penalty"] == 0
  assert ft["average_bits"] <= bsq["average_bits"] < 8.0
