"""The HAWQ-V2-style baseline (bsq_jax/hawq.py): Hutchinson's block traces
against the exact Hessian, the knapsack against brute force, and the `hawq`
pipeline stage on the tiny ResNet."""

import itertools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import config_check
from bsq_jax import hawq
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import CheckpointError, load_result
from bsq_jax.quantize import QuantizedModel
from bsq_jax.stages import Run
from bsq_jax.train import train_and_evaluate
from tiny import tiny_config

# -- a model small enough for its full Hessian ---------------------------------

# Two quantized tensors of 6 entries (12 in all) and a float bias.
SHAPES = {"l1/kernel": (2, 3), "l2/kernel": (3, 2)}


def mlp_loss(w, const, batch):
  x, y = batch
  h = jnp.tanh(x @ w["l1/kernel"] + const["l1/bias"])
  logits = h @ w["l2/kernel"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) -
                  jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def mlp_problem(seed=0, batches=2):
  rng = np.random.default_rng(seed)
  w = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in SHAPES.items()}
  const = {"l1/bias": jnp.asarray(rng.normal(size=3), jnp.float32)}
  data = [(jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
           jnp.asarray(rng.integers(0, 2, 8), jnp.int32)) for _ in range(batches)]
  return w, const, data


def full_hessian(w, const, batch):
  """The Hessian in all of w's entries as one matrix, and each tensor's
  index range in it (names in sorted order)."""
  names = sorted(w)
  h = jax.jit(jax.hessian(lambda u: mlp_loss(u, const, batch)))(w)
  sizes = [int(np.size(w[n])) for n in names]
  rows = [np.concatenate([np.asarray(h[a][b]).reshape(sa, sb)
                          for b, sb in zip(names, sizes)], axis=1)
          for a, sa in zip(names, sizes)]
  starts = np.cumsum([0] + sizes)
  return np.concatenate(rows, axis=0), {
      n: slice(starts[i], starts[i + 1]) for i, n in enumerate(names)}


def test_every_sign_vector_averages_to_the_exact_block_traces():
  """v_i . (Hv)_i over all 2^12 Rademacher vectors has mean tr(H_ii): the
  estimator is unbiased per block, the cross-block terms cancel exactly."""
  w, const, data = mlp_problem()
  batch = data[0]
  hess, blocks = full_hessian(w, const, batch)
  names = sorted(w)
  signs = np.asarray(list(itertools.product((-1.0, 1.0), repeat=12)),
                     np.float32)
  vs = {n: jnp.asarray(signs[:, blocks[n]]).reshape((-1,) + SHAPES[n])
        for n in names}
  got = jax.jit(jax.vmap(lambda v: hawq.block_products(
      lambda u: mlp_loss(u, const, batch), w, v)))(vs)
  for n in names:
    exact = np.trace(hess[blocks[n], blocks[n]])
    np.testing.assert_allclose(np.mean(np.asarray(got[n], np.float64)), exact,
                               rtol=1e-4, atol=1e-6)
  # One vector: exactly v^T H v restricted to the block's rows.
  v = {n: vs[n][5] for n in names}
  flat_v = np.concatenate([np.asarray(v[n]).ravel() for n in names])
  one = hawq.block_products(lambda u: mlp_loss(u, const, batch), w, v)
  for n in names:
    np.testing.assert_allclose(
        float(one[n]), flat_v[blocks[n]] @ (hess @ flat_v)[blocks[n]],
        rtol=1e-4, atol=1e-6)


