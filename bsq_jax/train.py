"""The paper's pipeline as resumable stages (spec section 10).

    pretrain  float training
    convert   float (or a PyTorch checkpoint, `convert.init_from`) -> planes
    bsq       BSQ training, host pass every `requant_interval` epochs
    finetune  the final scheme fixed, float c per layer
    scratch   the float model at BSQ's scheme, finetuned the same way
    uniform   the converted model (`convert.bits` in every layer), finetuned
              the same way: the uniform-precision baseline
    hawq      the float model at HAWQ-V2-style precisions (Hessian traces,
              an exact knapsack) of BSQ's size, finetuned the same way
              (bsq_jax/hawq.py)

Each stage checkpoints every epoch under `<workdir>/<stage>/` and finds its
input in the previous stage's final checkpoint. A finished stage is skipped
on a rerun; an unfinished one resumes from its last epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bsq_jax import augment
from bsq_jax import budget
from bsq_jax import config_check
from bsq_jax import faults
from bsq_jax import hawq as hawq_lib
from bsq_jax import optim
from bsq_jax import report
from bsq_jax import scheme as sch
from bsq_jax.checkpoint import (CheckpointError, ForeignCheckpoint, Result,
                                StageCheckpoints, abstract_state)
from bsq_jax.data import load_dataset
from bsq_jax.data.stream import Stream, is_streamed, load_stream
from bsq_jax.epoch import AXIS, Trainer, check_batch, put_dataset
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.models import build_model, init_variables, input_shape
from bsq_jax.rules import RuleError
from bsq_jax.step import TrainState


# The stages each stage starts from.
INPUTS = {"convert": ("pretrain",), "bsq": ("convert",), "finetune": ("bsq",),
          "scratch": ("bsq", "pretrain"), "uniform": ("convert",),
          "hawq": ("bsq", "pretrain")}


class Diverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_at(sched, epoch: int) -> float:
  """Piecewise constant: lr * 0.1 per milestone reached (spec section 5)."""
  return sched.lr * 0.1**sum(epoch >= m for m in sched.lr_milestones)


class Run:
  """One pipeline run: config, workdir, data on device, compiled trainers."""

  def __init__(self, config, workdir: str, command: Optional[str] = None,
               devices=None):
    config_check.check(config)
    # Default: every device of every process (several hosts: jax.distributed).
    self.devices = list(jax.devices() if devices is None else devices)
    check_batch(config.batch_size, len(self.devices))
    check_batch(config.eval_batch_size, len(self.devices))
    self.config, self.workdir, self.command = config, workdir, command
    self.model_cfg = config.model.to_dict()
    self.sample = self._check_model()
    self.train, self.test = self._load_data()
    held = self._check_workdir_identity()
    self._inputs = self._read_inputs()
    if not held:  # only once the run is known to be able to start
      self._write_identity()
    self.metrics = report.MetricsLog(workdir)
    self._trainers: Dict[Any, Trainer] = {}

  # -- set-up checks ----------------------------------------------------------

  def _identity(self) -> Dict[str, Any]:
    """What must match for a workdir's checkpoints to belong to this run
    (as JSON reads it back: tuples become lists)."""
    return json.loads(json.dumps(
        {"model": self.model_cfg, "data": self.config.data.name,
         "seed": self.config.seed}))

  def _check_workdir_identity(self) -> bool:
    """True if the workdir already holds this run; raises if another's."""
    path = os.path.join(self.workdir, "run.json")
    if not os.path.exists(path):
      return False
    with open(path) as f:
      held = json.load(f)
    want = self._identity()
    if held != want:
      diff = [k for k in want if held.get(k) != want[k]]
      raise CheckpointError(
          f"--workdir {self.workdir} holds a run of another "
          f"{'/'.join(diff)} ({path}); use a new --workdir")
    return True

  def _write_identity(self) -> None:
    if report.is_writer():
      os.makedirs(self.workdir, exist_ok=True)
      with open(os.path.join(self.workdir, "run.json"), "w") as f:
        json.dump(self._identity(), f, indent=1)

  def _read_inputs(self) -> Dict[str, Result]:
    """What the config's stages need from outside this run: earlier stages
    that must have finished in the workdir, or the PyTorch start. Read before
    anything is written, so a missing, corrupt or foreign one changes nothing.
    """
    stages = config_check.stages_of(self.config)
    inputs = {}
    for i, stage in enumerate(stages):
      if self._done(stage):  # will be skipped: needs nothing
        continue
      if stage == "convert" and self.config.convert.init_from:
        inputs["init_from"] = self._torch_start(self.config.convert.init_from)
        continue
      for need in INPUTS.get(stage, ()):
        if need not in stages[:i] and need not in inputs:
          inputs[need] = self._finished(need)
    return inputs

  def _check_model(self) -> jax.Array:
    """Builds the model and applies its rules once, so that a model that
    cannot be built, or rules that select nothing or what cannot be
    quantized, end the run before the workdir is touched. Returns a sample
    input."""
    try:
      sample = jnp.zeros((1,) + input_shape(self.model_cfg), jnp.float32)
      self.model("float").quantized_names(sample)
    except RuleError as e:
      raise config_check.ConfigError(f"config.model.rules: {e}") from None
    except (ValueError, TypeError) as e:
      message = str(e).splitlines()[0] if str(e) else repr(e)
      raise config_check.ConfigError(
          message if message.startswith("config.") else
          f"config.{message}" if message.startswith("model.") else
          f"config.model: {message}") from None
    return sample

  def _load_data(self):
    """(train, test): copied onto the devices, or a host-fed `Stream` for
    data too large for them (both halves the same stream)."""
    cfg = self.config
    if is_streamed(cfg.data):
      stream = load_stream(cfg.data, input_shape(self.model_cfg),
                           cfg.batch_size, cfg.eval_batch_size, cfg.seed)
      self._check_data(stream.name, stream.num_classes, stream.image_shape,
                       stream.steps_per_epoch * cfg.batch_size)
      return stream, stream
    ds = load_dataset(cfg.data)
    self._check_data(ds.name, ds.num_classes, ds.train_images.shape[1:],
                     len(ds.train_labels))
    return (put_dataset(ds.train_images, ds.train_labels, ds.mean, ds.std,
                        self.devices),
            put_dataset(ds.test_images, ds.test_labels, ds.mean, ds.std,
                        self.devices))

  def _check_data(self, name: str, num_classes: int, shape, size: int) -> None:
    want = input_shape(self.model_cfg)
    if num_classes != self.model_cfg["num_classes"]:
      raise config_check.ConfigError(
          f"config.model.num_classes: {self.model_cfg['num_classes']} does not "
          f"match {name}'s {num_classes} classes")
    if tuple(shape) != want:
      raise config_check.ConfigError(
          f"config.model.channels/image_size: the model takes {want} images, "
          f"{name} has {tuple(shape)}")
    if size < self.config.batch_size:
      raise config_check.ConfigError(
          f"config.batch_size: {self.config.batch_size} is larger than the "
          f"{size} training images")
    if ("hawq" in config_check.stages_of(self.config) and
        self.config.hawq.batches * self.config.batch_size > size):
      raise config_check.ConfigError(
          f"config.hawq.batches: {self.config.hawq.batches} batches of "
          f"{self.config.batch_size} exceed the {size} training images")

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

  # -- records ----------------------------------------------------------------

  def accounting(self, mode: str, params, scheme) -> Dict[str, Any]:
    if mode == "float":
      return {"average_bits": 32.0, "compression": 1.0}
    acc = sch.account(params, scheme if mode == "finetune" else None)
    return {"average_bits": acc.average_bits, "compression": acc.compression,
            "bits": acc.bits}

  def evaluate(self, trainer: Trainer, state: TrainState) -> Dict[str, float]:
    return trainer.evaluate(state, self.test)

  # -- the stage loop ---------------------------------------------------------

  def train_stage(self, stage: str, mode: str, start: Result, sched,
                  alpha: float = 0.0, host_pass: bool = False,
                  budget_target=None) -> Result:
    """Trains one stage from `start` (or its own last checkpoint); `start`
    may be a function that makes it, called only when there is nothing to
    resume."""
    ck = StageCheckpoints(self.workdir, stage)
    result = ck.restore_latest(self._abstract_of_own)
    controller = None
    if result is not None:
      latest = result.epoch
      if result.meta.get("finished"):
        logging.info("stage %s: finished at epoch %d; skipping", stage, latest)
        ck.close()
        return result
      logging.info("stage %s: resuming after epoch %d", stage, latest)
      self.metrics.forget_after(stage, latest)
      state, scheme, first = result.state, result.scheme, latest
      if budget_target:
        controller = budget.BudgetController.from_state_dict(
            result.meta["budget"])
    else:
      start = start() if callable(start) else start
      state, scheme, first = start.state, start.scheme, 0
      state = self._fresh_momentum(mode, scheme, state, sched)
      if budget_target:
        controller = self._controller(state.params, budget_target, sched)
    epochs = sched.epochs
    interval = self.config.bsq.requant_interval
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
      state, train_metrics = self._epoch(stage, trainer, state, epoch)
      extra = {}
      if controller is not None:
        controller.observe(epoch, *self._sizes(state.params, controller.unit),
                           loss=train_metrics["train_loss"])
        extra = dict(controller.metrics(), budget=controller.state_dict())
      finished = epoch + 1 == epochs
      if host_pass and finished:  # the final re-quantization (section 6)
        state, scheme = self.host_pass(stage, state, sched, epochs)
        trainer = self.trainer(mode, scheme, state.params, sched)
        if controller is not None:
          extra["budget_report"] = self._final_budget(controller,
                                                      state.params)
          logging.info("%s budget: %s", stage,
                       extra["budget_report"]["message"])
      # The test set costs about as much as a short epoch on CPU, so it can
      # be skipped between `eval_every` epochs; the last epoch always has it.
      tested = finished or (epoch + 1) % self.config.eval_every == 0
      record = dict(stage=stage, epoch=epoch + 1, lr=lr_at(sched, epoch),
                    alpha=alpha, **train_metrics,
                    **(self.evaluate(trainer, state) if tested else {}),
                    **self.accounting(mode, state.params, scheme),
                    **{k: v for k, v in extra.items() if k != "budget"})
      self._log_epoch(record)
      if controller is not None:  # alpha per epoch on the progress line too
        logging.info("%s epoch %d budget: %s", stage, epoch + 1,
                     controller.progress())
      meta = self._meta(mode, scheme, alpha, finished)
      meta.update({k: v for k, v in extra.items() if k.startswith("budget")})
      ck.save(epoch + 1, state, meta)
    if epochs == 0:
      ck.save(epochs, state, self._meta(mode, scheme, alpha, True))
    ck.close()
    return Result(stage, epochs, self._meta(mode, scheme, alpha, True), state)

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
      logging.warning("%s", warning)
    return controller

  def _meta(self, mode, scheme, alpha, finished) -> Dict[str, Any]:
    return {"mode": mode, "scheme": scheme, "alpha": alpha,
            "finished": finished, "model_config": self.model_cfg}

  def _fresh_momentum(self, mode, scheme, state, sched):
    """Optimizer state reset: new shapes after a host pass, or a new stage."""
    trainer = self.trainer(mode, scheme, state.params, sched)
    return state._replace(opt_state=trainer.tx.init(state.params))

  def host_pass(self, stage, state, sched, epoch):
    """Section 6: requantize every layer, reset momentum, log the scheme."""
    params, scheme = sch.requantize_params(jax.device_get(state.params),
                                           self.config.bsq.max_bits)
    state = state._replace(params=params)
    state = self._fresh_momentum("bsq", scheme, state, sched)
    acc = sch.account(params)
    logging.info("%s epoch %d host pass: %.3f average bits, %.2fx | %s", stage,
                 epoch, acc.average_bits, acc.compression,
                 report.precision_line(scheme))
    return state, scheme

  def _epoch(self, stage, trainer: Trainer, state, epoch):
    steps = trainer.steps_per_epoch(self.train)
    progress = report.Progress(steps, f"{stage} epoch {epoch + 1}")
    totals, done = {}, 0
    for state, n, sums in trainer.train_epoch(state, self.train,
                                              self.config.seed, epoch):
      sums = jax.device_get(sums)
      if not all(math.isfinite(float(v)) for v in sums.values()):
        steps = (f"step {done + 1}" if n == 1 else
                 f"steps {done + 1}-{done + n}")
        kept = (f"the last good checkpoint (epoch {epoch}) is kept" if epoch
                else "no checkpoint of this stage was written")
        raise Diverged(f"stage {stage}: loss became {float(sums['loss'])} in "
                       f"epoch {epoch + 1}, {steps}; {kept}")
      totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
      done += n
      faults.point("step")
      progress.update(n, loss=totals["loss"] / done,
                      acc=totals["accuracy"] / done)
    seconds = progress.close()
    return state, {"train_loss": totals["loss"] / done,
                   "train_accuracy": totals["accuracy"] / done,
                   "penalty": totals["penalty"] / done,
                   "epoch_seconds": seconds, "steps": done}

  def _log_epoch(self, record: Dict[str, Any]) -> None:
    self.metrics.write(record)
    trained = ("train loss %.4f (%.1fs), " % (record["train_loss"],
                                             record["epoch_seconds"])
               if "train_loss" in record else "")
    tested = ("test accuracy %.4f, " % record["test_accuracy"]
              if "test_accuracy" in record else "")
    logging.info("%s epoch %d: %s%s%.3f bits (%.2fx)", record["stage"],
                 record["epoch"], trained, tested, record["average_bits"],
                 record["compression"])

  # -- stages -----------------------------------------------------------------

  def _done(self, stage: str) -> bool:
    if not os.path.isdir(os.path.join(self.workdir, stage, "checkpoints")):
      return False
    return StageCheckpoints(self.workdir, stage, read_only=True).finished()

  def result_of(self, stage: str) -> Result:
    """The final checkpoint of an earlier stage, which must have finished."""
    if stage in self._inputs:  # read up front; handed over once (memory)
      return self._inputs.pop(stage)
    return self._finished(stage)

  def _finished(self, stage: str) -> Result:
    ck = StageCheckpoints(self.workdir, stage, read_only=True)
    result = ck.restore_latest(self._abstract_of_own)
    if result is None or not result.meta.get("finished"):
      newest = ck.latest_epoch()
      why = (f" (its newest checkpoint, {ck.directory}/{newest}, is "
             f"unreadable)" if newest is not None and
             (result is None or result.epoch != newest) else "")
      raise CheckpointError(f"config.stages: stage {stage!r} has not finished "
                            f"in {self.workdir}{why}; run it first (add it to "
                            f"config.stages)")
    return result

  def _abstract_of_own(self, meta):
    """abstract_state, for a checkpoint of this run's model only."""
    held = meta.get("model_config")
    if held != self._identity()["model"]:
      diff = sorted(k for k in set(held or {}) | set(self.model_cfg)
                    if (held or {}).get(k) != self.model_cfg.get(k))
      raise ForeignCheckpoint(
          f"{self.workdir}/{meta.get('stage')}: checkpoint of epoch "
          f"{meta.get('epoch')} is of another model (model.{', model.'.join(diff)}"
          f"); use a new --workdir")
    return abstract_state(meta)

  def pretrain(self) -> Result:
    model = self.model("float")
    variables = init_variables(model, jax.random.key(self.config.seed),
                               self.sample)
    start = Result("init", 0, self._meta("float", None, 0.0, True),
                   TrainState(variables["params"], variables["batch_stats"], ()))
    return self.train_stage("pretrain", "float", start, self.config.pretrain)

  def convert(self) -> Result:
    ck = StageCheckpoints(self.workdir, "convert")
    done = ck.restore_latest(self._abstract_of_own)  # sets a damaged one aside
    if done is not None and done.meta.get("finished"):
      ck.close()
      logging.info("stage convert: finished; skipping")
      return done
    if self.config.convert.init_from:
      source = self._inputs["init_from"]
    else:
      source = self.result_of("pretrain")
    scheme = sch.uniform_scheme(self.model("float"), self.sample,
                                self.config.convert.bits)
    params = sch.float_to_bsq(jax.device_get(source.state.params), scheme)
    state = TrainState(params, jax.device_get(source.state.batch_stats), ())
    state = self._fresh_momentum("bsq", scheme, state, self.config.bsq)
    trainer = self.trainer("bsq", scheme, params, self.config.bsq)
    record = dict(stage="convert", epoch=0, **self.evaluate(trainer, state),
                  **self.accounting("bsq", params, scheme))
    self._log_epoch(record)
    ck.save(0, state, self._meta("bsq", scheme, 0.0, True))
    ck.close()
    return Result("convert", 0, self._meta("bsq", scheme, 0.0, True), state)

  def _torch_start(self, path: str) -> Result:
    from bsq_jax import pretrained  # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
      raise config_check.ConfigError(f"config.convert.init_from: {path} does "
                                     f"not exist")
    try:
      _, variables = pretrained.load_for_model_config(
          pretrained.read_torch_checkpoint(path), self.model_cfg)
    except (ImportError, ValueError) as e:
      where = "" if path in str(e) else f"{path}: "
      raise config_check.ConfigError(
          f"config.convert.init_from: {where}{e}") from e
    return Result("init_from", 0, self._meta("float", None, 0.0, True),
                  TrainState(variables["params"], variables["batch_stats"], ()))

  def bsq(self) -> Result:
    cfg = self.config.bsq
    target = budget.check_budget_fields(
        cfg.alpha is not None, cfg.target_bits or None,
        cfg.target_kbytes or None, cfg.max_bits)
    alpha = cfg.default_alpha if cfg.alpha is None else cfg.alpha
    return self.train_stage("bsq", "bsq", self.result_of("convert"), cfg,
                            alpha, host_pass=True, budget_target=target)

  def _finetune_start(self, stage: str, params, batch_stats) -> Result:
    ft_params, ft_scheme = sch.bsq_to_finetune(params)
    return Result(stage, 0, self._meta("finetune", ft_scheme, 0.0, False),
                  TrainState(ft_params, batch_stats, ()))

  def _finetune_from(self, stage: str, params, batch_stats) -> Result:
    return self.train_stage(stage, "finetune",
                            self._finetune_start(stage, params, batch_stats),
                            self.config.finetune)

  def _finetune_result(self, stage: str, source: str) -> Result:
    src = self.result_of(source)
    return self._finetune_from(stage, jax.device_get(src.state.params),
                               jax.device_get(src.state.batch_stats))

  def finetune(self) -> Result:
    return self._finetune_result("finetune", "bsq")

  def _bsq_target(self) -> Tuple[sch.Params, sch.Scheme]:
    """The bsq stage's final params and scheme as finetune would hold them."""
    return sch.bsq_to_finetune(jax.device_get(
        self.result_of("bsq").state.params))

  def scratch(self) -> Result:
    """The float model at the scheme BSQ found (finetune's), finetuned alike."""
    target = self._bsq_target()[1]
    source = self.result_of("pretrain")
    params = sch.float_to_bsq(jax.device_get(source.state.params), target)
    return self._finetune_from("scratch", params,
                               jax.device_get(source.state.batch_stats))

  def uniform(self) -> Result:
    """The uniform baseline: convert's `convert.bits` everywhere, finetuned."""
    return self._finetune_result("uniform", "convert")

  def hawq(self) -> Result:
    """The float model at HAWQ-V2-style precisions of BSQ's total bits
    (bsq_jax/hawq.py), converted and finetuned as `scratch` is. The traces
    are computed only when the stage has no checkpoint to resume from."""
    def start():
      params, batch_stats = self._hawq_converted()
      return self._finetune_start("hawq", params, batch_stats)
    return self.train_stage("hawq", "finetune", start, self.config.finetune)

  def _hawq_converted(self):
    """(float params converted to the HAWQ scheme, batch stats); logs the
    traces and the scheme and records them as the stage's epoch 0."""
    cfg, began = self.config, time.time()
    budget_bits = sch.account(*self._bsq_target()).total_bits
    source = self.result_of("pretrain")
    params = jax.device_get(source.state.params)
    batch_stats = jax.device_get(source.state.batch_stats)
    model = self.model("float")
    names = model.quantized_names(self.sample)
    traces = self._hawq_traces(model, params, batch_stats, names)
    weights = hawq_lib.split(params, names)
    alloc = hawq_lib.hawq_allocation(traces, weights, budget_bits,
                                     cfg.bsq.max_bits)
    acc = sch.Accounting(bits=alloc.scheme,
                         sizes={n: int(np.size(w)) for n, w in weights.items()})
    logging.info("hawq average Hessian traces (%d batches x %d probes): %s",
                 cfg.hawq.batches, cfg.hawq.probes,
                 " ".join(f"{k.removesuffix('/kernel')}={v:.3g}"
                          for k, v in alloc.traces.items()))
    logging.info("hawq scheme: %d of BSQ's %d bits, %.3f average bits | %s",
                 alloc.total_bits, budget_bits, acc.average_bits,
                 report.precision_line(alloc.scheme))
    self.metrics.forget_after("hawq", -1)  # a start that died unsaved
    self._log_epoch(dict(stage="hawq", epoch=0, average_bits=acc.average_bits,
                         compression=acc.compression, bits=acc.bits,
                         **alloc.record(),
                         hawq_seconds=time.time() - began))
    return sch.float_to_bsq(params, alloc.scheme), batch_stats

  def _hawq_traces(self, model, params, batch_stats, names):
    """Step 1 of bsq_jax/hawq.py, or its result from `hawq_traces.json`
    where the key matches (the same float model, batches and probes)."""
    cfg = self.config
    cache = hawq_lib.TraceCache(
        os.path.join(self.workdir, hawq_lib.TraceCache.FILE),
        {"float_model": hawq_lib.fingerprint(params, batch_stats),
         "tensors": sorted(names), "probes": cfg.hawq.probes,
         "batches": cfg.hawq.batches, "batch_size": cfg.batch_size,
         "seed": cfg.seed, "processes": jax.process_count()})
    traces = cache.load()
    if traces is not None:
      logging.info("hawq: Hessian traces from %s (same float model, batches "
                   "and probes)", cache.path)
      return traces
    traces = hawq_lib.model_traces(model, params, batch_stats,
                                   names, self._hessian_batches(),
                                   cfg.hawq.probes, cfg.seed)
    if jax.process_count() > 1:  # streamed batches differ per process
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      gathered = multihost_utils.process_allgather(
          np.asarray([traces[n] for n in names]))
      traces = dict(zip(names, np.mean(gathered, axis=0).tolist()))
    if report.is_writer():
      cache.save(traces)
    return traces

  def _hessian_batches(self):
    """`hawq.batches` training batches of `batch_size` as (images, labels)
    on the host, not augmented: a fixed draw from the seed (a stream's first
    batches of epoch 0, as it gives them)."""
    count, size = self.config.hawq.batches, self.config.batch_size
    if isinstance(self.train, Stream):
      return [(b["images"], b["labels"])
              for b, _ in zip(self.train.train(0), range(count))]
    ids = np.random.default_rng(self.config.seed).permutation(
        self.train.size)[:count * size]
    images = self.train.images.addressable_data(0)[ids]  # one device's copy
    images = np.asarray(augment.normalize(images, self.train.mean,
                                          self.train.std))
    labels = np.asarray(self.train.labels.addressable_data(0)[ids])
    return [(images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size])
            for i in range(count)]

  def run(self) -> str:
    for stage in config_check.stages_of(self.config):
      logging.info("stage %s", stage)
      getattr(self, stage)()
    table = report.write_summary(self.workdir, self.metrics.records(),
                                 self.command)
    self.metrics.close()
    return table


def train_and_evaluate(config, workdir: str, command: Optional[str] = None) -> str:
  """Runs the config's stages in `workdir`; returns the summary table."""
  return Run(config, workdir, command).run()
