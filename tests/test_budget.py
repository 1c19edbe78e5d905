"""Budget mode (issue 8): config validation, sizes, the alpha controller."""

import json

import numpy as np
import pytest

from bsq_jax import budget as bud
from bsq_jax import packed_format
from bsq_jax.budget import BudgetController
from bsq_jax.scheme import Accounting


# --------------------------------------------------------------------------
# Config validation.


def test_neither_target_is_fixed_alpha_mode():
  assert bud.check_budget_fields(False) is None
  assert bud.check_budget_fields(True, None, None) is None


def test_one_target_is_budget_mode():
  assert bud.check_budget_fields(False, target_bits=4) == (4.0, "bits")
  assert bud.check_budget_fields(False, target_bits=8) == (8.0, "bits")
  assert bud.check_budget_fields(False, target_kbytes=50.5) == (50.5, "kbytes")


@pytest.mark.parametrize("alpha, bits, kb, names", [
    (False, 4.0, 50.0, ["bsq.target_bits", "bsq.target_kbytes"]),
    (True, 4.0, 50.0, ["bsq.target_bits", "bsq.target_kbytes"]),
    (True, 4.0, None, ["bsq.alpha", "bsq.target_bits"]),
    (True, None, 50.0, ["bsq.alpha", "bsq.target_kbytes"]),
    (False, 0.0, None, ["bsq.target_bits"]),
    (False, -1.0, None, ["bsq.target_bits"]),
    (False, 8.5, None, ["bsq.target_bits", "(0, 8]"]),
    (False, float("nan"), None, ["bsq.target_bits"]),
    (False, True, None, ["bsq.target_bits"]),
    (False, "4", None, ["bsq.target_bits"]),
    (False, None, 0.0, ["bsq.target_kbytes"]),
    (False, None, float("inf"), ["bsq.target_kbytes"]),
])
def test_bad_fields_are_one_line_errors(alpha, bits, kb, names):
  with pytest.raises(ValueError) as err:
    bud.check_budget_fields(alpha, bits, kb)
  msg = str(err.value)
  assert "\n" not in msg
  for name in names:
    assert name in msg


def test_max_bits_bounds_target_bits():
  assert bud.check_budget_fields(False, target_bits=12, max_bits=16) == (12.0,
                                                                         "bits")
  with pytest.raises(ValueError, match=r"\(0, 4\]"):
    bud.check_budget_fields(False, target_bits=5, max_bits=4)


# --------------------------------------------------------------------------
# Sizes.


def test_kbytes_formula_by_hand():
  acc = Accounting(bits={"a": 4, "b": 0, "c": 1, "d": 8},
                   sizes={"a": 100, "b": 50, "c": 3, "d": 16})
  # a: 4 + ceil(100 * 5 / 8) = 67; b: scale only, 4; c: 4 + ceil(6 / 8) = 5;
  # d: 4 + 16 * 9 / 8 = 22.
  assert bud.kbytes(acc) == pytest.approx((67 + 4 + 5 + 22) / 1000)
  assert bud.size_of(acc, "kbytes") == bud.kbytes(acc)
  assert bud.size_of(acc, "bits") == acc.average_bits
  with pytest.raises(ValueError, match="unit"):
    bud.size_of(acc, "bytes")


def test_kbytes_is_the_quantized_part_of_the_export_formula():
  bits = {"a": 3, "b": 0, "c": 7}
  sizes = {"a": 1001, "b": 9, "c": 333}
  acc = Accounting(bits=bits, sizes=sizes)
  expected = (packed_format.formula_bytes(bits, sizes, 0) -
              packed_format.PREFIX_BYTES)
  assert bud.kbytes(acc) * 1000 == pytest.approx(expected)


