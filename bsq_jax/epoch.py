"""Compiled epochs: over a dataset on the accelerator, or fed from the host.

A small dataset (`DeviceData`) lives on the accelerator; a large one
(`stream.Stream`, ImageNet) is decoded on the host and fed batch by batch,
each batch split over the local devices by one pmapped train step.

The on-device dataset is placed once on every local device. An epoch is a few
dispatches of a pmapped `lax.scan` over `chunk_steps` train steps; each step
gathers its global batch from a permutation that depends only on (seed,
epoch), takes this device's slice, augments it and trains. Replicated state
goes in and comes out with in_axes/out_axes=None.

XLA's CPU backend runs a train step inside a while loop about 10x slower
than the same step at top level (measured on ResNet-8, batch 64: 0.96 s per
step in a scan of length 1, even with unroll=True, which still emits a while
loop; 0.10 s as straight-line code). So on CPU a chunk is a Python loop traced
into straight-line code, and chunks are short (`cpu_chunk_steps`), since
compile time grows with their length; on GPU/TPU it is a rolled `lax.scan`,
which compiles one step whatever the chunk length. `Trainer(loop=...)` is the
one switch between the two: "auto" (the platform's choice above), "scan" or
"straight". tests/test_epoch_loops.py runs the rolled scan on CPU against
the straight-line chunks: the same evaluation bit for bit, and parameters
that differ in their last bits only.
"""

from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bsq_jax import augment
from bsq_jax.data.stream import Stream
from bsq_jax.step import TrainState, make_eval_step, make_train_step

AXIS = "batch"
# Trainer(loop=...): "auto" picks "straight" on CPU, "scan" elsewhere.
LOOPS = ("auto", "scan", "straight")


class DeviceData(NamedTuple):
  """A dataset replicated on the local devices (uint8 images, int32 labels)."""
  images: jax.Array
  labels: jax.Array
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  @property
  def size(self) -> int:
    return self.labels.shape[0]


def _replicated_sharding(devices: Optional[Sequence] = None) -> NamedSharding:
  devices = jax.devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return NamedSharding(mesh, PartitionSpec())


def put_dataset(images: np.ndarray, labels: np.ndarray, mean, std,
                devices: Optional[Sequence] = None) -> DeviceData:
  """Copies a dataset once onto every device (default: all devices of all
  processes; each process passes the same arrays)."""
  sharding = _replicated_sharding(devices)
  return DeviceData(jax.device_put(images, sharding),
                    jax.device_put(labels.astype(np.int32), sharding),
                    tuple(mean), tuple(std))


def epoch_key(seed: int, epoch: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), epoch)


def steps_per_epoch(data, batch_size: int) -> int:
  """Train steps of one epoch over `data` (a Stream or a DeviceDataset)."""
  if isinstance(data, Stream):
    return data.steps_per_epoch
  return data.size // batch_size  # the last partial batch is dropped


def check_batch(batch_size: int, devices: int) -> int:
  """Per-device batch; the global batch must split evenly over devices."""
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(f"config.batch_size: {batch_size} does not split evenly "
                     f"over {devices} devices; use a multiple of {devices}")
  return batch_size // devices


def _local_slice(x: jax.Array, lane: jax.Array, per_device: int) -> jax.Array:
  """This device's share of a global-batch array (lane = device index)."""
  return jax.lax.dynamic_slice_in_dim(x, lane * per_device, per_device)


def _dropout_key(step_key: jax.Array, lane: jax.Array) -> jax.Array:
  """Dropout masks differ per step and per device."""
  return jax.random.fold_in(jax.random.fold_in(step_key, 7), lane)


