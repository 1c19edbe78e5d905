"""The paper's pipeline as resumable stages (spec section 10): what each stage
starts from and what it leaves.

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
on a rerun; an unfinished one resumes from its last epoch. `Run` checks the
config, the model, the data and the workdir before anything is written;
the epochs of each stage are bsq_jax/stage_loop.py's.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bsq_jax import api
from bsq_jax import augment
from bsq_jax import budget
from bsq_jax import config_check
from bsq_jax import hawq as hawq_lib
from bsq_jax import report
from bsq_jax import scheme as sch
from bsq_jax import settings
from bsq_jax.checkpoint import CheckpointError, Result, StageCheckpoints
from bsq_jax.data import load_dataset
from bsq_jax.data.stream import Stream, is_streamed, load_stream
from bsq_jax.epoch import check_batch, put_dataset, steps_per_epoch
from bsq_jax.layers import Quant
from bsq_jax.models import build_model, init_variables, input_shape
from bsq_jax.rules import RuleError
from bsq_jax.settings import INPUTS
from bsq_jax.stage_loop import StageLoop
from bsq_jax.step import TrainState




class Run:
  """One pipeline run: config, workdir, data on device, and the loop that
  trains its stages (`self.loop`)."""

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
    self.loop = StageLoop(config, workdir, self.model_cfg, self.devices,
                          self.train, self.test)
    self._check_workdir_identity()
    self._inputs = self._read_inputs()
    self._write_identity()  # only once the run is known to be able to start

  # -- set-up checks ----------------------------------------------------------

  def _check_workdir_identity(self) -> None:
    """Raises if the workdir holds a run of other settings (settings.py)."""
    legacy = json.loads(json.dumps(
        {"model": self.model_cfg, "data": self.config.data.name,
         "seed": self.config.seed}))
    self._held = settings.check_workdir(self.workdir, self.config,
                                        config_check.STAGES, legacy)
    if self._held == "legacy":
      logging.warning(
          "%s/run.json is of an earlier version, which recorded only the "
          "model, data and seed: the other settings are not checked",
          self.workdir)

  def _write_identity(self) -> None:
    if report.is_writer():
      settings.write(self.workdir, self.config,
                     run_json=self._held != "legacy")

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
      build_model(self.model_cfg, Quant("float")).quantized_names(sample)
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

  # -- earlier stages' results ------------------------------------------------

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
    result = ck.restore_latest(self.loop.abstract_of_own)
    if result is None or not result.meta.get("finished"):
      newest = ck.latest_epoch()
      why = (f" (its newest checkpoint, {ck.directory}/{newest}, is "
             f"unreadable)" if newest is not None and
             (result is None or result.epoch != newest) else "")
      raise CheckpointError(f"config.stages: stage {stage!r} has not finished "
                            f"in {self.workdir}{why}; run it first (add it to "
                            f"config.stages)")
    return result

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
    return Result("init_from", 0, self.loop.meta("float", None, 0.0, True),
                  TrainState(variables["params"], variables["batch_stats"], ()))

  # -- stages -----------------------------------------------------------------

  def pretrain(self) -> Result:
    model = self.loop.model("float")
    variables = init_variables(model, jax.random.key(self.config.seed),
                               self.sample)
    start = Result("init", 0, self.loop.meta("float", None, 0.0, True),
                   TrainState(variables["params"], variables["batch_stats"], ()))
    return self.loop.train("pretrain", "float", start, self.config.pretrain)

  def convert(self) -> Result:
    loop = self.loop
    ck = StageCheckpoints(self.workdir, "convert")
    done = ck.restore_latest(loop.abstract_of_own)  # sets a damaged one aside
    if done is not None and done.meta.get("finished"):
      ck.close()
      logging.info("stage convert: finished; skipping")
      loop.progress.say(f"{loop.progress.tag('convert')}: finished earlier; "
                        f"kept")
      return done
    if self.config.convert.init_from:
      source = self._inputs["init_from"]
    else:
      source = self.result_of("pretrain")
    scheme = sch.uniform_scheme(loop.model("float"), self.sample,
                                self.config.convert.bits)
    params = sch.float_to_bsq(jax.device_get(source.state.params), scheme)
    state = TrainState(params, jax.device_get(source.state.batch_stats), ())
    state = loop.fresh_momentum("bsq", scheme, state, self.config.bsq)
    trainer = loop.trainer("bsq", scheme, params, self.config.bsq)
    record = dict(stage="convert", epoch=0, **loop.evaluate(trainer, state),
                  **loop.accounting("bsq", params, scheme))
    loop.log_epoch(record)
    ck.save(0, state, loop.meta("bsq", scheme, 0.0, True))
    ck.close()
    return Result("convert", 0, loop.meta("bsq", scheme, 0.0, True), state)

  def bsq(self) -> Result:
    cfg = self.config.bsq
    target = budget.check_budget_fields(
        cfg.alpha is not None, cfg.target_bits or None,
        cfg.target_kbytes or None, cfg.max_bits)
    alpha = cfg.default_alpha if cfg.alpha is None else cfg.alpha
    return self.loop.train("bsq", "bsq", self.result_of("convert"), cfg,
                           alpha, host_pass=True, budget_target=target)

  def _finetune_start(self, stage: str, params, batch_stats) -> Result:
    ft_params, ft_scheme = api.to_finetune(params)
    return Result(stage, 0, self.loop.meta("finetune", ft_scheme, 0.0, False),
                  TrainState(ft_params, batch_stats, ()))

  def _finetune_from(self, stage: str, params, batch_stats) -> Result:
    return self.loop.train(stage, "finetune",
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
    return api.to_finetune(self.result_of("bsq").state.params)

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
    return self.loop.train("hawq", "finetune", start, self.config.finetune)

  def _hawq_converted(self):
    """(float params converted to the HAWQ scheme, batch stats); logs the
    traces and the scheme and records them as the stage's epoch 0."""
    cfg, began = self.config, time.time()
    budget_bits = sch.account(*self._bsq_target()).total_bits
    source = self.result_of("pretrain")
    params = jax.device_get(source.state.params)
    batch_stats = jax.device_get(source.state.batch_stats)
    model = self.loop.model("float")
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
    self.loop.metrics.forget_after("hawq", -1)  # a start that died unsaved
    self.loop.log_epoch(dict(stage="hawq", epoch=0,
                             average_bits=acc.average_bits,
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

  def _steps_left(self, stages) -> Dict[str, int]:
    """Train steps each stage has still to run: the run's ETA."""
    cfg = self.config
    per_epoch = steps_per_epoch(self.train, cfg.batch_size)
    left = {}
    for stage in stages:
      epochs = {"pretrain": cfg.pretrain.epochs, "convert": 0,
                "bsq": cfg.bsq.epochs}.get(stage, cfg.finetune.epochs)
      folder = os.path.join(self.workdir, stage, "checkpoints")
      saved = [int(d) for d in (os.listdir(folder) if os.path.isdir(folder)
                                else ()) if d.isdigit()]
      left[stage] = max(0, epochs - max(saved, default=0)) * per_epoch
    return left

  def run(self) -> str:
    stages = config_check.stages_of(self.config)
    progress = self.loop.progress = report.RunProgress(
        stages, self._steps_left(stages))
    progress.say(f"{len(stages)} stage{'s' * (len(stages) > 1)} "
                 f"({', '.join(stages)}) in "
                 f"{self.workdir}; its settings: {self.workdir}/config.json")
    try:
      for stage in stages:
        logging.info("stage %s", stage)
        getattr(self, stage)()
    finally:
      progress.close()
    table = report.write_summary(self.workdir, self.loop.metrics.records(),
                                 self.command)
    self.loop.metrics.close()
    return table
