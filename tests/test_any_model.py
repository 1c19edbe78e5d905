"""BSQ on Flax models this project did not write: the rules, and the whole
pipeline on an ordinary CNN and MLP defined here with nothing from bsq_jax."""

import os
import subprocess
import sys

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import export
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import load_result
from bsq_jax.layers import Quant
from bsq_jax.models import build_model
from bsq_jax.models.any_flax import model_config
from bsq_jax.packed_loader import load_model
from bsq_jax.quantize import QuantizedModel
from bsq_jax.rules import ActRule, RuleError, Rules, WeightRule
from bsq_jax.train import train_and_evaluate
from tiny import copy_run, kill_resume_and_compare, tiny_config, user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = jnp.zeros((2, 32, 32, 3))


class PlainCNN(nn.Module):
  """An ordinary Flax CNN."""
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(self.width * 2, (3, 3), strides=(2, 2))(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10)(x)


class PlainMLP(nn.Module):
  """An ordinary Flax MLP, with no train flag and no BatchNorm."""
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden)(x)
    x = nn.LayerNorm()(nn.relu(x))
    return nn.Dense(10)(x)


class NNXMLP(nnx.Module):
  """An ordinary Flax NNX MLP."""

  def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(din, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x.reshape((x.shape[0], -1)))))


class WithCounter(nn.Module):
  @nn.compact
  def __call__(self, x):
    self.param("count", lambda key: jnp.zeros((), jnp.int32))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class WithOwnLayer(nn.Module):
  """A model with a layer of its own whose weight is also called kernel."""

  class Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("kernel", nn.initializers.ones, (x.shape[-1],))

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(self.Scale()(x.reshape((x.shape[0], -1))))


def names(model, rules):
  return QuantizedModel(model, rules).quantized_names(X)


# -- rules --------------------------------------------------------------------


def test_defaults_quantize_every_kernel_and_nothing_else():
  assert names(PlainCNN(), Rules()) == ("Conv_0/kernel", "Conv_1/kernel",
                                        "Dense_0/kernel")
  with_bias = names(PlainCNN(), Rules(bias=True))
  assert with_bias == ("Conv_0/bias", "Conv_0/kernel", "Conv_1/bias",
                       "Conv_1/kernel", "Dense_0/bias", "Dense_0/kernel")
  # LayerNorm's scale and bias stay float, with the bias option too.
  assert names(PlainMLP(), Rules(bias=True)) == (
      "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")


def test_default_leaves_a_kernel_it_cannot_take_and_a_rule_cannot():
  assert names(WithOwnLayer(), Rules()) == ("Dense_0/kernel",)
  with pytest.raises(RuleError, match="Scale_0/kernel, a parameter of a "
                     "Scale layer"):
    names(WithOwnLayer(), Rules((WeightRule(".*kernel"),)))


def test_first_matching_rule_wins():
  rules = Rules((WeightRule("Conv_1/kernel", False), WeightRule(".*kernel")))
  assert names(PlainCNN(), rules) == ("Conv_0/kernel", "Dense_0/kernel")
  # The same two rules the other way round: the broad one decides all.
  rules = Rules((WeightRule(".*kernel"), WeightRule("Conv_1/kernel", False)))
  with pytest.raises(RuleError, match="'Conv_1/kernel' matches no param"):
    names(PlainCNN(), rules)  # shadowed, so it never matches


def test_scheme_covers_exactly_the_selected_parameters():
  rules = Rules((WeightRule("Dense_0/kernel"),), bias=True)
  model = QuantizedModel(PlainCNN(), rules, Quant("bsq", None, 4))
  variables = model.init(jax.random.key(0), X)
  quantized = dict(sch.quantized(variables["params"]))
  assert set(quantized) == {"Dense_0/kernel", "Dense_0/bias"}
  assert all(v.bits == 4 for v in quantized.values())
  assert not isinstance(variables["params"]["Conv_0"]["kernel"], bp.BitPlanes)


