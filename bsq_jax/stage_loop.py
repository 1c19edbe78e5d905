"""One stage's epochs: the loop every training stage runs (spec sections 5, 6).

`StageLoop.train` trains one stage from a start, or from the stage's own last
checkpoint. Each epoch it
- runs the host pass (section 6) every `bsq.requant_interval` epochs, and
  the final one after the last epoch, with fresh momentum for the new shapes;
- sets lr (piecewise constant, section 5) and alpha in the optimizer state;
  in budget mode alpha is the budget controller's (bsq_jax/budget.py), which
  sees each epoch's sizes and loss;
- runs the steps of the compiled `Trainer` for the stage's (mode, scheme),
  one compile per scheme, stopping with `Diverged` at a NaN or inf loss;
- tests every `eval_every` epochs and always at the last;
- writes one record to the metrics file and the log, and a checkpoint whose
  metadata lets the epoch resume exactly (the controller included).
A record of a quantized model counts the tensors finetuning holds at 0 bits
(all zero), and the run warns once if BSQ left every quantized weight so.

It knows nothing of which stage follows which: what each stage starts from
and produces is bsq_jax/stages.py's.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, Tuple

import jax
import numpy as np
from absl import logging

from bsq_jax import api
from bsq_jax import budget
from bsq_jax import faults
from bsq_jax import optim
from bsq_jax import report
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import (ForeignCheckpoint, Result, StageCheckpoints,
                                abstract_state, ctrl_c_after)
from bsq_jax.epoch import AXIS, Trainer
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.models import build_model
from bsq_jax.step import TrainState


class Diverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a stage; says what is saved. The checkpoints written so
  far are complete, so the same command resumes after them."""


def lr_at(sched, epoch: int) -> float:
  """Piecewise constant: lr * 0.1 per milestone reached (spec section 5)."""
  return sched.lr * 0.1**sum(epoch >= m for m in sched.lr_milestones)