def test_measure_on_real_params_matches_requantize_and_leaves_input():
  import jax
  import jax.numpy as jnp
  from bsq_jax import bitplanes as bp
  from bsq_jax import scheme as sch
  from bsq_jax.layers import Quant
  from bsq_jax.models import build_model

  cfg = {"name": "cifar_resnet", "depth": 8, "num_classes": 10,
         "act_bits": 4, "width": 4}
  model = build_model(cfg, Quant("bsq", None, 8))
  # The params tree of the real model, filled on the host (running the model's
  # init compiles convolutions: tens of seconds on a busy CPU).
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)

  def fill(_, v):
    if isinstance(v, bp.BitPlanes):
      planes = bp.encode(rng.standard_normal(v.pos.shape[:-1]), 8)
      return bp.BitPlanes(*(jnp.asarray(x) for x in planes))
    return jnp.zeros(v.shape, v.dtype)
  params = sch.map_nodes(fill, shapes)
  # Make re-quantization change something: clear the two MSB planes of one
  # tensor (it drops to <= 6 bits) and scale another's planes past 1 in c.
  names = [p for p, _ in sch.quantized(params)]
  first, second = names[0], names[1]

  def edit(path, v):
    if path == first:
      return bp.BitPlanes(v.pos.at[..., :2].set(0.0),
                          v.neg.at[..., :2].set(0.0), v.scale)
    if path == second:
      return bp.BitPlanes(v.pos * 0.5, v.neg * 0.5, v.scale)
    return v
  params = sch.map_nodes(edit, params)
  before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)

  got_bits = bud.measure(params)
  got_kb = bud.measure(params, "kbytes")
  new_params, new_scheme = sch.requantize_params(params)
  acc = sch.account(new_params)
  assert got_bits == acc.average_bits
  assert got_kb == bud.kbytes(acc)
  assert got_bits < 8.0 and new_scheme[first] <= 6
  # By hand: random 8-bit tensors keep 8 bits, the first loses its two
  # cleared MSB planes, the halved second still needs 8 (level 128).
  m = {p: int(np.prod(v.pos.shape[:-1])) for p, v in sch.quantized(params)}
  assert got_bits == pytest.approx(8 - 2 * m[first] / sum(m.values()))
  assert bud.measure_accounting(params) == acc
  # The soft size counts log2(M + 1) bits per tensor: never more than the
  # whole planes, and below them where the largest level M < 2**n - 1.
  soft = bud.soft_size(params)
  levels = {p: int(np.abs(bp.integers(v)).max())
            for p, v in sch.quantized(new_params)}
  sizes = acc.sizes
  expect = sum(sizes[p] * np.log2(m + 1) for p, m in levels.items()) / sum(
      sizes.values())
  assert soft == pytest.approx(expect) and soft < got_bits
  assert bud.soft_size(params, "kbytes") < got_kb
  assert bud.sizes(params) == (got_bits, soft)
  with pytest.raises(ValueError, match="unit"):
    bud.soft_size(params, "bytes")
  # The input is untouched: same values, same precisions.
  assert sch.account(params).average_bits == 8.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, params)
  with pytest.raises(ValueError, match="unit"):
    bud.measure(params, "bytes")


# --------------------------------------------------------------------------
# The controller on simulated plants.


class Plant:
  """Average bits of a model of `layers` tensors of random sizes: each tensor
  loses precision at a rate proportional to alpha (times a per-tensor gain and
  noise) and counts whole bits, so the measurement moves in steps."""

  def __init__(self, gain, seed=0, layers=20):
    self.rng = np.random.default_rng(seed)
    self.m = self.rng.integers(500, 40000, layers).astype(float)
    self.k = gain * self.rng.lognormal(0.0, 0.7, layers)
    self.x = np.full(layers, 8.0)

  def step(self, alpha):
    noise = 1.0 + 0.3 * self.rng.standard_normal(self.x.shape)
    self.x = np.clip(self.x - self.k * alpha * noise + 0.01, 0.5, 8.0)
    bits = np.clip(np.ceil(self.x), 1, 8)
    return float((self.m * bits).sum() / self.m.sum())


def make(epochs=60, alpha0=5e-3, **kw):
  return BudgetController(4.0, "bits", 8.0, epochs, list(range(0, epochs, 10)),
                          alpha0, **kw)


def drive(ctl, plant, epochs=None, start=0):
  final = None
  for e in range(start, ctl.epochs if epochs is None else epochs):
    final = plant.step(ctl.alpha_for_epoch(e))
    ctl.observe(e, final)
  return final


@pytest.mark.parametrize("alpha0, gain, seed", [
    (5e-3, 20.0, 0),     # alpha0 about right
    (2e-2, 20.0, 1),     # alpha0 4x too large: must brake
    (1e-3, 20.0, 2),     # alpha0 5x too small: must push
    (5e-3, 100.0, 3),    # a fast plant
    (5e-3, 5.0, 4),      # a slow plant
])
def test_drives_8_bits_to_4(alpha0, gain, seed):
  ctl = make(alpha0=alpha0)
  final = drive(ctl, Plant(gain, seed))
  assert abs(final - 4.0) <= 0.5
  alphas = [r["alpha"] for r in ctl.history]
  assert len(set(alphas)) > 3  # alpha was steered, not held
  assert all(ctl.alpha_min <= a <= ctl.alpha_max for a in alphas)
  rep = ctl.report(final)
  assert rep["final"] == final and rep["target"] == 4.0
  assert rep["met"] == (final <= 4.0)
  assert isinstance(rep["message"], str) and "\n" not in rep["message"]


