"""A Flax NNX module driven functionally: the `init` / `apply` of a linen
module, so that `QuantizedModel`, the steps and the pipeline take it as
they take a linen model.

An NNX module holds its own state. This adapter splits it once
(`nnx.split`) into a graph and three parts: `nnx.Param` (the "params"
collection), `nnx.BatchStat` ("batch_stats") and the rest (its `nnx.Rngs`,
caches), and merges them again in every `apply`. The model stays as its
author wrote it:
- `model.train()` / `model.eval()`: each sets static attributes (Dropout's
  `deterministic`, BatchNorm's `use_running_average`), so the adapter keeps
  one graph per mode, made from a copy, and `apply(train=...)` picks one;
- dropout keys: a `rngs` argument of `__call__` gets `nnx.Rngs(dropout=key)`
  from `apply`'s `rngs`; every stream the module holds itself is reseeded
  from the same key, so every step and device draws its own masks;
- a `train` / `deterministic` argument of `__call__` is set as for linen;
- while training over devices (`axis_name`), BatchNorm layers without an
  axis reduce their statistics over the devices, and plain `nnx.Conv`
  layers get `bsq_jax.conv`'s convolution, as linen layers do.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
from flax import nnx

from bsq_jax import conv

# Names a model's __call__ may give its training flag; "deterministic" is
# the inverse (Flax's Dropout and attention use it).
TRAIN_ARGS = ("train", "training", "is_training")

# NNX layers whose kernel and bias can be held as bit planes, as the linen
# layers the rules know (`rules.LINEAR_LAYERS`).
_SAME_AS_LINEN = {nnx.Conv: nn.Conv, nnx.ConvTranspose: nn.ConvTranspose,
                  nnx.Linear: nn.Dense, nnx.LinearGeneral: nn.DenseGeneral,
                  nnx.Einsum: nn.Einsum}


def call_kwargs(call_params: Tuple[str, ...], train: bool,
                kwargs: Mapping) -> Dict[str, Any]:
  """`kwargs` plus the training flag, under the name the model's call takes."""
  out = dict(kwargs)
  for name in TRAIN_ARGS:
    if name in call_params:
      out[name] = train
      return out
  if "deterministic" in call_params:
    out["deterministic"] = not train
  return out


def signature_of(fn) -> Tuple[str, ...]:
  try:
    return tuple(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return ()


def rngs_for(key) -> nnx.Rngs:
  """The Rngs an NNX model is built with: a default stream and the params
  and dropout streams that Flax's layers ask for by name."""
  keys = jax.random.split(key, 3)
  return nnx.Rngs(keys[0], params=keys[1], dropout=keys[2])


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
  """An nnx.Module class with its constructor arguments (built with
  `rngs=` at `init`), or a module instance as the user made it (`init`
  returns its own params)."""
  cls: type
  args: Tuple[Any, ...] = ()
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  instance: Optional[nnx.Module] = None
  _cache: Dict[Any, Any] = dataclasses.field(default_factory=dict,
                                             repr=False)

  @classmethod
  def of(cls, module: nnx.Module) -> "NNXModel":
    return cls(type(module), instance=module)

  def _build(self, key) -> nnx.Module:
    if self.instance is not None:
      return self.instance
    return self.cls(*self.args, rngs=rngs_for(key), **dict(self.kwargs))

  def _parts(self):
    """(graph, params, batch_stats, rest) of a private copy, made once."""
    if "parts" not in self._cache:
      module = (nnx.clone(self.instance) if self.instance is not None
                else self._build(jax.random.key(0)))
      self._cache["parts"] = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    return self._cache["parts"]

  def _graph(self, train: bool, axis_name: Optional[str]):
    """The graph in the mode `model.train()` / `model.eval()` set, adapted
    for devices (module doc)."""
    key = (train, axis_name)
    if key not in self._cache:
      module = nnx.merge(*self._parts())
      module.train() if train else module.eval()  # pylint: disable=expression-not-assigned
      for _, node in nnx.iter_graph(module):
        if (train and axis_name is not None and
            isinstance(node, nnx.BatchNorm) and node.axis_name is None):
          node.axis_name = axis_name
        if (isinstance(node, nnx.Conv) and
            node.conv_general_dilated is jax.lax.conv_general_dilated):
          node.conv_general_dilated = conv.conv_general_dilated
      self._cache[key] = nnx.graphdef(module)
    return self._cache[key]

  def _stream_keys(self, key) -> Dict[str, Any]:
    """A key for every random stream the module holds: "dropout" gets
    `key`, any other (a model's own `nnx.Rngs(0)` for its dropout) one
    folded from it, so that no stream repeats its draws from step to step."""
    if "streams" not in self._cache:
      keys = jax.tree.leaves(self._parts()[3],
                             is_leaf=lambda v: isinstance(v, nnx.RngKey))
      self._cache["streams"] = sorted({v.tag for v in keys
                                       if isinstance(v, nnx.RngKey)})
    return {name: key if name == "dropout" else jax.random.fold_in(key, i + 1)
            for i, name in enumerate(self._cache["streams"])}

  def owners(self) -> Dict[str, type]:
    """The class of every module by path, NNX layers as their linen
    equivalents (what the rules know)."""
    module = nnx.merge(*self._parts())
    return {"/".join(str(p) for p in path): _SAME_AS_LINEN.get(type(node),
                                                               type(node))
            for path, node in nnx.iter_graph(module)
            if isinstance(node, nnx.Module)}

  def call_params(self) -> Tuple[str, ...]:
    return signature_of(self.cls.__call__)[1:]

  # -- linen's interface ------------------------------------------------------

  def init(self, rngs, *args, **kwargs) -> Dict[str, Any]:
    """{"params", "batch_stats"} of the module (built from `rngs`' params
    key, or the instance's own values); the inputs are not needed."""
    del args, kwargs
    key = rngs["params"] if isinstance(rngs, Mapping) else rngs
    _, params, stats, _ = nnx.split(self._build(key), nnx.Param, nnx.BatchStat,
                                    ...)
    return {"params": nnx.to_pure_dict(params),
            "batch_stats": nnx.to_pure_dict(stats)}

  def apply(self, variables, *args, train: bool = False, mutable=False,
            rngs=None, axis_name: Optional[str] = None, **kwargs):
    _, params, stats, rest = self._parts()
    # Fresh variables of this trace: the templates' were made outside it.
    module = nnx.merge(self._graph(train, axis_name),
                       _filled(params, variables["params"]),
                       _filled(stats, variables.get("batch_stats") or {}),
                       _copy(rest))
    call = self.call_params()
    kwargs = call_kwargs(call, train, kwargs)
    key = (rngs or {}).get("dropout")
    if key is not None:
      nnx.reseed(module, **self._stream_keys(key))
      if "rngs" in call and train:
        kwargs["rngs"] = nnx.Rngs(dropout=key)
    out = module(*args, **kwargs)
    if mutable is False:
      return out
    return out, {"batch_stats": nnx.to_pure_dict(nnx.state(module,
                                                           nnx.BatchStat))}


def _copy(state: nnx.State) -> nnx.State:
  return jax.tree.map(lambda x: x, state)


def _filled(template: nnx.State, values: Mapping[str, Any]) -> nnx.State:
  """A copy of `template` holding `values` (a pure dict of the same paths;
  empty: the template's own)."""
  state = _copy(template)
  if values:
    nnx.replace_by_pure_dict(state, values)
  return state