class StageLoop:
  """The epochs of any stage of one run: compiled trainers, the metrics
  file, checkpoints of this run's model."""

  def __init__(self, config, workdir: str, model_cfg: Dict[str, Any],
               devices, train, test):
    self.config, self.workdir, self.model_cfg = config, workdir, model_cfg
    self.devices, self.train_data, self.test_data = devices, train, test
    self.metrics = report.MetricsLog(workdir)
    self._trainers: Dict[Any, Trainer] = {}
    self._warned_empty = False  # `_warn_if_nothing_left`
    self.progress = report.RunProgress()  # the run's (stages.Run) sets it

  # -- models and trainers ----------------------------------------------------

  def model(self, mode: str, scheme=None, axis_name=None):
    return build_model(self.model_cfg, Quant(mode, freeze_scheme(scheme)),
                       axis_name)

  def trainer(self, mode: str, scheme, params, sched) -> Trainer:
    """The compiled trainer for (mode, scheme): one compile per scheme.

    lr and alpha are injected per epoch, so they are not part of the key.
    """
    key = (mode, tuple(sorted((scheme or {}).items())))
    if key not in self._trainers:
      tp = sch.account(params, scheme if mode == "finetune" else None
                       ).total_params if mode != "float" else 1
      tx = optim.make_optimizer(sched.lr, 0.0, sched.weight_decay,
                                sched.momentum, tp)
      trainer = Trainer(self.model(mode, scheme, AXIS), tx, sch.roles(params),
                        tp, self.config.batch_size, self.config.eval_batch_size,
                        self.config.data.augment, self.devices,
                        self.config.chunk_steps, self.config.cpu_chunk_steps)
      self._trainers[key] = trainer
    return self._trainers[key]

  def fresh_momentum(self, mode, scheme, state, sched):
    """Optimizer state reset: new shapes after a host pass, or a new stage."""
    trainer = self.trainer(mode, scheme, state.params, sched)
    return state._replace(opt_state=trainer.tx.init(state.params))

  # -- checkpoints ------------------------------------------------------------

  def meta(self, mode, scheme, alpha, finished) -> Dict[str, Any]:
    return {"mode": mode, "scheme": scheme, "alpha": alpha,
            "finished": finished, "model_config": self.model_cfg}

  def abstract_of_own(self, meta):
    """abstract_state, for a checkpoint of this run's model only."""
    held = meta.get("model_config")
    if held != json.loads(json.dumps(self.model_cfg)):  # as JSON reads it
      diff = sorted(k for k in set(held or {}) | set(self.model_cfg)
                    if (held or {}).get(k) != self.model_cfg.get(k))
      raise ForeignCheckpoint(
          f"{self.workdir}/{meta.get('stage')}: checkpoint of epoch "
          f"{meta.get('epoch')} is of another model (model.{', model.'.join(diff)}"
          f"); use a new --workdir")
    return abstract_state(meta)

  # -- records ----------------------------------------------------------------

  def accounting(self, mode: str, params, scheme,
                 final: bool = False) -> Dict[str, Any]:
    """The record's size fields. A quantized model's also count its tensors
    at 0 bits in finetuning (`zero_tensors`): in bsq mode the 1-bit ones
    with no bit set, which finetuning holds at 0 bits (spec section 10,
    step 5); bsq mode adds that scheme's `finetune_average_bits` and
    `finetune_compression`, which can be far below its own. `final`: the
    scheme is the one finetuning will take (the bsq stage's last)."""
    if mode == "float":
      return {"average_bits": 32.0, "compression": 1.0}
    acc = sch.account(params, scheme if mode == "finetune" else None)
    tuned = acc
    if mode == "bsq":  # accounted again only if finetuning drops a tensor
      fs = sch.finetune_scheme(params)
      tuned = acc if fs == acc.bits else sch.account(params, fs)
    zero = sch.zero_tensors(tuned.bits)
    if final or mode == "finetune":
      self._warn_if_nothing_left(zero, tuned.bits)
    record = {"average_bits": acc.average_bits,
              "compression": acc.compression, "bits": acc.bits,
              "zero_tensors": len(zero)}
    if mode == "bsq":
      record.update(finetune_average_bits=tuned.average_bits,
                    finetune_compression=tuned.compression)
    return record

  def _warn_if_nothing_left(self, zero, bits) -> None:
    """Once per run: every quantized weight (a bias aside) is all zero."""
    weights = [k for k in bits if k.rsplit("/", 1)[-1] != "bias"]
    if self._warned_empty or not weights or not set(weights) <= set(zero):
      return
    self._warned_empty = True
    left = {k: n for k, n in bits.items() if n}
    message = (
        "BSQ left nothing to quantize: every quantized weight tensor is all "
        "zero (%d of %d quantized tensors at 0 bits%s). Finetuning keeps "
        "them zero, so the finetune, scratch and hawq results are of a model "
        "without those layers. Run BSQ again with a lower alpha (bsq.alpha) "
        "or a size to reach (bsq.target_bits or bsq.target_kbytes)."
    ) % (len(zero), len(bits),
         f"; only {report.precision_line(left)} is left" if left else "")
    logging.info("warning: %s", message)
    self.progress.say(f"warning: {message}")

  def evaluate(self, trainer: Trainer, state: TrainState) -> Dict[str, float]:
    return trainer.evaluate(state, self.test_data)

  def log_epoch(self, record: Dict[str, Any], epochs: int = 0) -> None:
    """Writes `record`, logs it and shows it (`epochs`: the stage's)."""
    self.metrics.write(record)
    trained = ("train loss %.4f (%.1fs), " % (record["train_loss"],
                                             record["epoch_seconds"])
               if "train_loss" in record else "")
    tested = ("test accuracy %.4f, " % record["test_accuracy"]
              if "test_accuracy" in record else "")
    logging.info("%s epoch %d: %s%s%.3f bits (%.2fx)", record["stage"],
                 record["epoch"], trained, tested, record["average_bits"],
                 record["compression"])
    shown = [f"loss {record['train_loss']:.4f}"] if trained else []
    if tested:
      shown.append(f"test {report.percent(record['test_accuracy'])}")
    shown.append(f"{record['average_bits']:.3f} bits "
                 f"({record['compression']:.2f}x)")
    when = (f" epoch {record['epoch']}/{epochs}" if epochs else
            f" epoch {record['epoch']}" if "train_loss" in record else "")
    self.progress.end_epoch(f"{self.progress.tag(record['stage'])}{when}: "
                            f"{', '.join(shown)}")

  # -- the loop ---------------------------------------------------------------

  def train(self, stage: str, mode: str, start: Result, sched,
            alpha: float = 0.0, host_pass: bool = False,
            budget_target=None) -> Result:
    """Trains one stage from `start` (or its own last checkpoint); `start`
    may be a function that makes it, called only when there is nothing to
    resume."""
    ck = StageCheckpoints(self.workdir, stage)
    result = ck.restore_latest(self.abstract_of_own)
    controller = None
    epochs = sched.epochs
    tag = self.progress.tag(stage)
    if result is not None:
      latest = result.epoch
      # A finished stage without a host pass may go on to more epochs
      # (settings.EXTENDS); a host pass ends BSQ's last epoch, so a finished
      # bsq stage is never continued.
      if result.meta.get("finished") and (host_pass or latest >= epochs):
        logging.info("stage %s: finished at epoch %d; skipping", stage, latest)
        self.progress.say(f"{tag}: finished earlier (epoch {latest}); kept")
        ck.close()
        return result
      logging.info("stage %s: resuming after epoch %d", stage, latest)
      self.progress.say(f"{tag}: resuming after epoch {latest} of {epochs}")
      self.metrics.forget_after(stage, latest)
      state, scheme, first = result.state, result.scheme, latest
      if budget_target:
        controller = budget.BudgetController.from_state_dict(
            result.meta["budget"])
    else:
      start = start() if callable(start) else start
      state, scheme, first = start.state, start.scheme, 0
      state = self.fresh_momentum(mode, scheme, state, sched)
      if budget_target:
        controller = self._controller(state.params, budget_target, sched)
    interval = self.config.bsq.requant_interval
    try:
      for epoch in range(first, epochs):
        if host_pass and epoch % interval == 0:
          before = scheme
          state, scheme = self.host_pass(stage, state, sched, epoch)
          if scheme != before:
            faults.point("host_pass")
        if controller is not None:
          alpha = controller.alpha_for_epoch(epoch)
        trainer = self.trainer(mode, scheme, state.params, sched)
        state = state._replace(opt_state=optim.set_hyperparams(
            state.opt_state, learning_rate=lr_at(sched, epoch), alpha=alpha))
        state, train_metrics = self._epoch(stage, trainer, state, epoch,
                                           epochs)
        extra = {}
        if controller is not None:
          sizes = self._sizes(state.params, controller.unit)
          controller.observe(epoch, *sizes, loss=train_metrics["train_loss"])
          extra = dict(controller.metrics(), budget=controller.state_dict())
        finished = epoch + 1 == epochs
        if host_pass and finished:  # the final re-quantization (section 6)
          state, scheme = self.host_pass(stage, state, sched, epochs)
          trainer = self.trainer(mode, scheme, state.params, sched)
          if controller is not None:
            extra["budget_report"] = self._final_budget(controller,
                                                        state.params)
            message = extra["budget_report"]["message"]
            logging.info("%s budget: %s", stage, message)
            self.progress.say(f"{tag} budget: {message}")
        # The test set costs about as much as a short epoch on CPU, so it
        # can be skipped between `eval_every` epochs; the last always has it.
        tested = finished or (epoch + 1) % self.config.eval_every == 0
        record = dict(stage=stage, epoch=epoch + 1, lr=lr_at(sched, epoch),
                      alpha=alpha, **train_metrics,
                      **(self.evaluate(trainer, state) if tested else {}),
                      **self.accounting(mode, state.params, scheme, finished),
                      **{k: v for k, v in extra.items() if k != "budget"})
        meta = self.meta(mode, scheme, alpha, finished)
        meta.update({k: v for k, v in extra.items()
                     if k.startswith("budget")})
        # An epoch shown is an epoch saved: Ctrl-C after its line waits
        # for the save.
        with ctrl_c_after():
          self.log_epoch(record, epochs)
          if controller is not None:  # alpha per epoch on the progress line
            logging.info("%s epoch %d budget: %s", stage, epoch + 1,
                         controller.progress())
          ck.save(epoch + 1, state, meta)
    except KeyboardInterrupt:
      ck.wait()  # what was being saved is complete, as the message says
      saved = ck.latest_epoch()
      ck.close()
      raise Interrupted(
          f"interrupted in stage {stage}: "
          + (f"epoch {saved} of {epochs} is saved in {ck.directory}"
             if saved is not None else
             "no epoch of it was saved yet, the stages before it are")
          + "; the same command resumes from there") from None
    if epochs == 0:
      ck.save(epochs, state, self.meta(mode, scheme, alpha, True))
    ck.close()
    return Result(stage, epochs, self.meta(mode, scheme, alpha, True), state)

  def host_pass(self, stage, state, sched, epoch):
    """Section 6: requantize every layer, reset momentum, log the scheme."""
    params, _, scheme = api.host_pass(state.params,
                                      max_bits=self.config.bsq.max_bits)
    # All momentum is reset, as the paper does (the API's reset="all"),
    # with the optimizer of the new scheme's trainer.
    state = self.fresh_momentum("bsq", scheme, state._replace(params=params),
                                sched)
    acc = sch.account(params)
    logging.info("%s epoch %d host pass: %.3f average bits, %.2fx | %s", stage,
                 epoch, acc.average_bits, acc.compression,
                 report.precision_line(scheme))
    self.progress.say(
        f"{self.progress.tag(stage)} host pass after epoch {epoch}: "
        f"{acc.average_bits:.3f} average bits ({acc.compression:.2f}x) | "
        f"{report.precision_line(scheme)}")
    return state, scheme

  def _epoch(self, stage, trainer: Trainer, state, epoch, sched_epochs):
    began = time.time()
    self.progress.begin_epoch()
    totals, done = {}, 0
    for state, n, sums in trainer.train_epoch(state, self.train_data,
                                              self.config.seed, epoch):
      sums = jax.device_get(sums)
      if not all(math.isfinite(float(v)) for v in sums.values()):
        steps = (f"step {done + 1}" if n == 1 else
                 f"steps {done + 1}-{done + n}")
        kept = (f"the last good checkpoint (epoch {epoch}) is kept" if epoch
                else "no checkpoint of this stage was written")
        raise Diverged(f"stage {stage}: {_nonfinite(sums, state.params)} in "
                       f"epoch {epoch + 1}, {steps}; {kept}")
      totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
      done += n
      faults.point("step")
      self.progress.steps(stage, f"{epoch + 1}/{sched_epochs}", n,
                          loss=totals["loss"] / done)
    seconds = time.time() - began
    return state, {"train_loss": totals["loss"] / done,
                   "train_accuracy": totals["accuracy"] / done,
                   "penalty": totals["penalty"] / done,
                   "epoch_seconds": seconds, "steps": done}

  # -- the budget controller (bsq_jax/budget.py) ------------------------------

  def _sizes(self, params, unit: str) -> Tuple[float, float]:
    """What the budget controller steers on: the size a re-quantization
    would give now, and its continuous version (`budget.soft_size`)."""
    return budget.sizes(params, unit, self.config.bsq.max_bits)

  def _final_budget(self, controller, params) -> Dict[str, Any]:
    """Whether the final scheme met the target, in the user's unit."""
    return controller.report(budget.size_of(sch.account(params),
                                            controller.unit))

  def _controller(self, params, target, sched) -> budget.BudgetController:
    value, unit = target
    bsq_cfg = self.config.bsq
    size, soft = self._sizes(params, unit)
    controller = budget.BudgetController(
        value, unit, size, sched.epochs,
        list(range(0, sched.epochs, bsq_cfg.requant_interval)),
        alpha0=bsq_cfg.default_alpha, alpha_min=bsq_cfg.budget_alpha_min,
        alpha_max=bsq_cfg.budget_alpha_max, start_soft=soft,
        effort=[lr_at(sched, e) for e in range(sched.epochs)])
    for warning in controller.warnings:
      logging.info("warning: %s", warning)
      self.progress.say(f"warning: {warning}")
    return controller


def _nonfinite(sums, params) -> str:
  """What became NaN or inf: the metrics (loss, penalty) and the first
  parameter, by path, so that a divergence names its place."""
  bad = [f"{k} became {float(v)}" for k, v in sums.items()
         if not math.isfinite(float(v))]
  for path, node in sch.walk(jax.device_get(params)):
    parts = (node._asdict().items() if isinstance(node, sch.QUANT_NODES)
             else (("", node),))
    for field, value in parts:
      if not np.all(np.isfinite(value)):
        bad.append(f"parameter {path}{'.' + field if field else ''} is not "
                   f"finite")
        return ", ".join(bad)
  return ", ".join(bad)