def test_kbytes_unit_tracks_too():
  plant = Plant(20.0, 5)
  kb_per_bit = plant.m.sum() / 8 / 1000  # a linear stand-in for the formula
  ctl = BudgetController(4.0 * kb_per_bit, "kbytes", 8.0 * kb_per_bit, 60,
                         [0, 20, 40], 5e-3)
  final = None
  for e in range(60):
    final = plant.step(ctl.alpha_for_epoch(e)) * kb_per_bit
    ctl.observe(e, final)
  assert abs(final / kb_per_bit - 4.0) <= 0.5
  assert "kB" in ctl.progress()


def test_bounds_and_step_factors_are_respected():
  # A plant that never moves: alpha climbs to alpha_max and stays there.
  ctl = make(epochs=40, alpha0=1e-3, alpha_min=1e-4, alpha_max=2e-2,
             up_factor=1.5, down_factor=3.0)
  for e in range(40):
    ctl.observe(e, 8.0)
  alphas = [r["alpha"] for r in ctl.history] + [ctl.alpha]
  assert max(alphas) == 2e-2 and ctl.alpha == 2e-2
  assert all(b / a <= 1.5 * (1 + 1e-12) for a, b in zip(alphas, alphas[1:]))
  rep = ctl.report(8.0)
  assert not rep["met"] and rep["excess"] == pytest.approx(4.0)
  assert "NOT met" in rep["message"] and "4.000 bits" in rep["message"]
  # A plant that collapses at once: alpha falls to alpha_min and stays there.
  ctl = make(epochs=40, alpha0=1e-3, alpha_min=1e-4, alpha_max=2e-2,
             up_factor=1.5, down_factor=3.0)
  for e in range(40):
    ctl.observe(e, 1.0)
  alphas = [r["alpha"] for r in ctl.history] + [ctl.alpha]
  assert min(alphas) == 1e-4
  assert all(a / b <= 3.0 * (1 + 1e-12) for a, b in zip(alphas, alphas[1:]))
  rep = ctl.report(1.0)
  assert rep["met"] and rep["excess"] == 0.0 and rep["below"] == 3.0
  assert "overshot" in rep["message"]


@pytest.mark.parametrize("kw", [
    {"up_factor": 1.0}, {"down_factor": 0.5}, {"up_factor": 5.0},
    {"alpha0": 1.0}, {"alpha_min": 1e-2, "alpha_max": 1e-3},
    {"tolerance": 0.0}, {"reach_epoch": 0}, {"reach_epoch": 61},
    {"damage_factor": 1.0}, {"effort": [0.1] * 59}, {"effort": [0.0] * 60},
    {"epochs": 0}, {"unit": "bytes"}, {"requant_epochs": [60]},
])
def test_bad_controller_settings(kw):
  args = dict(target=4.0, unit="bits", start_value=8.0, epochs=60,
              requant_epochs=[0, 20], alpha0=5e-3)
  args.update(kw)
  with pytest.raises(ValueError):
    BudgetController(**args)


def test_observe_each_epoch_once_and_in_range():
  ctl = make(epochs=10)
  assert ctl.metrics()["budget_alpha"] == 5e-3 and "budget" in ctl.progress()
  ctl.observe(0, 7.9)
  with pytest.raises(ValueError, match="already observed"):
    ctl.observe(0, 7.8)
  with pytest.raises(ValueError, match="outside"):
    ctl.observe(10, 7.8)
  with pytest.raises(ValueError, match="finite"):
    ctl.observe(1, float("nan"))
  m = ctl.metrics()
  assert set(m) >= {"budget_alpha", "budget_next_alpha", "budget_measured",
                    "budget_soft", "budget_want", "budget_target", "budget_step"}
  assert all(isinstance(v, float) for v in m.values())
  assert make(epochs=60).warnings == []
  assert make(epochs=5).warnings  # too few epochs
  assert BudgetController(4.0, "bits", 8.0, 60, [0], 5e-3).warnings
  assert BudgetController(9.0, "bits", 8.0, 60, [0, 20], 5e-3).warnings


def test_plan_spreads_the_rest_in_proportion_to_the_learning_rate():
  lrs = [0.1] * 6 + [0.01] * 2
  ctl = make(epochs=8, effort=lrs)  # the plan ends at the lr drop
  assert ctl.reach_epoch == 6 and ctl.aim == pytest.approx(3.92)
  # From 8 bits before epoch 1: epoch 1's share of lr over epochs 1..5.
  assert ctl.wanted(1, 8.0) == pytest.approx(4.08 * 0.1 / 0.5)
  assert ctl.wanted(5, 5.0) == pytest.approx(1.08)   # the last planned epoch
  assert ctl.wanted(6, 5.0) == pytest.approx(1.08)   # past the plan: all
  assert ctl.wanted(3, 3.0) < 0                      # already below the aim
  # A constant learning rate: the plan ends 90% of the way, evenly spread.
  flat = make(epochs=100)
  assert flat.reach_epoch == 90
  assert flat.wanted(0, 8.0) == pytest.approx(4.08 / 90)
  with pytest.raises(ValueError, match="effort"):
    make(epochs=8, effort=lrs[:7])


