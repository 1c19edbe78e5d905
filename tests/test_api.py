"""The public API (bsq_jax/__init__.py) on models written as Flax's own
examples write them, defined here with nothing from bsq_jax in them: an NNX
CNN in the style of Flax's MNIST example, an NNX MLP holding its own Rngs,
a linen ResNet whose fields hold partials and classes (Flax's ImageNet
example's shape), and an MLP with a dense layer of 786k weights."""

import contextlib
import functools
import json
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import bsq_jax as bsq
from bsq_jax.models import build_model, fields
from bsq_jax.checkpoint import load_result
from bsq_jax.models.any_flax import model_config
from tiny import kill_resume_and_compare, tiny_config, user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class MnistCNN(nnx.Module):
  """Flax's NNX MNIST CNN, narrower: dropout keys at the call, modes by
  model.train() / model.eval(), 28x28x1 input."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2),
                                      strides=(2, 2))
    self.linear1 = nnx.Linear(7 * 7 * 16, 32, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.5)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = self.avg_pool(nnx.relu(self.batch_norm1(
        self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    return self.linear2(x)


class HeldRngsMLP(nnx.Module):
  """An NNX MLP whose Dropout holds its own stream."""

  def __init__(self, din: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(din, 32, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))))


ModuleDef = Any


class ResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(
        self.conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = self.norm(name="norm_proj")(
          self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
    return self.act(x + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 8
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3),
                                          name="conv_init")(x)))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm,
                           act=self.act,
                           strides=(2, 2) if i and not j else (1, 1))(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


ResNetTiny = functools.partial(ResNet, stage_sizes=[1, 1],
                               block_cls=ResNetBlock)


class WideMLP(nn.Module):
  """A dense layer of 3072 x 256 = 786k weights, with one scale."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(256)(x.reshape((len(x), -1)))))