class Trainer:
  """Compiled train/eval functions for one model (one scheme, one mode)."""

  def __init__(self, model, tx, roles, total_params: int, batch_size: int,
               eval_batch_size: int, augment_data: bool = True,
               devices: Optional[Sequence] = None, chunk_steps: int = 100,
               cpu_chunk_steps: int = 1, loop: str = "auto"):
    # All devices of all processes: with several processes (jax.distributed)
    # each feeds its local devices and pmap spans them all.
    self.device_list = list(jax.devices() if devices is None else devices)
    self.devices = len(self.device_list)
    if loop not in LOOPS:
      raise ValueError(f"loop: expected one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "auto":  # loops are slow on XLA CPU (module docstring)
      loop = "straight" if self.device_list[0].platform == "cpu" else "scan"
    self.loop = loop
    self.straight_line = loop == "straight"
    self.chunk_steps = cpu_chunk_steps if self.straight_line else chunk_steps
    self.batch = batch_size
    self.per_device = check_batch(batch_size, self.devices)
    self.eval_batch = eval_batch_size
    self.eval_per_device = check_batch(eval_batch_size, self.devices)
    self.augment = augment_data
    self.tx = tx
    self.train_step = make_train_step(model, tx, roles, total_params, AXIS)
    self.eval_step = make_eval_step(model, AXIS)
    self.traces = 0  # how often the train chunk was traced (tests read it)
    # pmap needs one mapped argument: each local device's global index
    # (`lanes`), which picks its slice of the global batch.
    self._lanes = np.asarray([i for i, d in enumerate(self.device_list)
                              if d.process_index == jax.process_index()])
    self._chunk = jax.pmap(self._train_chunk, axis_name=AXIS,
                           in_axes=(0, None, None, None, None, None),
                           out_axes=None, devices=self.device_list)
    self._eval = jax.pmap(self._eval_chunk, axis_name=AXIS,
                          in_axes=(0, None, None, None, None), out_axes=None,
                          devices=self.device_list)
    # Host-fed: one step per dispatch, each device given its own slice.
    self._fed_step = jax.pmap(self._train_fed, axis_name=AXIS,
                              in_axes=(0, None, 0, 0, None, None),
                              out_axes=None, devices=self.device_list)
    self._fed_eval = jax.pmap(self.eval_step, axis_name=AXIS,
                              in_axes=(None, None, 0, 0, 0), out_axes=None,
                              devices=self.device_list)

  # -- traced ---------------------------------------------------------------

  def _train_chunk(self, lane, state: TrainState, data: DeviceData, order: jax.Array,
                   key: jax.Array, first_step: jax.Array):
    self.traces += 1
    steps = order.shape[0] // self.batch

    def body(state, i):
      ids = jax.lax.dynamic_slice_in_dim(order, i * self.batch, self.batch)
      ids = _local_slice(ids, lane, self.per_device)
      images = data.images[ids]
      step_key = jax.random.fold_in(key, first_step + i)
      if self.augment:
        offsets, flips = augment.draw(step_key, self.batch)
        images = augment.crop_flip(images, _local_slice(offsets, lane, self.per_device),
                                   _local_slice(flips, lane, self.per_device))
      images = augment.normalize(images, data.mean, data.std)
      return self.train_step(state, images, data.labels[ids],
                             _dropout_key(step_key, lane))

    state, metrics = self._loop(body, state, steps)
    return state, jax.tree.map(jnp.sum, metrics)

  def _eval_chunk(self, lane, params, batch_stats, data: DeviceData, order):
    steps = order.shape[0] // self.eval_batch

    def body(totals, i):
      ids = jax.lax.dynamic_slice_in_dim(order, i * self.eval_batch,
                                         self.eval_batch)
      mask = ids >= 0  # -1 pads the last batch
      ids, mask = (_local_slice(ids, lane, self.eval_per_device),
                   _local_slice(mask, lane, self.eval_per_device))
      ids = jnp.maximum(ids, 0)
      images = augment.normalize(data.images[ids], data.mean, data.std)
      sums = self.eval_step(params, batch_stats, images, data.labels[ids],
                            mask.astype(jnp.float32))
      return jax.tree.map(jnp.add, totals, sums), None

    zero = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    totals, _ = self._loop(body, jax.tree.map(jnp.float32, zero), steps)
    return totals

  def _train_fed(self, lane, state: TrainState, images, labels, key, step):
    self.traces += 1
    return self.train_step(state, images, labels,
                           _dropout_key(jax.random.fold_in(key, step), lane))

  def _loop(self, body, carry, steps: int):
    """`lax.scan(body, carry, arange(steps))`, or the same as straight-line
    code (`loop="straight"`)."""
    if not self.straight_line:
      return jax.lax.scan(body, carry, jnp.arange(steps))
    outs = []
    for i in range(steps):
      carry, out = body(carry, jnp.int32(i))
      outs.append(out)
    return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)

  # -- host -----------------------------------------------------------------

  def steps_per_epoch(self, data) -> int:
    return steps_per_epoch(data, self.batch)

  def _split(self, x: np.ndarray) -> np.ndarray:
    """This process's share of a batch -> (local devices, per device, ...)."""
    return x.reshape((len(self._lanes), -1) + x.shape[1:])

  def train_epoch(self, state: TrainState, data, seed: int,
                  epoch: int, chunk_steps: Optional[int] = None
                  ) -> Iterator[Tuple[TrainState, int, Dict[str, float]]]:
    """Yields (state, steps done, summed metrics) after every chunk of
    steps; `data` is a `DeviceData` or a host-fed `Stream`."""
    # Inputs placed as the outputs come back, so call 1 and 2 share a trace.
    if jax.process_count() > 1:
      # A process cannot move its own device arrays onto other processes'
      # devices (no cross-host transfers on CPU); from host memory, each
      # process fills its own devices. Once per epoch.
      state = jax.device_get(state)
    state = jax.device_put(state, _replicated_sharding(self.device_list))
    key = epoch_key(seed, epoch)
    if isinstance(data, Stream):
      yield from self._fed_epoch(state, data, jax.random.fold_in(key, 1),
                                 epoch, chunk_steps or self.chunk_steps)
      return
    order = jax.random.permutation(jax.random.fold_in(key, 0), data.size)
    total = self.steps_per_epoch(data)
    chunk_steps = chunk_steps or self.chunk_steps
    done = 0
    while done < total:
      n = min(chunk_steps, total - done)
      chunk = order[done * self.batch:(done + n) * self.batch]
      state, sums = self._chunk(self._lanes, state, data, chunk,
                                jax.random.fold_in(key, 1), jnp.int32(done))
      done += n
      yield state, n, sums

  def _fed_epoch(self, state, data: Stream, key, epoch: int, chunk_steps: int):
    """The host-fed epoch: a dispatch per batch, metrics summed on device
    and handed back every `chunk_steps` steps (so reading them waits for
    the accelerator only that often)."""
    sums, n, done = None, 0, 0
    for batch in data.train(epoch):
      state, metrics = self._fed_step(
          self._lanes, state, self._split(batch["images"]),
          self._split(batch["labels"]), key, jnp.int32(done + n))
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      n += 1
      if n == chunk_steps:
        yield state, n, sums
        done, sums, n = done + n, None, 0
    if n:
      yield state, n, sums

  def _fed_evaluate(self, state: TrainState, data: Stream):
    return [self._fed_eval(state.params, state.batch_stats,
                           self._split(b["images"]), self._split(b["labels"]),
                           self._split(b["mask"].astype(np.float32)))
            for b in data.test()]

  def evaluate(self, state: TrainState, data,
               chunk_steps: Optional[int] = None) -> Dict[str, float]:
    """Test loss and accuracy over the whole set (the last batch padded);
    `chunk_steps` batches per dispatch, default below."""
    totals = (self._fed_evaluate(state, data) if isinstance(data, Stream)
              else self._device_evaluate(state, data, chunk_steps))
    totals = jax.device_get(jax.tree.map(lambda *t: sum(t), *totals))
    return {"test_loss": float(totals["loss"] / totals["count"]),
            "test_accuracy": float(totals["correct"] / totals["count"])}

  def _device_evaluate(self, state: TrainState, data: DeviceData,
                       chunk_steps: Optional[int] = None):
    steps = -(-data.size // self.eval_batch)
    # Default: the whole set in one dispatch, except straight-line: chunks of
    # equal length, so one compile serves them all.
    if chunk_steps is None:
      chunk_steps = self.chunk_steps if self.straight_line else steps
    per_call = min(steps, chunk_steps)
    calls = -(-steps // per_call)
    order = np.arange(calls * per_call * self.eval_batch)
    order[data.size:] = -1
    order = order.reshape(calls, -1)
    return [self._eval(self._lanes, state.params, state.batch_stats, data,
                       chunk) for chunk in order]