@pytest.mark.parametrize("model,rules,message", [
    (PlainCNN(), Rules((WeightRule("nothing/.*"),)),
     "'nothing/.*' matches no parameter"),
    (PlainCNN(), Rules((WeightRule("BatchNorm_0/scale"),)),
     "matches BatchNorm_0/scale, a parameter of a BatchNorm layer"),
    (WithCounter(), Rules((WeightRule("count"),)), "count, a int32 array"),
    (PlainCNN(), Rules(acts=(ActRule("Conv_0", 4),)),
     "matches Conv_0, a Conv; it replaces bsq_jax.layers.ReLU"),
    (PlainCNN(), Rules(acts=(ActRule("act9", 4, "none"),)),
     "'act9' matches no module"),
])
def test_bad_rules_are_one_line_errors(model, rules, message):
  with pytest.raises(RuleError, match=message) as e:
    names(model, rules)
  assert "\n" not in str(e.value)


def test_model_without_quantizable_parameter_is_an_error():
  class NormOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(x)
  with pytest.raises(RuleError, match="matches no parameter"):
    names(NormOnly(), Rules())


def test_activation_rule_quantizes_a_module_output():
  rules = Rules(acts=(ActRule("Dense_0", 2, "none"),))
  model = QuantizedModel(PlainMLP(), rules)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  seen = {}
  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.path == ("LayerNorm_0",):
      seen["in"] = args[0]  # relu of the quantized Dense_0 output
    return out
  with nn.intercept_methods(grab):
    model.apply(variables, x)
  levels = np.unique(np.asarray(seen["in"]))
  assert len(levels) <= 4  # 2 bits: 0 and up to 3 positive levels


# -- the pipeline through the API ----------------------------------------------


def config_for(module, nnx_kwargs=None, **changes):
  c = tiny_config(**{"stages": "pretrain,convert,bsq", "bsq.epochs": 2,
                     "bsq.requant_interval": 1, "bsq.alpha": 50.0,
                     "eval_every": 100, **changes})
  c.model = ml_collections.ConfigDict(
      model_config(module, (32, 32, 3), 10, Rules(bias=True), nnx_kwargs))
  return c


def _trained(module, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(type(module).__name__))
  train_and_evaluate(config_for(module), workdir)
  return module, workdir


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
  return _trained(PlainCNN(), tmp_path_factory)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  return _trained(PlainMLP(), tmp_path_factory)


@pytest.fixture(params=["cnn_run", "mlp_run"])
def plain_run(request):
  return request.getfixturevalue(request.param)


def test_host_pass_lowers_a_precision_of_a_plain_model(plain_run):
  _, workdir = plain_run
  result = load_result(workdir, "bsq")
  assert set(result.scheme) == set(names(plain_run[0], Rules(bias=True)))
  assert min(result.scheme.values()) < 8  # alpha 50 dropped planes


def test_export_and_load_give_bit_identical_logits(plain_run, tmp_path):
  _, workdir = plain_run
  result = load_result(workdir, "bsq")
  path = str(tmp_path / "model.bsq")
  export.export_model(path, result.model_config, result.mode, result.scheme,
                      result.variables)
  model, variables = load_model(path)
  trained = build_model(result.model_config, Quant("bsq", result.scheme))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                trained.apply(result.variables, x))


def test_kill_and_resume_gives_the_same_parameters(cnn_run, tmp_path):
  """A model of this test file through main.py: killed right after a host
  pass that changed the precision, resumed, equal to the uninterrupted run
  (both start from the fixture's pretrain and convert)."""
  module, workdir = cnn_run
  kill_resume_and_compare(workdir, tmp_path, type(module).__name__)


