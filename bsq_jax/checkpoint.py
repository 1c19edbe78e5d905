"""Per-stage orbax checkpoints with the scheme, stage and config beside them.

Layout: ``<workdir>/<stage>/checkpoints/<epoch>/{state,meta}``. `state` holds
params, batch_stats and opt_state; `meta` is JSON: stage, epoch, mode, scheme,
model config, whether the stage finished, and anything else the loop needs to
resume exactly (e.g. the budget controller). A restore reads `meta` first and
rebuilds the abstract tree from the scheme, so shapes always match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import shutil
import signal
import threading
from typing import Any, Callable, Dict, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from bsq_jax import faults
from bsq_jax import optim
from bsq_jax.config_check import STAGES
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.models import build_model, input_shape
from bsq_jax.step import TrainState

STAGE_ORDER = STAGES  # run order


class CheckpointError(ValueError):
  """A checkpoint that cannot be used here (other model, corrupt, missing)."""


class ForeignCheckpoint(ValueError):
  """A readable checkpoint of another model: never skipped as if corrupt."""


@dataclasses.dataclass
class Result:
  """What a stage left behind: enough to rebuild its model and variables."""
  stage: str
  epoch: int
  meta: Dict[str, Any]
  state: Any  # step.TrainState-like tree: params, batch_stats, opt_state

  @property
  def model_config(self) -> Dict[str, Any]:
    return self.meta["model_config"]

  @property
  def mode(self) -> str:
    return self.meta["mode"]

  @property
  def scheme(self) -> Optional[Dict[str, int]]:
    return self.meta.get("scheme")

  @property
  def variables(self) -> Dict[str, Any]:
    return {"params": self.state.params,
            "batch_stats": self.state.batch_stats}


@contextlib.contextmanager
def ctrl_c_after():
  """Ctrl-C waits until the block ends: one that came in the middle of a
  save would lose the epoch just trained."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  pressed = []
  before = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, before)
  if pressed:
    raise KeyboardInterrupt


def _read_only_notice(record) -> bool:
  return not record.getMessage().startswith("Given directory is read only")


class StageCheckpoints:
  """The CheckpointManager of one stage of one run."""

  def __init__(self, workdir: str, stage: str, max_to_keep: int = 3,
               read_only: bool = False):
    self.stage, self.read_only = stage, read_only
    self.directory = os.path.abspath(os.path.join(workdir, stage, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        enable_async_checkpointing=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1)
    # Orbax warns that a read-only directory is read only: intended here.
    absl_logger = std_logging.getLogger("absl")
    absl_logger.addFilter(_read_only_notice)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
    finally:
      absl_logger.removeFilter(_read_only_notice)

  def latest_epoch(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, epoch: int, state: Any, meta: Dict[str, Any]) -> None:
    """Asynchronous; call `wait` before reading it back or exiting."""
    meta = dict(meta, stage=self.stage, epoch=epoch)
    # Saved as numpy, from one replica. Orbax would write the replicated
    # device arrays itself, but on CPU it splits each across the replicas
    # (a compiled slice per shape, 4 of a tiny run's 40 s), and with several
    # processes it cannot write pmap's host-local arrays as one global array
    # at all. The values are the same on every device and process.
    with ctrl_c_after():
      state = jax.device_get(state)
      self.manager.save(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=True)
    faults.point("save")  # the write goes on in orbax's thread

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def meta(self, epoch: int) -> Dict[str, Any]:
    try:
      return self.manager.restore(epoch, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises several types for unreadable files
      raise CheckpointError(f"{self.directory}/{epoch}: unreadable metadata "
                            f"({type(e).__name__}: {e})") from e

  def restore(self, epoch: int, abstract_state_fn: Callable[[Dict], Any]
              ) -> Result:
    """Reads meta, builds the abstract state from it, then the arrays."""
    meta = self.meta(epoch)
    abstract = abstract_state_fn(meta)
    try:
      state = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointError(f"{self.directory}/{epoch}: cannot restore arrays "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    return Result(self.stage, epoch, meta, state)

  def restore_latest(self, abstract_state_fn: Callable[[Dict], Any]
                     ) -> Optional[Result]:
    """The newest checkpoint that reads back; None if there is none.

    An unreadable one (torn by a crash outside orbax's atomic rename, or
    damaged later) is reported and skipped for the one before. A writable
    manager also moves it aside to `<epoch>.unreadable`, so the epoch can be
    saved again; nothing is deleted.
    """
    for epoch in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(epoch, abstract_state_fn)
      except CheckpointError as e:
        logging.warning("%s; using the checkpoint before it", e)
        if not self.read_only and jax.process_index() == 0:
          self.manager.wait_until_finished()
          os.replace(os.path.join(self.directory, str(epoch)),
                     os.path.join(self.directory, f"{epoch}.unreadable"))
          self.manager.reload()
    return None

  def finished(self) -> bool:
    """Whether the newest checkpoint is a stage's last; an unreadable one is
    not (restore_latest sets it aside and the stage goes on from before)."""
    epoch = self.latest_epoch()
    try:
      return epoch is not None and bool(self.meta(epoch).get("finished"))
    except CheckpointError:
      return False

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def copy_stages(src: str, dst: str, stages) -> str:
  """A new workdir `dst` that starts from `src`'s `stages` (e.g. one float
  pretraining shared by several BSQ runs); `dst` must not exist yet."""
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "run.json"), dst)
  for stage in stages:
    shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage))
  return str(dst)


def finished_stages(workdir: str) -> list:
  """Stages of a run whose final checkpoint is written, in pipeline order."""
  done = []
  for stage in STAGE_ORDER:
    if os.path.isdir(os.path.join(workdir, stage, "checkpoints")):
      ck = StageCheckpoints(workdir, stage, read_only=True)
      if ck.latest_epoch() is not None and ck.finished():
        done.append(stage)
  return done


def load_result(workdir: str, stage: Optional[str] = None) -> Result:
  """A finished stage's result; by default the last of finetune, bsq.

  Rebuilds the abstract state from the stored model config and scheme, so it
  needs nothing but the workdir.
  """
  if not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir}: no such run folder")
  done = finished_stages(workdir)
  if stage is None:
    picks = [s for s in ("finetune", "bsq") if s in done]
    if not picks:
      raise CheckpointError(f"{workdir}: no finished bsq or finetune stage "
                            f"(finished: {done or 'none'})")
    stage = picks[0]
  elif stage not in done:
    raise CheckpointError(f"{workdir}: stage {stage!r} has not finished "
                          f"(finished: {done or 'none'})")
  ck = StageCheckpoints(workdir, stage, read_only=True)
  return ck.restore(ck.latest_epoch(), abstract_state)


def abstract_state(meta: Dict[str, Any]) -> Any:
  """Shapes of a stage's TrainState, from its checkpoint metadata alone."""
  model = build_model(meta["model_config"],
                      Quant(meta["mode"], freeze_scheme(meta.get("scheme"))))
  sample = jax.numpy.zeros((1,) + input_shape(meta["model_config"]))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), sample))
  # Hyperparameter values don't shape the optimizer state.
  opt_state = jax.eval_shape(optim.make_optimizer(1.0).init,
                             variables["params"])
  return abstract_of(TrainState(variables["params"],
                                variables.get("batch_stats", {}), opt_state))


def abstract_of(tree: Any) -> Any:
  """Restore targets on this process's first device: a checkpoint written
  by another topology (1 device, or other processes) then restores too."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), tree)
