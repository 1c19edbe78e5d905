"""Budget mode: ask BSQ for a model size instead of a regularization strength.

What to expect. BSQ's one knob, alpha (the strength of the bit-level group
Lasso), does not say what size comes out. In budget mode you ask for a size
instead, either ``bsq.target_bits`` (average bits per quantized weight, the
paper's TB / TP) or ``bsq.target_kbytes`` (the packed size of the quantized
weights, sign bits and float32 scales included; see `kbytes`), and leave
``bsq.alpha`` unset: the controller starts from ``bsq.default_alpha`` and
sets alpha again after every epoch, within [alpha_min, alpha_max]. The size
that counts is the one of the final re-quantization after the last epoch;
the report at the end says whether the target was met and, if not, by how
much the model is too large. Bits are never truncated to force a target.
Limits: the controller only steers. Pruned bit planes rarely come back, so
it approaches the target from above and cannot undo an overshoot; a target
that the schedule cannot reach without wrecking the model is missed (the
report says by how much), and a start alpha far too large spends its
damage before the first correction.

The pieces, all host-side Python / numpy:

- `check_budget_fields` validates the config fields (a fixed alpha or one
  target, never both);
- `kbytes` (formula below), `measure` (the size a re-quantization of bsq
  params would give now, input untouched), `soft_size` (its continuous
  version, for the rate) and `sizes` (both from one re-quantization);
- `BudgetController`: `alpha_for_epoch`, `observe`, `report`, `metrics`,
  `progress`, `state_dict` / `from_state_dict` (JSON-serializable, for resume):
  the state, its checks and its reports around the rule below.

The rule by which the controller sets alpha (the plan, the rate rule and
the damage guard) is `bsq_jax.budget_rule`, with its formulas. Each epoch's
record (alpha used, sizes, plan, gain, action) is kept in the controller's
`history` and is part of the state.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bsq_jax import budget_rule as rule
from bsq_jax.budget_rule import fmt_size
from bsq_jax.packed_format import SCALE_BYTES, packed_bytes

UNITS = ("bits", "kbytes")
MAX_STEP_FACTOR = 4.0    # bound on up_factor / down_factor
STATE_VERSION = 2


# --------------------------------------------------------------------------
# Config validation.


def _positive_number(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{name}: expected a number, got {value!r}")
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
  return value


def check_budget_fields(alpha_set_explicitly: bool,
                        target_bits: Optional[float] = None,
                        target_kbytes: Optional[float] = None,
                        max_bits: int = 8) -> Optional[Tuple[float, str]]:
  """Validates the budget fields of the bsq config.

  Returns None for fixed-alpha mode (no target; the configured or default
  alpha is used as is), or (target, unit) with unit "bits" or "kbytes" for
  budget mode, where alpha is only the starting value. Raises ValueError
  (one line, naming the fields) for both targets, a target together with an
  explicitly set alpha, a target <= 0 or non-finite, or target_bits >
  max_bits.
  """
  if target_bits is not None and target_kbytes is not None:
    raise ValueError("bsq.target_bits and bsq.target_kbytes: set at most one "
                     "of the two targets")
  if target_bits is None and target_kbytes is None:
    return None
  field = "bsq.target_bits" if target_bits is not None else "bsq.target_kbytes"
  if alpha_set_explicitly:
    raise ValueError(f"bsq.alpha and {field}: set either a fixed alpha or a "
                     f"target, not both (the target sets alpha); unset alpha "
                     f"with --config.bsq.alpha=None, or config.bsq.alpha = "
                     f"None in Python")
  if target_bits is not None:
    value = _positive_number(field, target_bits)
    if value > max_bits:
      raise ValueError(f"{field}: expected a value in (0, {max_bits}] "
                       f"(max_bits), got {target_bits!r}")
    return value, "bits"
  return _positive_number(field, target_kbytes), "kbytes"


# --------------------------------------------------------------------------
# Sizes.


def kbytes(accounting) -> float:
  """Packed size of the quantized tensors in kilobytes (1000 bytes).

      kbytes = sum_q (4 + ceil(m_q * (n_q + 1) / 8)) / 1000

  over the quantized tensors q of `accounting` (a `scheme.Accounting`, or
  anything with `bits` and `sizes` mappings): m_q weights of n_q magnitude
  bits plus one sign bit each, packed to whole bytes per tensor, and 4 bytes
  for the tensor's float32 scale. A precision-0 tensor costs only its scale.
  This is exactly the quantized part of `packed_format.formula_bytes` (the
  packed file adds its 20-byte prefix, the JSON header and the float32 tensors).
  """
  total = 0
  for name, m in accounting.sizes.items():
    n = int(accounting.bits[name])
    if n < 0:
      raise ValueError(f"{name}: negative precision {n}")
    total += SCALE_BYTES + packed_bytes(int(m), n)
  return total / 1000.0


def size_of(accounting, unit: str) -> float:
  """The size of `accounting` in `unit`: average bits or `kbytes`."""
  if unit == "bits":
    return float(accounting.average_bits)
  if unit == "kbytes":
    return kbytes(accounting)
  raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")


def measure_accounting(params, max_bits: int = 8):
  """Accounting of what a re-quantization (spec section 6) of bsq `params`
  would give now. The input params are not modified (the pass works on host
  copies); nothing is applied."""
  from bsq_jax import scheme  # JAX only needed here
  new_params, _ = scheme.requantize_params(params, max_bits)
  return scheme.account(new_params)


def measure(params, unit: str = "bits", max_bits: int = 8) -> float:
  """The size, in `unit`, that a re-quantization of bsq `params` would give
  now: average bits (TB / TP) or `kbytes`. Does not modify `params`."""
  if unit not in UNITS:
    raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
  return size_of(measure_accounting(params, max_bits), unit)


def sizes(params, unit: str = "bits", max_bits: int = 8) -> Tuple[float, float]:
  """(`measure`, `soft_size`) of bsq `params` from one re-quantization."""
  if unit not in UNITS:
    raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
  from bsq_jax import scheme  # JAX only needed here
  new_params, _ = scheme.requantize_params(params, max_bits)
  return size_of(scheme.account(new_params), unit), _soft(new_params, unit)


def soft_size(params, unit: str = "bits", max_bits: int = 8) -> float:
  """A continuous version of `measure(params, unit)`, for the rate.

  Whole planes go in steps: nothing changes while the group Lasso shrinks
  them, then a tensor loses several planes at once. Here each tensor counts
  log2(M + 1) bits instead of its precision n, where M is its largest integer
  level after re-quantization; n = ceil(log2(M + 1)) once the MSB planes are
  dropped, so the two agree whenever M = 2**n - 1, and log2(M + 1) falls
  smoothly as the weights shrink, an epoch or more before the planes go.
  In kbytes the same soft bits go into the `kbytes` formula (without the
  rounding to whole bytes).
  """
  return sizes(params, unit, max_bits)[1]


def _soft(requantized, unit: str) -> float:
  from bsq_jax import bitplanes, scheme  # JAX only needed here
  total, weighted, nbytes = 0, 0.0, 0.0
  for _, planes in scheme.quantized(requantized):
    m = int(np.prod(planes.pos.shape[:-1]))
    top = int(np.abs(bitplanes.integers(planes)).max(initial=0))
    bits = float(np.log2(top + 1))
    total += m
    weighted += m * bits
    nbytes += SCALE_BYTES + (0.0 if top == 0 else m * (bits + 1) / 8)
  if unit == "kbytes":
    return nbytes / 1000.0
  return weighted / max(total, 1)


# --------------------------------------------------------------------------
# The controller.


class BudgetController:
  """Sets alpha once per epoch so that the size reaches `target`.

  target, unit: the size asked for, in "bits" (average) or "kbytes".
  start_value: the size at boundary 0 (after the epoch-0 re-quantization,
    before training), in the same unit; start_soft: its `soft_size` (default
    start_value).
  epochs: E, the number of BSQ epochs (0 .. E-1).
  requant_epochs: the epochs before which a re-quantization runs (0, R, 2R,
    ...); the final one after epoch E-1 is implied.
  alpha0: alpha for epoch 0.
  alpha_min, alpha_max: bounds on alpha (alpha0 must lie within).
  up_factor, down_factor: bounds on one epoch's change, each in
    (1, MAX_STEP_FACTOR].
  tolerance: the plan ends this fraction of the target below it, in (0, 1).
  settle_fraction: share of the epochs left at the end, after the plan has
    reached the target (sets reach_epoch when the learning rate is constant;
    otherwise the plan ends at the last learning-rate change); or give
    reach_epoch (1..E).
  effort: each epoch's learning rate (E positive numbers; default all 1).
  damage_factor: an epoch whose training loss is above this multiple of the
    lowest one so far never raises alpha, > 1 (inf = off). The loss, not the
    accuracy: at chance level the accuracy swings by a third between epochs,
    the loss by a few percent.

  See `bsq_jax.budget_rule` for the rule.
  """

  def __init__(self, target: float, unit: str, start_value: float,
               epochs: int, requant_epochs: Sequence[int], alpha0: float,
               alpha_min: float = 1e-4, alpha_max: float = 0.1,
               up_factor: float = 2.0, down_factor: float = 2.0,
               tolerance: float = 0.02, settle_fraction: float = 0.1,
               reach_epoch: Optional[int] = None,
               effort: Optional[Sequence[float]] = None,
               damage_factor: float = 1.5,
               start_soft: Optional[float] = None):
    if unit not in UNITS:
      raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    self.target = _positive_number("target", target)
    self.unit = unit
    self.start_value = _positive_number("start_value", start_value)
    self.start_soft = (self.start_value if start_soft is None else
                       _positive_number("start_soft", start_soft))
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) \
        or epochs < 1:
      raise ValueError(f"epochs: expected an integer >= 1, got {epochs!r}")
    self.epochs = int(epochs)
    self.requant_epochs = sorted({int(e) for e in requant_epochs})
    bad = [e for e in self.requant_epochs if not 0 <= e < self.epochs]
    if bad:
      raise ValueError(f"requant_epochs: expected epochs in [0, {self.epochs})"
                       f", got {bad}")
    self.alpha_min = _positive_number("alpha_min", alpha_min)
    self.alpha_max = _positive_number("alpha_max", alpha_max)
    if self.alpha_min > self.alpha_max:
      raise ValueError(f"alpha_min {alpha_min} > alpha_max {alpha_max}")
    alpha0 = _positive_number("alpha0", alpha0)
    if not self.alpha_min <= alpha0 <= self.alpha_max:
      raise ValueError(f"alpha0: expected a value in [alpha_min, alpha_max] = "
                       f"[{alpha_min}, {alpha_max}], got {alpha0}")
    for name, f in (("up_factor", up_factor), ("down_factor", down_factor)):
      f = _positive_number(name, f)
      if not 1.0 < f <= MAX_STEP_FACTOR:
        raise ValueError(f"{name}: expected a value in (1, {MAX_STEP_FACTOR}]"
                         f", got {f}")
    self.up_factor, self.down_factor = float(up_factor), float(down_factor)
    self.tolerance = float(tolerance)
    if not 0 < self.tolerance < 1:
      raise ValueError(f"tolerance: expected a value in (0, 1), got {tolerance}")
    self.effort = ([1.0] * self.epochs if effort is None else
                   [_positive_number("effort", w) for w in effort])
    if len(self.effort) != self.epochs:
      raise ValueError(f"effort: expected {self.epochs} learning rates, got "
                       f"{len(self.effort)}")
    self.damage_factor = float(damage_factor)
    if not self.damage_factor > 1:
      raise ValueError(f"damage_factor: expected a value > 1, got "
                       f"{damage_factor}")
    self.reach_epoch = rule.plan_end(self.effort, settle_fraction,
                                     reach_epoch)
    self.settle_fraction = float(settle_fraction)
    self.alpha = alpha0           # alpha for the next epoch to run
    self.alpha0 = alpha0
    self.history: List[Dict[str, Any]] = []  # one record per observed epoch

  # -- the plan -------------------------------------------------------------

  @property
  def aim(self) -> float:
    """Where the plan ends: one tolerance below the target, so that a model
    that stops a little short of the aim still meets the budget."""
    return self.target - self.tolerance_abs

  @property
  def tolerance_abs(self) -> float:
    return self.tolerance * self.target

  def wanted(self, epoch: int, size: float) -> float:
    """The drop planned for `epoch` from `size`: the rest of the way to the
    aim, in proportion to the epoch's share of the learning rate left before
    reach_epoch (all of it at or after reach_epoch)."""
    return rule.planned_drop(size - self.aim, self.effort, epoch,
                             self.reach_epoch)

  @property
  def warnings(self) -> List[str]:
    """Why this run may miss its target (shown once by the loop)."""
    return rule.early_warnings(self.epochs, self.requant_epochs, self.target,
                               self.start_value, self.unit)

  # -- per epoch ------------------------------------------------------------

  @property
  def last_epoch(self) -> int:
    """The last observed epoch (-1 before any)."""
    return self.history[-1]["epoch"] if self.history else -1

  def alpha_for_epoch(self, epoch: int) -> float:
    """Alpha to train epoch `epoch` with: the recorded one for an observed
    epoch, otherwise the current one (set by the last `observe`)."""
    epoch = int(epoch)
    if 0 <= epoch <= self.last_epoch:
      for rec in self.history:
        if rec["epoch"] == epoch:
          return rec["alpha"]
    return self.alpha

  def observe(self, epoch: int, measured: float,
              soft: Optional[float] = None,
              loss: Optional[float] = None) -> float:
    """Records, after epoch `epoch`, the size `measured` (what a
    re-quantization would give now), its `soft` version (default: measured)
    and the epoch's training `loss` (optional), and returns the alpha
    for the next epoch."""
    epoch = int(epoch)
    if epoch <= self.last_epoch:
      raise ValueError(f"budget: epoch {epoch} already observed (last "
                       f"{self.last_epoch}); observe each epoch once")
    if not 0 <= epoch < self.epochs:
      raise ValueError(f"budget: epoch {epoch} outside 0..{self.epochs - 1}")
    measured = _size("measured", measured)
    soft = measured if soft is None else _size("soft", soft)
    used = self.alpha
    before = self.history[-1]["soft"] if self.history else self.start_soft
    gain = rule.epoch_gain(before, soft, used, self.effort[epoch])
    nxt = min(epoch + 1, self.epochs - 1)
    want = self.wanted(nxt, measured)
    action, step = rule.rate_step(want, gain, used, self.effort[nxt],
                                  self.up_factor, self.down_factor)
    if nxt >= self.reach_epoch:
      action, step = rule.hold_tail(action, step)
    losses = [r["loss"] for r in self.history if r["loss"] is not None]
    if rule.damaged(loss, losses, epoch in self.requant_epochs,
                    self.damage_factor):
      action, step = "damage", min(step, 1.0 / self.down_factor)
    self.alpha = float(min(self.alpha_max, max(self.alpha_min, used * step)))
    self.history.append({"epoch": epoch, "alpha": used, "measured": measured,
                         "soft": soft, "loss": loss, "gain": gain,
                         "want": want, "action": action,
                         "next_alpha": self.alpha})
    return self.alpha

  def metrics(self) -> Dict[str, float]:
    """Numbers for the metrics file, from the last `observe`."""
    if not self.history:
      return {"budget_alpha": self.alpha, "budget_target": self.target}
    r = self.history[-1]
    return {"budget_alpha": r["alpha"], "budget_next_alpha": r["next_alpha"],
            "budget_measured": r["measured"], "budget_soft": r["soft"],
            "budget_target": self.target, "budget_want": r["want"],
            "budget_gain": r["gain"],
            "budget_step": {"up": 1.0, "hold": 0.0, "down": -1.0,
                            "damage": -2.0}[r["action"]]}

  def progress(self) -> str:
    """A short piece for the progress line, from the last `observe`."""
    if not self.history:
      return (f"budget alpha {self.alpha:.3g} target "
              f"{fmt_size(self.target, self.unit)}")
    r = self.history[-1]
    unit = "b" if self.unit == "bits" else "kB"
    return (f"size {r['measured']:.3f}{unit} (soft {r['soft']:.3f}, target "
            f"{self.target:.3f}, next drop {r['want']:.3f}) alpha "
            f"{r['alpha']:.3g}->{r['next_alpha']:.3g} {r['action']}")

  # -- the end --------------------------------------------------------------

  def report(self, final: float) -> Dict[str, Any]:
    """Whether the final size (after the final re-quantization) meets the
    target. met = final <= target; excess = final - target when above (else
    0). Nothing is truncated: the report only says what came out."""
    final = float(final)
    met = final <= self.target
    excess = 0.0 if met else final - self.target
    below = self.target - final if met else 0.0
    pct = 100.0 * (final - self.target) / self.target
    t, f = fmt_size(self.target, self.unit), fmt_size(final, self.unit)
    if met and below <= 2 * self.tolerance_abs:
      msg = f"budget met: {f} for a target of {t}"
    elif met:
      msg = (f"budget met: {f} for a target of {t}, "
             f"{fmt_size(below, self.unit)} ({-pct:.1f}%) below it (the "
             f"controller overshot)")
    else:
      msg = (f"budget NOT met: {f} is {fmt_size(excess, self.unit)} "
             f"({pct:.1f}%) above the target of {t}; train longer, start "
             f"from a larger alpha or raise alpha_max (last alpha "
             f"{self.alpha:.3g}, "
             f"alpha_max {self.alpha_max:.3g})")
    return {"target": self.target, "unit": self.unit, "final": final,
            "met": met, "excess": excess, "below": below,
            "relative_error": pct / 100.0, "last_alpha": self.alpha,
            "epochs_observed": len(self.history), "message": msg}

  # -- resume ---------------------------------------------------------------

  _CONFIG = ("target", "unit", "start_value", "epochs", "requant_epochs",
             "alpha0", "alpha_min", "alpha_max", "up_factor", "down_factor",
             "tolerance", "settle_fraction", "reach_epoch", "effort",
             "damage_factor", "start_soft")

  def state_dict(self) -> Dict[str, Any]:
    """Everything needed to continue exactly (plain JSON types)."""
    state = {k: copy.deepcopy(getattr(self, k)) for k in self._CONFIG}
    state.update(version=STATE_VERSION, alpha=self.alpha,
                 history=copy.deepcopy(self.history))
    return state

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "BudgetController":
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"budget state: version {state.get('version')!r}, "
                       f"expected {STATE_VERSION}")
    missing = [k for k in cls._CONFIG + ("alpha", "history") if k not in state]
    if missing:
      raise ValueError(f"budget state: missing {missing}")
    ctl = cls(**{k: state[k] for k in cls._CONFIG})
    ctl.alpha = float(state["alpha"])
    ctl.history = [dict(r) for r in state["history"]]
    return ctl


def _size(name: str, value: float) -> float:
  value = float(value)
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"budget: {name} size {value!r} is not a finite number "
                     f">= 0")
  return value