def test_hutchinson_estimate_is_within_its_standard_error():
  """hessian_traces with 400 probes on each of 2 batches against the exact
  batch-mean block traces, within 4.5 standard errors computed from the
  exact Hessians (Var = sum over pairs a<b in the block of 4 H_ab^2, plus
  H_ab^2 for a in it and b outside)."""
  w, const, data = mlp_problem(seed=5)  # both traces > 0.5
  probes = 400
  got = hawq.hessian_traces(mlp_loss, w, data, probes, seed=3, const=const)
  assert set(got) == set(SHAPES)
  for n in SHAPES:
    exact, var = [], []
    for batch in data:
      hess, blocks = full_hessian(w, const, batch)
      inside = hess[blocks[n], blocks[n]]
      outside = np.delete(hess[blocks[n]], np.arange(hess.shape[0])[blocks[n]],
                          axis=1)
      exact.append(np.trace(inside))
      var.append(2 * (np.sum(inside**2) - np.sum(np.diag(inside)**2)) +
                 np.sum(outside**2))
    tolerance = 4.5 * np.sqrt(np.sum(var) / (len(data)**2 * probes))
    assert tolerance < 0.25 * abs(np.mean(exact))  # the check has teeth
    assert abs(got[n] - np.mean(exact)) <= tolerance, (n, got[n], exact)


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, use_bias=False, name="l2")(
        jnp.tanh(nn.Dense(3, name="l1")(x)))


def test_model_traces_differentiate_the_models_own_loss():
  """model_traces on a Flax model (through QuantizedModel, float mode) gives
  what hessian_traces gives for the same loss written by hand, probe for
  probe: the tensors it perturbs are the ones the model uses."""
  model = QuantizedModel(TinyMLP())
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)
  y = jnp.asarray([0, 1] * 4, jnp.int32)
  params = model.init(jax.random.key(1), x)["params"]
  names = model.quantized_names(x)
  assert sorted(names) == sorted(SHAPES)
  got = hawq.model_traces(model, params, {}, names, [(x, y)], 4, seed=5)
  w = hawq.split(params, names)
  want = hawq.hessian_traces(mlp_loss, w, [(x, y)], 4, seed=5,
                             const={"l1/bias": params["l1"]["bias"]})
  for n in names:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-7)
  assert not np.allclose(got["l1/kernel"], got["l2/kernel"])


# -- sensitivities and the allocation ------------------------------------------


def test_quantization_error_is_the_spec_conversion():
  """Section 3's example: w = [0.5, -0.25, 0.1, -1.0] at 3 bits is used as
  [4/7, -2/7, 1/7, -1]; at 0 bits the layer is all zero."""
  w = np.asarray([0.5, -0.25, 0.1, -1.0], np.float32)
  used = np.asarray([4 / 7, -2 / 7, 1 / 7, -1.0])
  assert hawq.quantization_error(w, 3) == pytest.approx(
      np.sum((used - w)**2), rel=1e-6)
  assert hawq.quantization_error(w, 0) == pytest.approx(np.sum(w**2), rel=1e-6)
  errors = [hawq.quantization_error(w, n) for n in range(1, 9)]
  assert errors[-1] < errors[0]
  sens = hawq.sensitivities({"a": 8.0}, {"a": w}, [1, 3])["a"]
  np.testing.assert_allclose(sens, [2.0 * errors[0], 2.0 * errors[2]])
  assert not np.any(hawq.sensitivities({"a": -1.0}, {"a": w}, [1, 3])["a"])


def brute_force(sens, sizes, budget, candidates):
  names = list(sens)
  best = (np.inf, None)
  for combo in itertools.product(range(len(candidates)), repeat=len(names)):
    cost = sum(sizes[n] * candidates[k] for n, k in zip(names, combo))
    if cost <= budget:
      value = sum(sens[n][k] for n, k in zip(names, combo))
      best = min(best, (value, combo), key=lambda b: b[0])
  return best[0]