def test_rate_rule_asks_for_the_planned_drop():
  """On a plant whose soft size falls by 2 * alpha * lr per epoch the rule
  picks the alpha that gives the planned drop (within the step bounds)."""
  ctl = make(epochs=8, alpha0=1.0, alpha_min=0.01, alpha_max=100.0,
             up_factor=4.0, down_factor=4.0, effort=[0.1] * 6 + [0.01] * 2)
  soft = 8.0
  for e in range(7):
    alpha = ctl.alpha_for_epoch(e)
    soft -= 2.0 * alpha * ctl.effort[e]
    nxt = ctl.observe(e, soft + 0.3, soft=soft)
    rec = ctl.history[-1]
    assert rec["gain"] == pytest.approx(2.0)
    want = ctl.wanted(e + 1, soft + 0.3)
    assert rec["want"] == pytest.approx(want)
    if want > 0 and 0.25 < want / (2.0 * ctl.effort[e + 1]) / alpha < 4.0:
      assert nxt == pytest.approx(want / (2.0 * ctl.effort[e + 1]))
  # The plan lands on the aim when the plant does what the model says.
  assert soft + 0.3 == pytest.approx(ctl.aim, abs=0.05)


def test_the_tail_after_the_plan_never_raises_alpha():
  ctl = make(epochs=8, alpha0=1.0, alpha_min=0.01, alpha_max=100.0,
             effort=[0.1] * 6 + [0.01] * 2)           # reach_epoch 6
  for e in range(8):                                  # a plant that is slow
    ctl.observe(e, 8.0 - 0.1 * e, soft=7.9 - 0.1 * e)
  actions = [r["action"] for r in ctl.history]
  assert actions[:5] == ["up"] * 5 and actions[5:] == ["hold"] * 3
  alphas = [r["alpha"] for r in ctl.history] + [ctl.alpha]
  assert alphas[6:] == [alphas[5]] * 3


def test_damaged_training_never_raises_alpha():
  ctl = make(epochs=20, alpha0=1e-3)
  ctl.observe(0, 8.0, soft=7.9, loss=0.45)   # far behind: up
  assert ctl.history[-1]["action"] == "up"
  up = ctl.alpha
  ctl.observe(1, 8.0, soft=7.9, loss=0.80)   # still behind, but wrecked
  assert ctl.history[-1]["action"] == "damage"
  assert ctl.alpha == pytest.approx(up / ctl.down_factor)
  ctl.observe(2, 8.0, soft=7.9, loss=0.60)   # recovered: up again
  assert ctl.history[-1]["action"] == "up"
  ctl.observe(3, 8.0, soft=7.9, loss=0.45)
  up = ctl.alpha
  ctl.observe(4, 8.0, soft=7.9, loss=0.45)
  assert ctl.history[-1]["action"] == "up" and ctl.alpha > up
  # Epoch 10 follows a host pass (make: every 10 epochs): its loss is exempt.
  for e in range(5, 11):
    ctl.observe(e, 8.0, soft=7.9, loss=0.45 if e < 10 else 0.9)
  assert ctl.history[-1]["action"] == "up"
  ctl.observe(11, 8.0, soft=7.9, loss=0.9)   # not the first after the pass
  assert ctl.history[-1]["action"] == "damage"
  off = make(epochs=20, alpha0=1e-3, damage_factor=float("inf"))
  off.observe(0, 8.0, soft=7.9, loss=0.45)
  off.observe(1, 8.0, soft=7.9, loss=2.3)
  assert off.history[-1]["action"] == "up"


def test_state_dict_round_trip_reproduces_alphas():
  full = make(epochs=60)
  drive(full, Plant(20.0, 7))

  first = make(epochs=60)
  plant = Plant(20.0, 7)
  drive(first, plant, epochs=25)
  state = json.loads(json.dumps(first.state_dict()))  # checkpoint metadata
  resumed = BudgetController.from_state_dict(state)
  assert resumed.state_dict() == first.state_dict()
  assert resumed.alpha_for_epoch(25) == first.alpha_for_epoch(25)
  assert [resumed.alpha_for_epoch(e) for e in range(25)] == [
      r["alpha"] for r in full.history[:25]]
  drive(resumed, plant, start=25)
  assert [r["alpha"] for r in resumed.history] == [
      r["alpha"] for r in full.history]
  assert resumed.alpha == full.alpha
  with pytest.raises(ValueError, match="version"):
    BudgetController.from_state_dict(dict(state, version=99))