def test_nnx_model_trains_with_a_host_pass_that_lowers_precision(tmp_path):
  config = config_for(NNXMLP, nnx_kwargs={"din": 32 * 32 * 3, "hidden": 16})
  workdir = str(tmp_path / "nnx")
  train_and_evaluate(config, workdir)
  bsq = load_result(workdir, "bsq")
  assert set(bsq.scheme) == {"fc1/kernel", "fc1/bias", "fc2/kernel",
                             "fc2/bias"}
  assert min(bsq.scheme.values()) < 8  # a host pass dropped planes
  planes = bsq.state.params["fc1"]["kernel"]
  assert isinstance(planes, bp.BitPlanes)
  assert planes.pos.shape == (32 * 32 * 3, 16, bsq.scheme["fc1/kernel"])


def test_nnx_rules_check_the_nnx_layers():
  from bsq_jax.quantize import from_nnx
  model = from_nnx(NNXMLP, 3072, 16, rules=Rules())
  assert model.quantized_names(X) == ("fc1/kernel", "fc2/kernel")
  with pytest.raises(RuleError, match="cannot be intercepted"):
    from_nnx(NNXMLP, 3072, 16, rules=Rules(acts=(ActRule("fc1", 4, "none"),)))


def test_readme_example_runs_as_written_and_converges(tmp_path):
  """The README's own-model example, exactly as written there, run from
  another folder: every stage ends with a finite loss (the MLP's 262k-weight
  layer diverged before LSQ's scale gradient), BSQ lowers the precision and
  finetuning stays well above chance."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("apt-get install dataset-fashion-mnist")
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index("    import flax.linen as nn\n    import bsq_jax as bsq")
  block = text[start:text.index("\n\n", text.index("train_and_evaluate(",
                                                   start))]
  script = tmp_path / "readme_example.py"
  script.write_text("\n".join(line[4:] for line in block.splitlines()))
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                        env=user_env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = {r["stage"]: r for r in _records(str(tmp_path / "workdirs" / "mlp"))
          if "test_accuracy" in r}
  assert rows["bsq"]["average_bits"] < 8
  assert rows["finetune"]["test_accuracy"] > 0.5
  assert all(np.isfinite(r["train_loss"]) for r in _records(
      str(tmp_path / "workdirs" / "mlp")) if "train_loss" in r)


def test_smoke_vit_runs_every_stage_through_main(tmp_path):
  workdir = str(tmp_path / "smoke_vit")
  done = subprocess.run(
      [sys.executable, "main.py", "--config=configs/smoke_vit.py",
       f"--workdir={workdir}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = open(os.path.join(workdir, "summary.md")).read()
  for stage in ("pretrain", "convert", "bsq", "finetune", "scratch",
                "uniform"):
    assert f"| {stage} |" in summary
  bsq = load_result(workdir, "bsq")
  assert "block0/attn/query/kernel" in bsq.scheme
  assert min(bsq.scheme.values()) < 8
  from bsq_jax import inspect_model  # pylint: disable=import-outside-toplevel
  report = inspect_model.inspect_run(workdir)
  pngs = inspect_model.write_plots(report, str(tmp_path / "plots"))
  assert all(os.path.getsize(p) > 1000 for p in pngs)


def test_budget_mode_on_a_plain_model(mlp_run, tmp_path):
  """Budget mode steers a plain model's alpha and reports the target."""
  module, workdir = mlp_run
  got = copy_run(workdir, tmp_path / "budget")
  train_and_evaluate(config_for(module, **{
      "stages": "bsq", "bsq.alpha": None, "bsq.target_bits": 7.5,
      "bsq.default_alpha": 5.0, "bsq.budget_alpha_max": 100.0}), got)
  records = [r for r in _records(got) if r["stage"] == "bsq"]
  assert all("budget_alpha" in r for r in records)  # the controller steered
  report = records[-1]["budget_report"]
  assert report["met"], report["message"]  # at or under 7.5 bits
  assert report["final"] == pytest.approx(records[-1]["average_bits"])
  assert records[-1]["average_bits"] > 7.5 - 2.0, report  # not far under


def _records(workdir):
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
