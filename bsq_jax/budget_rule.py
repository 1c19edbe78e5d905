"""The budget controller's rule: the plan, the rate rule and the guard.

Pure functions of numbers, apart from `bsq_jax.budget.BudgetController`,
which keeps the state (alpha, the history, the settings), checks its input
and reports; here is only how the next alpha follows from what an epoch
measured, so the rule reads in one place and each part is tested alone.

Epochs are 0 .. E-1; boundary t is the moment before epoch t. Epoch t trains
with learning rate lr_t (the `effort` of the epoch; all 1 if not given): the
group Lasso moves the planes in proportion to lr * alpha, so an epoch at a
tenth of the learning rate needs ten times the alpha for the same effect.
After epoch e the controller gets

    size_e  what a re-quantization would give now (whole planes, staircase)
    soft_e  its continuous version (log2(M + 1) bits per tensor, see
            `budget.soft_size`), which falls smoothly while the planes shrink
    loss_e  optionally the epoch's training loss (cross-entropy)

and sets alpha for epoch e+1 from the rate the plan needs and the rate the
last epoch gave (a one-parameter model of the plant, re-fitted every epoch):

    aim    = target - tol                  (tol = tolerance * target, 2%)
    need   = size_e - aim                  (what is still to go)
    want   = need * lr_{e+1} / sum(lr_t, t = e+1 .. R-1)
             (the rest of the plan, spread in proportion to the learning
              rate over the epochs up to R = reach_epoch: the last change of
              the learning rate, or 90% of the way if it is constant)
    gain   = (soft_{e-1} - soft_e) / (alpha_e * lr_e)   (soft_{-1} = start)
    alpha' = want / (gain * lr_{e+1})

    need <= 0:            alpha / down_factor          ("down": stop pushing)
    gain <= 0:            alpha * up_factor            ("up": nothing moved)
    otherwise:            alpha' bounded to [alpha / down_factor,
                          alpha * up_factor]         ("up" / "down" / "hold")
    then, if e+1 >= R:    never above alpha            ("hold": the tail's low
                          learning rate barely moves the planes, and a raised
                          alpha there wrecked the model on Fashion-MNIST)
    then, if loss_e > damage_factor * lowest loss so far (1.5), unless a
    host pass ran just before epoch e:
                          at most alpha / down_factor  ("damage")

then alpha is clipped to [alpha_min, alpha_max]. The size error is measured
on whole planes (what the result will be), the rate on the soft size (which
moves every epoch, while whole planes go in steps). The damage guard exists
because a too-strong penalty wrecks the accuracy without giving a smaller
model (on Fashion-MNIST a fixed alpha of 8 ended at more bits than alpha 4).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple


def fmt_size(value: float, unit: str) -> str:
  return f"{value:.3f} bits" if unit == "bits" else f"{value:.3f} kB"


# --------------------------------------------------------------------------
# The plan: how much of the way to the aim each epoch should go.


def plan_end(effort: Sequence[float], settle_fraction: float,
             reach_epoch: Optional[int] = None) -> int:
  """R = reach_epoch, the epoch by which the plan reaches the aim: the one
  given, else the last change of the learning rate, else the epochs less a
  `settle_fraction` share left to settle. Raises ValueError if out of range."""
  epochs = len(effort)
  if not 0 <= settle_fraction < 1:
    raise ValueError(f"settle_fraction: expected a value in [0, 1), got "
                     f"{settle_fraction}")
  if reach_epoch is None and len(set(effort)) > 1:
    # The plan ends where the learning rate last changes: after that the
    # same alpha moves the planes far less (seen: 2-5x less per alpha * lr
    # on Fashion-MNIST), so the tail only holds or trims.
    reach_epoch = max(e for e in range(1, epochs)
                      if effort[e] != effort[e - 1])
  if reach_epoch is None:
    reach_epoch = max(1, epochs - int(round(settle_fraction * epochs)))
  reach_epoch = int(reach_epoch)
  if not 1 <= reach_epoch <= epochs:
    raise ValueError(f"reach_epoch: expected 1..{epochs}, got {reach_epoch}")
  return reach_epoch


def planned_drop(need: float, effort: Sequence[float], epoch: int,
                 reach_epoch: int) -> float:
  """The part of `need` planned for `epoch`: its share of the learning rate
  left before reach_epoch (all of it at or after reach_epoch)."""
  if epoch >= reach_epoch:
    return need
  return need * effort[epoch] / sum(effort[epoch:reach_epoch])


# --------------------------------------------------------------------------
# The rate rule: the alpha step that gives the planned drop.


def epoch_gain(soft_before: float, soft_after: float, alpha: float,
               lr: float) -> float:
  """How far one unit of alpha * lr moved the soft size in the last epoch.

  Only the last epoch's: the plant stiffens as the bits go down (the top
  plane of a narrow range holds many weights), so older gains mislead."""
  return (soft_before - soft_after) / (alpha * lr)


def rate_step(want: float, gain: float, alpha: float, lr_next: float,
              up_factor: float, down_factor: float) -> Tuple[str, float]:
  """(action, factor on alpha) for the next epoch to drop `want` at the
  last epoch's `gain`, bounded to [1 / down_factor, up_factor]."""
  if want <= 0:
    return "down", 1.0 / down_factor
  if gain <= 0:
    return "up", up_factor
  step = want / (gain * lr_next) / alpha
  step = min(up_factor, max(1.0 / down_factor, step))
  return ("up" if step > 1.01 else "down" if step < 0.99 else "hold"), step


def hold_tail(action: str, step: float) -> Tuple[str, float]:
  """After the plan, alpha never rises: the tail's low learning rate barely
  moves the planes, so only damage lowers it."""
  return ("hold" if action == "up" else action), min(step, 1.0)


# --------------------------------------------------------------------------
# The guard: what stops the rule from pushing a damaged or hopeless run.


def damaged(loss: Optional[float], earlier: Sequence[float],
            after_host_pass: bool, damage_factor: float) -> bool:
  """Whether an epoch's training loss says the penalty is wrecking the
  model: above `damage_factor` times the lowest earlier loss. The first
  epoch after a host pass is exempt: re-rounding the weights and restarting
  momentum lift its loss whatever alpha is (seen: 0.44 -> 0.84 -> 0.53 ->
  0.46 as a pass took 3.6 bits at once)."""
  return bool(loss is not None and earlier and not after_host_pass
              and loss > damage_factor * min(earlier))


def early_warnings(epochs: int, requant_epochs: Sequence[int], target: float,
             start_value: float, unit: str) -> List[str]:
  """Why a run may miss its target, known before it starts."""
  out = []
  if epochs < 6:
    out.append(f"budget: only {epochs} epochs; the controller needs "
               f"several epochs to steer")
  if not any(e > 0 for e in requant_epochs):
    out.append("budget: no re-quantization during training (only at "
               "epoch 0 and the final one); the model keeps its zero planes "
               "until the end")
  if target >= start_value:
    out.append(f"budget: the target {fmt_size(target, unit)} is not "
               f"below the start {fmt_size(start_value, unit)}; alpha "
               f"will be lowered")
  return out
