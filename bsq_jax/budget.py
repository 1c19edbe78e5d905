"""Budget mode: ask BSQ for a model size instead of a regularization strength.

What to expect. BSQ's one knob, alpha (the strength of the bit-level group
Lasso), does not say what size comes out. In budget mode you ask for a size
instead, either ``bsq.target_bits`` (average bits per quantized weight, the
paper's TB / TP) or ``bsq.target_kbytes`` (the packed size of the quantized
weights, sign bits and float32 scales included; see `kbytes`), and leave
``bsq.alpha`` unset: the controller starts from the default alpha and adjusts
it after every epoch. It measures the size that a re-quantization would give
at that moment (without applying it), compares it with a planned path that
runs straight from the starting size down to just below the target (2% under
it) and then stays there for the last 10% of the epochs, and raises alpha
when the model is larger than planned or lowers it when it is smaller, by at
most a bounded factor per epoch and always within [alpha_min, alpha_max].
The size that counts is the one of the final re-quantization after the last
epoch; the report at the end says whether the target was met and, if not, by
how much the model is too large. Bits are never truncated to force a target.
Limits: the controller only steers, and it needs time to do so: tens of
epochs, not a handful, and re-quantization points along the way so that the
model actually drops its zero planes. Alpha acts with a delay, so the final
size can land below the target (pruned bit planes rarely come back) or, with
too few epochs or too tight alpha bounds, above it.

The pieces, all host-side Python / numpy:

- `check_budget_fields` validates the config fields (a fixed alpha or one
  target, never both);
- `kbytes` (formula below) and `measure` (the size a re-quantization of bsq
  params would give now, input untouched);
- `BudgetController`: `alpha_for_epoch`, `observe`, `report`, `metrics`,
  `progress`, `state_dict` / `from_state_dict` (JSON-serializable, for resume).

Control rule (BudgetController). Epochs are 0 .. E-1; boundary t is the
moment before epoch t (boundary E is the end, where the final re-quantization
happens). The reference path is linear in epochs:

    ref(t) = start + (aim - start) * min(1, t / reach_epoch)
    aim    = target - tol,   tol = tolerance * target   (2% by default)

with reach_epoch = E - round(settle_fraction * E) (at least 1; by default 90%
of the way), so the last stretch of training is spent holding the target. The
plan ends one tolerance below the target, so that a size held within the dead
band below meets the budget.
After epoch e, with the measurement m_e, the rule looks `lookahead` (h = 3)
epochs ahead, since alpha acts with a delay:

    slope = (m_e - m_{e-w}) / w          (w = min(3, epochs seen); m_{-1} = start)
    err   = m_e + h * slope - ref(e + 1 + h)

    |err| <= tol:  alpha unchanged                              ("hold")
    err   >  tol:  alpha *= up_factor ** min(1, err / (3 tol))     ("up")
    err   < -tol:  alpha /= down_factor ** min(1, -err / (3 tol))  ("down")

then alpha is clipped to [alpha_min, alpha_max]. So alpha changes by at most
one factor (each in (1, MAX_STEP_FACTOR], 2 by default) per epoch, by a
fraction of it for small errors. The measurement does not jump at a
re-quantization (re-quantizing re-quantized params changes nothing), so the
rule is the same at every epoch; the re-quantization epochs only feed the
warnings and the record. Each epoch's record (alpha used, measured, plan,
prediction, step) is kept in `history` and is part of the state.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

UNITS = ("bits", "kbytes")
SCALE_BYTES = 4          # one float32 scale per quantized tensor
MAX_STEP_FACTOR = 4.0    # bound on up_factor / down_factor
STATE_VERSION = 1


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
                     f"target, not both (in budget mode the controller sets "
                     f"alpha)")
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
  This is exactly the quantized part of `export.formula_bytes` (the packed
  file adds its 20-byte prefix, the JSON header and the float32 tensors).
  """
  total = 0
  for name, m in accounting.sizes.items():
    n = int(accounting.bits[name])
    if n < 0:
      raise ValueError(f"{name}: negative precision {n}")
    total += SCALE_BYTES + (0 if n == 0 else -(-int(m) * (n + 1) // 8))
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


def soft_bits(params, max_bits: int = 8) -> float:
  """A continuous version of `measure(params, "bits")`, for steering.

  Re-quantized bits move in whole-plane steps: nothing changes while the
  group Lasso shrinks the planes, then a layer loses several planes at once.
  Here each layer counts log2(M + 1) bits instead of its precision n, where M
  is its largest integer level after re-quantization; n = ceil(log2(M + 1))
  once the MSB planes are dropped, so the two agree whenever M = 2**n - 1,
  and log2(M + 1) falls smoothly as the weights shrink, an epoch or more
  before the planes go.
  """
  from bsq_jax import bitplanes, scheme  # JAX only needed here
  new_params, _ = scheme.requantize_params(params, max_bits)
  total, weighted = 0, 0.0
  for _, planes in scheme.quantized(new_params):
    m = int(np.prod(planes.pos.shape[:-1]))
    top = int(np.abs(bitplanes.integers(planes)).max(initial=0))
    total += m
    weighted += m * float(np.log2(top + 1))
  return weighted / max(total, 1)


# --------------------------------------------------------------------------
# The controller.


def _fmt(value: float, unit: str) -> str:
  return f"{value:.3f} bits" if unit == "bits" else f"{value:.3f} kB"


class BudgetController:
  """Adjusts alpha once per epoch so that the size reaches `target`.

  target, unit: the size asked for, in "bits" (average) or "kbytes".
  start_value: the size at boundary 0 (measured after the epoch-0
    re-quantization, before training), in the same unit.
  epochs: E, the number of BSQ epochs (0 .. E-1).
  requant_epochs: the epochs before which a re-quantization runs (0, R, 2R,
    ...); the final one after epoch E-1 is implied.
  alpha0: alpha for epoch 0.
  alpha_min, alpha_max: bounds on alpha (alpha0 must lie within).
  up_factor, down_factor: multiplicative steps, each in (1, MAX_STEP_FACTOR].
  tolerance: dead band, as a fraction of the target, in (0, 1); an error of
    3 tolerances or more takes a whole step factor.
  settle_fraction: share of the epochs spent holding the target at the end
    (sets reach_epoch); or give reach_epoch (1..E) directly.
  lookahead, slope_window: epochs the rule predicts ahead, and over how many
    past epochs it takes the slope for that (both >= 0 / >= 1).

  See the module docstring for the rule.
  """

  def __init__(self, target: float, unit: str, start_value: float,
               epochs: int, requant_epochs: Sequence[int], alpha0: float,
               alpha_min: float = 1e-4, alpha_max: float = 0.1,
               up_factor: float = 2.0, down_factor: float = 2.0,
               tolerance: float = 0.02, settle_fraction: float = 0.1,
               reach_epoch: Optional[int] = None, lookahead: int = 3,
               slope_window: int = 3):
    if unit not in UNITS:
      raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    self.target = _positive_number("target", target)
    self.unit = unit
    self.start_value = _positive_number("start_value", start_value)
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
    self.lookahead, self.slope_window = int(lookahead), int(slope_window)
    if self.lookahead < 0 or self.slope_window < 1:
      raise ValueError(f"lookahead >= 0 and slope_window >= 1 expected, got "
                       f"{lookahead}, {slope_window}")
    if reach_epoch is None:
      if not 0 <= settle_fraction < 1:
        raise ValueError(f"settle_fraction: expected a value in [0, 1), got "
                         f"{settle_fraction}")
      reach_epoch = max(1, self.epochs -
                        int(round(settle_fraction * self.epochs)))
    reach_epoch = int(reach_epoch)
    if not 1 <= reach_epoch <= self.epochs:
      raise ValueError(f"reach_epoch: expected 1..{self.epochs}, got "
                       f"{reach_epoch}")
    self.settle_fraction = float(settle_fraction)
    self.reach_epoch = reach_epoch
    self.alpha = alpha0           # alpha for the next epoch to run
    self.alpha0 = alpha0
    self.history: List[Dict[str, Any]] = []  # one record per observed epoch

  # -- the plan -------------------------------------------------------------

  def reference(self, boundary: float) -> float:
    """The planned size at boundary t (before epoch t; t = E is the end)."""
    frac = min(1.0, max(0.0, boundary / self.reach_epoch))
    return self.start_value + (self.aim - self.start_value) * frac

  @property
  def aim(self) -> float:
    """Where the plan ends: one tolerance below the target, so that the dead
    band around it, [target - 2 tol, target], lies within the budget."""
    return self.target - self.tolerance_abs

  @property
  def tolerance_abs(self) -> float:
    return self.tolerance * self.target

  @property
  def warnings(self) -> List[str]:
    """Why this run may miss its target (shown once by the loop)."""
    out = []
    if self.epochs < 10:
      out.append(f"budget: only {self.epochs} epochs; the controller needs "
                 f"tens of epochs to steer")
    if not any(e > 0 for e in self.requant_epochs):
      out.append("budget: no re-quantization during training (only at "
                 "epoch 0 and the final one); the model keeps its zero planes "
                 "until the end")
    if self.target >= self.start_value:
      out.append(f"budget: the target {_fmt(self.target, self.unit)} is not "
                 f"below the start {_fmt(self.start_value, self.unit)}; alpha "
                 f"will be lowered")
    return out

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

  def observe(self, epoch: int, measured: float) -> float:
    """Records the size `measured` (what a re-quantization would give now)
    after epoch `epoch`, and returns the alpha for the next epoch."""
    epoch = int(epoch)
    if epoch <= self.last_epoch:
      raise ValueError(f"budget: epoch {epoch} already observed (last "
                       f"{self.last_epoch}); observe each epoch once")
    if not 0 <= epoch < self.epochs:
      raise ValueError(f"budget: epoch {epoch} outside 0..{self.epochs - 1}")
    measured = float(measured)
    if not math.isfinite(measured) or measured < 0:
      raise ValueError(f"budget: measured size {measured!r} is not a finite "
                       f"number >= 0")
    past = [self.start_value] + [r["measured"] for r in self.history]
    w = min(self.slope_window, len(past))
    slope = (measured - past[-w]) / w
    predicted = measured + self.lookahead * slope
    error = predicted - self.reference(epoch + 1 + self.lookahead)
    tol = self.tolerance_abs
    used = self.alpha
    if error > tol:
      action, step = "up", self.up_factor ** min(1.0, error / (3 * tol))
    elif error < -tol:
      action, step = "down", 1.0 / self.down_factor ** min(1.0, -error / (3 * tol))
    else:
      action, step = "hold", 1.0
    nxt = float(min(self.alpha_max, max(self.alpha_min, used * step)))
    self.alpha = nxt
    self.history.append({"epoch": epoch, "alpha": used, "measured": measured,
                         "reference": self.reference(epoch + 1),
                         "predicted": predicted, "error": error,
                         "action": action, "next_alpha": nxt})
    return nxt

  def metrics(self) -> Dict[str, float]:
    """Numbers for the metrics file, from the last `observe`."""
    if not self.history:
      return {"budget_alpha": self.alpha, "budget_target": self.target}
    r = self.history[-1]
    return {"budget_alpha": r["alpha"], "budget_next_alpha": r["next_alpha"],
            "budget_measured": r["measured"],
            "budget_reference": r["reference"],
            "budget_target": self.target, "budget_error": r["error"],
            "budget_step": {"up": 1.0, "hold": 0.0, "down": -1.0}[r["action"]]}

  def progress(self) -> str:
    """A short piece for the progress line, from the last `observe`."""
    if not self.history:
      return f"budget alpha {self.alpha:.3g} target {_fmt(self.target, self.unit)}"
    r = self.history[-1]
    unit = "b" if self.unit == "bits" else "kB"
    return (f"size {r['measured']:.3f}{unit} (plan {r['reference']:.3f}, "
            f"target {self.target:.3f}) alpha {r['alpha']:.3g}->"
            f"{r['next_alpha']:.3g} {r['action']}")

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
    t, f = _fmt(self.target, self.unit), _fmt(final, self.unit)
    if met and below <= 2 * self.tolerance_abs:  # within the dead band
      msg = f"budget met: {f} for a target of {t}"
    elif met:
      msg = (f"budget met: {f} for a target of {t}, {_fmt(below, self.unit)} "
             f"({-pct:.1f}%) below it (the controller overshot)")
    else:
      msg = (f"budget NOT met: {f} is {_fmt(excess, self.unit)} ({pct:.1f}%) "
             f"above the target of {t}; train longer, start from a larger "
             f"alpha or raise alpha_max (last alpha {self.alpha:.3g}, "
             f"alpha_max {self.alpha_max:.3g})")
    return {"target": self.target, "unit": self.unit, "final": final,
            "met": met, "excess": excess, "below": below,
            "relative_error": pct / 100.0, "last_alpha": self.alpha,
            "epochs_observed": len(self.history), "message": msg}

  # -- resume ---------------------------------------------------------------

  _CONFIG = ("target", "unit", "start_value", "epochs", "requant_epochs",
             "alpha0", "alpha_min", "alpha_max", "up_factor", "down_factor",
             "tolerance", "settle_fraction", "reach_epoch", "lookahead",
             "slope_window")

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