class BigHeadCNN(nn.Module):
  """A small conv, then one dense layer of 32 x 32 x 8 x 96 = 786k weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(
        nn.Conv(8, (3, 3))(x)))
    return nn.Dense(10)(nn.relu(nn.Dense(96)(x.reshape((len(x), -1)))))


def images(shape, n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n,) + shape).astype(np.float32)
  y = (x.reshape(n, -1)[:, :10].argmax(-1)).astype(np.int32)  # learnable
  return x, y


def models():
  """(name, model, input shape) for the API tests."""
  return [("nnx_mnist_cnn", MnistCNN(rngs=nnx.Rngs(0)), (28, 28, 1)),
          ("nnx_held_rngs", HeldRngsMLP(64, rngs=nnx.Rngs(0, dropout=1)),
           (8, 8, 1)),
          ("linen_resnet", ResNetTiny(num_classes=10,
                                      conv=functools.partial(nn.Conv)),
           (16, 16, 3)),
          ("wide_mlp", WideMLP(), (32, 32, 3)),
          ("big_head_cnn", BigHeadCNN(), (32, 32, 3))]


def own_loop(model, params, batch_stats, x, y, alpha, steps, lr=0.1):
  """A user's loop: the pipeline's chain, the projection after each
  update. Returns params, batch_stats, tx, its state, the losses."""
  total = bsq.account(params, model.quant.scheme).total_params
  tx = optax.chain(bsq.bit_lasso(alpha, total),
                   optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))

  @jax.jit
  def step(params, batch_stats, opt_state, key):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (bsq.project(optax.apply_updates(params, updates)), stats,
            opt_state, loss)

  opt_state, losses = tx.init(params), []
  for i in range(steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                jax.random.key(i))
    losses.append(float(loss))
  return params, batch_stats, tx, opt_state, losses


@pytest.mark.parametrize("name,module,shape", models(),
                         ids=[m[0] for m in models()])
def test_own_loop_lowers_precision_and_saves_what_loads(name, module, shape,
                                                        tmp_path):
  """Through the API alone: a large alpha drops planes at the host pass,
  finetuning trains the fixed scheme, and the saved file loads back to
  identical logits."""
  x, y = images(shape)
  model = bsq.quantize_model(module, bsq.Rules())
  variables = model.init(jax.random.key(0), x[:1])
  params, stats, tx, opt_state, losses = own_loop(
      model, variables["params"], variables.get("batch_stats", {}), x, y,
      alpha=50.0, steps=4)
  assert all(np.isfinite(losses)), losses
  params, opt_state, scheme = bsq.host_pass(params, tx, opt_state)
  assert min(scheme.values()) < 8, scheme
  assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(params))
  ft_params, ft_scheme = bsq.to_finetune(params)
  ft_model = model.finetune(ft_scheme)
  ft_params, stats, *_ = own_loop(ft_model, ft_params, stats, x, y, 0.0, 2,
                                  lr=0.01)
  trained = {"params": ft_params, "batch_stats": stats}
  stats_file = bsq.save(str(tmp_path / f"{name}.bsq"), ft_model, trained, x[:1])
  assert stats_file.average_bits == pytest.approx(
      bsq.account(ft_params, ft_scheme).average_bits)
  loaded, loaded_vars = bsq.load(str(tmp_path / f"{name}.bsq"))
  np.testing.assert_array_equal(loaded.apply(loaded_vars, x[:8]),
                                ft_model.apply(trained, x[:8]))


def test_host_pass_keeps_optimizer_state_where_shapes_stay():
  x, y = images((8, 8, 1))
  model = bsq.quantize_model(HeldRngsMLP(64, rngs=nnx.Rngs(0, dropout=1)))
  params = model.init(jax.random.key(0), x[:1])["params"]
  params, _, tx, opt_state, _ = own_loop(model, params, {}, x, y, 50.0, 3)
  new, kept, scheme = bsq.host_pass(params, tx, opt_state)
  _, fresh, _ = bsq.host_pass(params, tx, opt_state, reset="all")
  trace = lambda s: s[-1][0].trace  # optax.sgd's momentum, by tensor
  for layer in ("fc1", "fc2"):
    old_m = trace(opt_state)[layer]["kernel"].pos
    new_m = trace(kept)[layer]["kernel"].pos
    if scheme[f"{layer}/kernel"] == 8:  # unchanged: momentum kept
      np.testing.assert_array_equal(new_m, old_m)
    else:
      assert not np.any(new_m)
    assert not np.any(trace(fresh)[layer]["kernel"].pos)
  assert jax.tree.structure(new) == jax.tree.structure(params)


@pytest.mark.parametrize("module", [WideMLP(), BigHeadCNN()],
                         ids=["wide_mlp", "big_head_cnn"])
def test_large_layer_scale_stays_finite_with_lsq_and_not_without(module):
  """The divergence the default prevents: at the pipeline's lr 0.1 the one
  scale of a 786k-weight layer takes steps as large as the layer."""
  x, y = images((32, 32, 3), n=128)
  scales = {}
  for scale_grad in ("lsq", "none"):
    model = bsq.quantize_model(module, scale_grad=scale_grad)
    variables = model.init(jax.random.key(0), x[:1])
    params = variables["params"]
    start = float(params["Dense_0"]["kernel"].scale)
    params, *_, losses = own_loop(model, params, variables["batch_stats"], x,
                                  y, 0.3, 10)
    scales[scale_grad] = (float(params["Dense_0"]["kernel"].scale) / start,
                          losses)
  ratio, losses = scales["lsq"]
  assert all(np.isfinite(losses)) and 0.5 < ratio < 2.0, scales["lsq"]
  ratio, losses = scales["none"]
  assert not (all(np.isfinite(losses)) and 0.5 < ratio < 2.0), scales["none"]


def test_nnx_modes_and_dropout_keys_and_the_users_module_untouched():
  module = MnistCNN(rngs=nnx.Rngs(0))
  module.eval()
  model = bsq.quantize_model(module)
  x, _ = images((28, 28, 1), n=8)
  variables = model.init(jax.random.key(0), x[:1])
  train = lambda key: model.apply(variables, x, train=True,
                                  mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(key)})
  a, stats = train(1)
  assert not np.array_equal(a, train(2)[0])  # dropout follows the key
  np.testing.assert_array_equal(a, train(1)[0])
  assert not np.allclose(stats["batch_stats"]["batch_norm1"]["mean"],
                         variables["batch_stats"]["batch_norm1"]["mean"])
  np.testing.assert_array_equal(model.apply(variables, x),
                                model.apply(variables, x))  # eval: no dropout
  assert module.dropout1.deterministic and module.batch_norm1.use_running_average


def test_held_rngs_are_reseeded_per_call():
  model = bsq.quantize_model(HeldRngsMLP(64, rngs=nnx.Rngs(0, dropout=1)))
  x, _ = images((8, 8, 1), n=8)
  variables = model.init(jax.random.key(0), x[:1])
  out = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)})
         for k in (1, 2, 1)]
  assert not np.array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[0], out[2])


def test_fields_with_partials_classes_and_dtypes_round_trip_as_json():
  module = ResNetTiny(num_classes=10, conv=functools.partial(nn.Conv,
                                                             padding="SAME"))
  cfg = model_config(module, (16, 16, 3), 10)
  assert "live" not in cfg
  text = json.dumps(cfg)  # what a checkpoint stores
  rebuilt = build_model(json.loads(text)).model
  assert rebuilt.block_cls is ResNetBlock
  assert rebuilt.conv.func is nn.Conv and rebuilt.conv.keywords == {
      "padding": "SAME"}
  assert fields.decode(fields.encode(jnp.dtype("bfloat16"))) == jnp.bfloat16


def test_a_live_field_rebuilds_in_its_process_and_names_itself_elsewhere():
  module = ResNetTiny(num_classes=10, act=lambda v: nn.relu(v))  # no path
  cfg = model_config(module, (16, 16, 3), 10)
  assert cfg["live"] == ["act"]
  assert build_model(cfg).model is module
  fields._HELD.clear()  # what a new process has  pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"^model\.kwargs\.act of .*ResNet has "
                     r"no JSON form.*new process"):
    build_model(json.loads(json.dumps(cfg)))


def test_a_partial_as_module_path_says_so():
  cfg = {"name": "flax", "module": f"{__name__}:ResNetTiny", "kwargs": {},
         "input_shape": [16, 16, 3], "num_classes": 10}
  with pytest.raises(ValueError, match="functools.partial of ResNet; name "
                     "that class") as e:
    build_model(cfg)
  assert "nnx" not in str(e.value)


def test_a_rule_matching_nothing_lists_the_closest_paths():
  model = bsq.quantize_model(WideMLP(), bsq.Rules(
      weights=[bsq.WeightRule("Dense_O/kernel")]))
  with pytest.raises(bsq.RuleError, match=r"closest: .*Dense_0/kernel"):
    model.quantized_names(jnp.zeros((1, 32, 32, 3)))


def test_own_loop_example_runs_as_written(tmp_path):
  """examples/own_loop.py exactly as written, from another folder, on 3,000
  of its 12,000 training images (OWN_LOOP_IMAGES: the full run takes about
  90 s beside the other tests; seen here: 7.03 bits after the first BSQ
  epoch): it lowers the precision and loads identical logits."""
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip("apt-get install dataset-fashion-mnist")
  env = dict(user_env(), OWN_LOOP_IMAGES="3000")
  done = subprocess.run([sys.executable, os.path.join(ROOT, "examples",
                                                      "own_loop.py")],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  bits = [float(l.split(", ")[1].split()[0]) for l in lines
          if l.startswith("bsq epoch")]
  assert len(bits) == 3 and bits[-1] < 8, done.stdout
  assert "loaded: logits identical" in lines[-1]
  assert (tmp_path / "own_loop.bsq").exists()


def test_a_divergence_names_what_became_non_finite():
  from bsq_jax.stage_loop import _nonfinite  # pylint: disable=import-outside-toplevel
  planes = bsq.BitPlanes(np.zeros((3, 2)), np.full((3, 2), np.nan),
                         np.float32(1))
  params = {"a": {"kernel": np.ones(2)}, "b": {"kernel": planes}}
  message = _nonfinite({"loss": 0.5, "penalty": float("nan")}, params)
  assert message == ("penalty became nan, parameter b/kernel.neg is not "
                     "finite")
  assert _nonfinite({"loss": float("inf")}, {"a": np.ones(2)}) == (
      "loss became inf")


# -- the same models through the pipeline --------------------------------------


def pipeline_config(name):
  """A tiny pipeline run of one model of this file (main.py takes it as
  --config=tests/plain_config.py:<name>): a large alpha for the host pass,
  or, for the models with a 786k-weight layer, the default alpha and lr."""
  module, shape = {
      "nnx_mnist_cnn": (MnistCNN(rngs=nnx.Rngs(0)), (28, 28, 1)),
      "linen_resnet": (ResNetTiny(num_classes=10,
                                  conv=functools.partial(nn.Conv)),
                       (32, 32, 3)),
      "wide_mlp": (WideMLP(), (32, 32, 3)),
      "big_head_cnn": (BigHeadCNN(), (32, 32, 3))}[name]
  changes = {"stages": "pretrain,convert,bsq", "bsq.epochs": 2,
             "bsq.requant_interval": 1, "bsq.alpha": 50.0, "eval_every": 100}
  if name in ("wide_mlp", "big_head_cnn"):  # 12 steps at the defaults
    changes.update({"bsq.alpha": None, "bsq.epochs": 3})
  if name == "nnx_mnist_cnn":  # the model's own 28x28 input
    changes.update({"data.name": "fashion_mnist", "data.image_size": 28,
                    "data.train_subset": 256, "eval_batch_size": 1000})
  config = tiny_config(**changes)
  config.model = ml_collections.ConfigDict(model_config(module, shape, 10))
  return config


@contextlib.contextmanager
def _no_cache():
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
  runs = {}

  def run(name):
    if name not in runs:
      if name == "nnx_mnist_cnn" and not os.path.isdir(FASHION_MNIST):
        pytest.skip("apt-get install dataset-fashion-mnist")
      workdir = str(tmp_path_factory.mktemp(name))
      # Compiled afresh, not from the session's compile cache: in two of
      # three fresh-clone CI runs this worker aborted inside the NNX run's
      # evaluation (Fatal Python error: Aborted), never in a checkout's run;
      # the cache's entries are the one thing that differs by load.
      with _no_cache():
        bsq.train_and_evaluate(pipeline_config(name), workdir)
      runs[name] = workdir
    return runs[name]
  return run


@pytest.mark.parametrize("name", ["nnx_mnist_cnn", "linen_resnet"])
def test_pipeline_lowers_precision_and_its_file_loads_identically(
    name, pipeline_runs, tmp_path):
  workdir = pipeline_runs(name)
  model, variables = bsq.load(workdir, stage="bsq", mode="bsq")
  result = load_result(workdir, "bsq")
  assert min(result.scheme.values()) < 8, result.scheme
  path = str(tmp_path / "model.bsq")
  shape = tuple(result.model_config["input_shape"])
  x = np.random.default_rng(0).normal(size=(4,) + shape).astype(np.float32)
  bsq.save(path, model, variables, x[:1])
  loaded, loaded_vars = bsq.load(path, mode="bsq")
  np.testing.assert_array_equal(loaded.apply(loaded_vars, x),
                                model.apply(variables, x))


@pytest.mark.parametrize("name", ["wide_mlp"])
def test_pipeline_trains_a_large_layer_at_the_defaults(name, pipeline_runs):
  records = [r for r in _records(pipeline_runs(name)) if r["stage"] == "bsq"]
  assert len(records) == 3 and records[-1]["steps"] == 4
  assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["penalty"])
             for r in records)


@pytest.mark.parametrize("name", ["nnx_mnist_cnn", "linen_resnet"])
def test_kill_and_resume_in_a_new_process_gives_the_same_parameters(
    name, pipeline_runs, tmp_path):
  """main.py killed right after a host pass, then resumed: equal to the
  uninterrupted run. The NNX instance and the ResNet's partial field are
  rebuilt in the new process from the config file."""
  kill_resume_and_compare(pipeline_runs(name), tmp_path, name)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_clip_planes_in_a_chain_lands_where_project_does():
  model = bsq.quantize_model(WideMLP())
  x, y = images((32, 32, 3), n=16)
  params = model.init(jax.random.key(0), x[:1])["params"]
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean())(params)
  big = jax.tree.map(lambda g: 1e4 * g, grads)  # steps far out of the box
  tx = optax.chain(optax.sgd(1.0), bsq.clip_planes())
  updates, _ = tx.update(big, tx.init(params), params)
  chained = optax.apply_updates(params, updates)
  unclipped = optax.apply_updates(
      params, optax.sgd(1.0).update(big, optax.sgd(1.0).init(params))[0])
  projected = bsq.project(unclipped)
  outside = unclipped["Dense_0"]["kernel"].pos
  assert float(outside.min()) < 0 or float(outside.max()) > 2  # the premise
  planes = chained["Dense_0"]["kernel"]
  assert float(planes.pos.min()) >= 0 and float(planes.pos.max()) <= 2
  for a, b in zip(jax.tree.leaves(chained), jax.tree.leaves(projected)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_public_names_resolve_and_none_is_also_a_module():
  """`bsq_jax.<name>` must not depend on what was imported before, as it
  would if a name were also a submodule's (importing the module rebinds it)."""
  import pkgutil  # pylint: disable=import-outside-toplevel
  modules = {m.name for m in pkgutil.iter_modules(bsq.__path__)}
  assert not set(bsq.__all__) & modules
  assert all(getattr(bsq, name) is not None for name in bsq.__all__)
  reader = subprocess.run(
      [sys.executable, "-c", "import sys, bsq_jax.packed_format; "
       "print('jax' in sys.modules)"], env=user_env(), capture_output=True,
      text=True, timeout=120)
  assert reader.stdout.strip() == "False", reader.stderr[-2000:]