@pytest.mark.parametrize("sizes", [
    {"a": 6, "b": 10, "c": 15, "d": 4},      # gcd 1
    {"a": 6, "b": 12, "c": 18, "d": 30},     # gcd 6: budgets in units of 6
    {"a": 9, "b": 9, "c": 27},               # equal sizes, gcd 9
])
def test_allocation_equals_brute_force(sizes):
  """Random sensitivities (not even monotone in n) and budgets from near
  all-1-bit to near all-8-bit, including ones that are not multiples of the
  sizes' gcd: the DP's objective equals the best of all 8^L schemes."""
  rng = np.random.default_rng(len(sizes) + sum(sizes.values()))
  candidates = list(range(1, 9))
  total = sum(sizes.values())
  for trial in range(6):
    sens = {n: rng.exponential(size=8) * (1 if trial % 2 else
                                          np.exp(-np.arange(8)))
            for n in sizes}
    budget = int(rng.integers(total, 8 * total + 1))
    scheme = hawq.allocate(sens, sizes, budget, candidates)
    assert set(scheme) == set(sizes)
    assert sum(sizes[n] * scheme[n] for n in sizes) <= budget
    got = sum(sens[n][candidates.index(scheme[n])] for n in sizes)
    assert got == pytest.approx(brute_force(sens, sizes, budget, candidates),
                                rel=1e-12, abs=1e-15)


def test_allocation_limits():
  sens = {"a": np.arange(8.0)[::-1], "b": np.arange(8.0)[::-1]}
  sizes = {"a": 4, "b": 4}
  assert hawq.allocate(sens, sizes, 64, range(1, 9)) == {"a": 8, "b": 8}
  assert hawq.allocate(sens, sizes, 8, range(1, 9)) == {"a": 1, "b": 1}
  with pytest.raises(ValueError, match="below every layer at 1 bits"):
    hawq.allocate(sens, sizes, 7, range(1, 9))
  # Below all-1-bit, hawq_allocation lets a layer be zero (as BSQ's can).
  rng = np.random.default_rng(0)
  weights = {"a": rng.normal(size=(4,)), "b": rng.normal(size=(2, 2))}
  alloc = hawq.hawq_allocation({"a": 1.0, "b": 50.0}, weights, 7)
  assert alloc.candidates[0] == 0 and alloc.total_bits <= 7
  assert alloc.scheme["a"] == 0 and alloc.scheme["b"] == 1  # a: less sensitive
  assert hawq.hawq_allocation({"a": 1.0, "b": 1.0}, weights,
                              8).candidates == tuple(range(1, 9))


# -- the pipeline stage ----------------------------------------------------------

HAWQ = {"hawq.probes": 2, "hawq.batches": 2}


@pytest.fixture(scope="module")
def hawq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("hawq"))
  train_and_evaluate(tiny_config(stages="pretrain,convert,bsq"), workdir)
  table = train_and_evaluate(tiny_config(stages="hawq", **HAWQ), workdir)
  return workdir, table


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_hawq_stage_fits_bsqs_size_and_finetunes(hawq_run):
  workdir, table = hawq_run
  assert "| hawq |" in table
  ft_params, ft_scheme = sch.bsq_to_finetune(
      load_result(workdir, "bsq").state.params)
  budget = sch.account(ft_params, ft_scheme).total_bits
  result = load_result(workdir, "hawq")
  assert result.mode == "finetune" and result.meta["finished"]
  assert set(result.scheme) == set(ft_scheme)
  acc = sch.account(result.state.params, result.scheme)
  assert acc.total_bits <= budget
  assert min(result.scheme.values()) >= 1 or budget < acc.total_params
  records = [r for r in _records(workdir) if r["stage"] == "hawq"]
  alloc, trained = records[0], records[1:]
  assert alloc["epoch"] == 0 and alloc["hawq_budget_bits"] == budget
  assert alloc["hawq_total_bits"] == acc.total_bits and alloc["bits"] == result.scheme
  assert set(alloc["hawq_average_trace"]) == set(ft_scheme)
  assert all(np.isfinite(v) for v in alloc["hawq_average_trace"].values())
  epochs = tiny_config().finetune.epochs
  assert [r["epoch"] for r in trained] == list(range(1, epochs + 1))
  assert "test_accuracy" in trained[-1] and "train_loss" in trained[-1]
  assert trained[-1]["average_bits"] == pytest.approx(acc.average_bits)


def test_finished_hawq_stage_is_skipped(hawq_run):
  workdir, table = hawq_run
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  run = Run(tiny_config(stages="hawq", **HAWQ), workdir)
  assert run.run() == table
  assert not run.loop._trainers  # neither traces nor finetuning were redone
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_traces_are_reused_only_under_the_same_key(hawq_run, tmp_path,
                                                   monkeypatch):
  workdir, _ = hawq_run
  cached = os.path.join(workdir, hawq.TraceCache.FILE)
  assert os.path.exists(cached)
  # A second run on the same float model (a sweep's next alpha): the file
  # copied beside it, no hawq stage yet.
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("hawq"))
  with open(os.path.join(other, "metrics.jsonl")) as f:
    kept = [l for l in f if json.loads(l)["stage"] != "hawq"]
  with open(os.path.join(other, "metrics.jsonl"), "w") as f:
    f.writelines(kept)
  estimated = []
  real = hawq.model_traces
  monkeypatch.setattr(hawq, "model_traces",
                      lambda *a, **k: estimated.append(1) or real(*a, **k))
  train_and_evaluate(tiny_config(stages="hawq", **HAWQ), other)
  assert not estimated
  assert load_result(other, "hawq").scheme == load_result(workdir,
                                                          "hawq").scheme
  # More probes: another key, so the traces are estimated again.
  shutil.rmtree(os.path.join(other, "hawq"))
  train_and_evaluate(tiny_config(stages="hawq", **{**HAWQ, "hawq.probes": 3}),
                     other)
  assert estimated == [1]
  with open(os.path.join(other, hawq.TraceCache.FILE)) as f:
    assert json.load(f)["key"]["probes"] == 3


def test_hawq_without_bsq_is_refused_before_writing(tmp_path):
  with pytest.raises(CheckpointError, match="stage 'bsq' has not finished"):
    Run(tiny_config(stages="hawq"), str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("hawq.probes", 0, "config.hawq.probes: expected >= 1, got 0"),
    ("hawq.batches", 0, "config.hawq.batches: expected >= 1, got 0"),
    ("hawq.batches", -3, "config.hawq.batches: expected >= 1, got -3"),
])
def test_bad_hawq_values_name_the_field(field, value, message):
  config = tiny_config(stages="hawq", **{field: value})
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)


def test_hawq_stage_without_its_fields_is_refused():
  config = tiny_config(stages="pretrain")
  del config["hawq"]
  config_check.check(config)  # not asked for: fine
  config.stages = "pretrain,hawq"
  with pytest.raises(config_check.ConfigError, match="config.hawq: missing"):
    config_check.check(config)


def test_more_hessian_batches_than_data_is_refused(tmp_path):
  # 256 synthetic training images hold 4 batches of 64.
  with pytest.raises(config_check.ConfigError,
                     match="config.hawq.batches: 5 batches of 64 exceed"):
    Run(tiny_config(stages="pretrain,hawq", **{"hawq.batches": 5}),
        str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("data", ["synthetic", "synthetic_stream"])
def test_hessian_batches_are_fixed_and_unaugmented(tmp_path, data):
  """`hawq.batches` batches of `batch_size`, the same on every call: from
  the data on the devices (normalized, not augmented) or from a stream."""
  config = tiny_config(stages="pretrain", **{"hawq.batches": 3})
  config.data.name = data
  run = Run(config, str(tmp_path))
  batches = run._hessian_batches()
  assert len(batches) == 3
  for (images, labels), (again, _) in zip(batches, run._hessian_batches()):
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (64,)
    np.testing.assert_array_equal(images, again)
  if data == "synthetic":  # the seed's draw of distinct training images
    ids = np.random.default_rng(config.seed).permutation(run.train.size)[:64]
    raw = np.asarray(run.train.images.addressable_data(0))[ids]
    np.testing.assert_allclose(batches[0][0], (raw / 255.0 - run.train.mean) /
                               run.train.std, rtol=1e-5, atol=1e-5)
