"""BSQ on an unchanged Flax model: the params tree holds bit planes, the
model sees float weights.

    model = QuantizedModel(MyNet(), Rules(bias=True, acts=[ActRule("act.*")]))
    variables = model.init(key, x)                       # float, as MyNet's
    bsq = model.clone(quant=Quant("bsq", scheme))        # planes per scheme

`QuantizedModel` has the `init` / `apply` / `clone` of a linen Module, so
the pipeline (steps, trainers, checkpoints, export) takes it wherever it took
a module. Its params tree is the model's own, with every parameter that the
rules select (`Rules.select`) stored in the mode's form: a `BitPlanes`
(bsq), a `Levels` (finetune) or the float array (float). On the way in,
`apply` turns each into the weight it stands for (`bitplanes.weight`,
`level_weight`, with their straight-through gradients) and calls the model's
own `apply` with float params. Gradients come back in the stored form, so
the optimizer, the penalty and the host pass see planes, as the spec wants.

Three things reach inside the model at call time, through one
`nn.intercept_methods` interceptor:
- the activation rules quantize the activations of the modules they match
  (`layers.quantize_output`; a PACT clip becomes a param of that module);
- BatchNorm layers without an `axis_name` reduce their batch statistics over
  the devices while training, so results do not depend on the device count;
- `nn.Conv` layers that use XLA's own convolution get `conv.conv_general_dilated`
  (the fast CPU kernel gradient; the same op elsewhere).

Why a transform of the params tree rather than `nn.map_variables` around the
model: the stored form and the float form differ only at the selected
leaves, and a tree map over those is the whole of it. It needs no lifted
transform, keeps every parameter path as the model names it (checkpoints and
exported files of the earlier built-in models load unchanged), and works the
same for an NNX model through `flax.nnx.bridge.ToLinen` (`from_nnx`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsq_jax import bitplanes as bp
from bsq_jax import conv
from bsq_jax import layers
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant
from bsq_jax.rules import RuleError, Rules

# Names a model's __call__ may give its training flag; "deterministic" is
# the inverse (Flax's Dropout and attention use it).
_TRAIN_ARGS = ("train", "training", "is_training")


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a model holds: its float params (shape structs, by path in
  jax's sorted tree order) and the class of every module, by path."""
  params: Dict[str, Any]
  owners: Dict[str, type]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
  """An unchanged Flax linen model, with BSQ's storage for what `rules`
  select, in the mode and scheme of `quant`."""
  model: nn.Module
  rules: Rules = Rules()
  quant: Quant = Quant()
  axis_name: Optional[str] = None

  def clone(self, **changes) -> "QuantizedModel":
    return dataclasses.replace(self, **changes)

  # -- what is quantized ------------------------------------------------------

  def layout(self, *args, **kwargs) -> Layout:
    """The float model's params and module classes, traced, not computed."""
    owners: Dict[str, type] = {}
    shapes = jax.eval_shape(lambda: self._float_init(
        jax.random.key(0), args, kwargs, False, owners))
    return Layout(dict(sch.walk(shapes.get("params", {}))), owners)

  def quantized_names(self, *args, **kwargs) -> Tuple[str, ...]:
    """Paths of the parameters the rules quantize (RuleError if none)."""
    return self._select(self.layout(*args, **kwargs))

  def _select(self, layout: Layout) -> Tuple[str, ...]:
    self.rules.check_acts(layout.owners)
    return self.rules.select(layout.params, layout.owners)

  # -- init and apply ---------------------------------------------------------

  def init(self, rngs, *args, train: bool = False, **kwargs):
    """The model's variables, the selected params in `quant.mode`'s form."""
    owners: Dict[str, type] = {}
    variables = self._float_init(rngs, args, kwargs, train, owners)
    # The rules are applied to this very init (its params and the modules
    # it met), so an init traces the model once.
    names = set(self._select(Layout(dict(sch.walk(variables["params"])),
                                    owners)))
    variables.setdefault("batch_stats", {})
    if self.quant.mode != "float":
      variables["params"] = sch.map_nodes(
          lambda p, v: self._stored(p, v) if p in names else v,
          variables["params"])
    return variables

  def apply(self, variables, *args, train: bool = False, mutable=False,
            rngs=None, **kwargs):
    """The model's apply, on float weights rebuilt from the stored form."""
    variables = dict(variables)
    variables["params"] = sch.map_nodes(self._used, variables["params"])
    if not variables.get("batch_stats"):
      variables.pop("batch_stats", None)
    with nn.intercept_methods(self._interceptor(train)):
      out = self.model.apply(variables, *args, mutable=mutable, rngs=rngs,
                             **self._call_kwargs(train, kwargs))
    if mutable is False:
      return out
    out, updates = out
    updates = dict(updates)
    if "batch_stats" in (mutable if not isinstance(mutable, bool) else ()):
      updates.setdefault("batch_stats", {})
    return out, updates

  def _float_init(self, rngs, args, kwargs, train: bool,
                  owners: Dict[str, type]) -> Dict[str, Any]:
    """The model's own init; fills `owners` with the modules it met."""
    with nn.intercept_methods(self._interceptor(False, owners)):
      variables = dict(self.model.init(rngs, *args,
                                       **self._call_kwargs(train, kwargs)))
    owners.update(_nnx_owners(self.model))
    return variables

  # -- the stored form --------------------------------------------------------

  def _stored(self, path: str, w: jax.Array):
    """A freshly initialized float tensor in the mode's form (traceable)."""
    if self.quant.mode == "bsq":
      return bp.encode(w, self.quant.bits(path), jnp)
    s = jnp.max(jnp.abs(w))
    return bp.Levels(c=w / jnp.where(s > 0, s, 1.0), scale=s)

  def _used(self, path: str, node):
    """The float weight a stored tensor stands for (section 2)."""
    if isinstance(node, bp.BitPlanes):
      n = self.quant.bits(path) if self.quant.mode == "bsq" else node.bits
      if node.bits != n:
        raise ValueError(f"{path}: planes have shape {node.pos.shape}, the "
                         f"scheme expects {node.pos.shape[:-1] + (n,)}")
      return bp.weight(node)
    if isinstance(node, bp.Levels):
      return bp.level_weight(node, self.quant.bits(path))
    return node

  # -- reaching into the model at call time -----------------------------------

  def _interceptor(self, train: bool, record: Optional[Dict] = None):
    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = "/".join(module.path)
      if record is not None:
        record.setdefault(path, type(module))
      _adapt(module, train, self.axis_name)
      rule = self.rules.act_rule(path)
      if rule is None:
        return next_fun(*args, **kwargs)
      if rule.clip == "relu":  # in the ReLU's place, on its input
        return layers.quantize_output(module, args[0], rule.bits, "relu",
                                      self.axis_name)
      return layers.quantize_output(module, next_fun(*args, **kwargs),
                                    rule.bits, "none", self.axis_name)
    return intercept

  def _call_kwargs(self, train: bool, kwargs: Mapping) -> Dict[str, Any]:
    """`kwargs` plus the training flag, under the name the model takes."""
    params = _call_params(self.model)
    out = dict(kwargs)
    for name in _TRAIN_ARGS:
      if name in params:
        out[name] = train
        return out
    if "deterministic" in params:
      out["deterministic"] = not train
    return out


def _adapt(module: nn.Module, train: bool, axis_name: Optional[str]) -> None:
  """Fields set on the bound module for this call only (see module doc)."""
  if (train and axis_name is not None and isinstance(module, nn.BatchNorm)
      and module.axis_name is None):
    object.__setattr__(module, "axis_name", axis_name)
  if (isinstance(module, nn.Conv) and module.conv_general_dilated is None
      and module.conv_general_dilated_cls is None):
    object.__setattr__(module, "conv_general_dilated",
                       conv.conv_general_dilated)


def _call_params(model) -> Tuple[str, ...]:
  """Argument names of the model's __call__ (a bridged NNX model's own)."""
  cls = getattr(model, "nnx_class", type(model))
  try:
    return tuple(inspect.signature(cls.__call__).parameters)
  except (TypeError, ValueError):
    return ()


# --------------------------------------------------------------------------
# Flax NNX, through the bridge.


def from_nnx(nnx_class, *args, rules: Rules = Rules(), quant: Quant = Quant(),
             **kwargs) -> QuantizedModel:
  """An `nnx.Module` class and its constructor arguments (without `rngs`),
  as a QuantizedModel. Weight rules work as for linen; activation rules
  cannot reach inside an NNX module (no interceptor there), so they are
  refused."""
  from flax.nnx import bridge  # pylint: disable=import-outside-toplevel
  if rules.acts:
    raise RuleError("activation rules: an NNX model cannot be intercepted "
                    "at call time; quantize its weights only (no acts)")
  return QuantizedModel(bridge.ToLinen(nnx_class, args=args,
                                       kwargs=dict(kwargs)), rules, quant)


def _nnx_owners(model) -> Dict[str, type]:
  """Module classes inside a bridged NNX model, as their linen equivalents
  (the rules' LINEAR_LAYERS), by path."""
  if not hasattr(model, "nnx_class"):
    return {}
  from flax import nnx  # pylint: disable=import-outside-toplevel
  same = {nnx.Conv: nn.Conv, nnx.ConvTranspose: nn.ConvTranspose,
          nnx.Linear: nn.Dense, nnx.LinearGeneral: nn.DenseGeneral,
          nnx.Einsum: nn.Einsum}
  abstract = nnx.eval_shape(lambda: model.nnx_class(
      *model.args, rngs=nnx.Rngs(0), **dict(model.kwargs)))
  out = {}
  for path, node in nnx.iter_graph(abstract):
    if isinstance(node, nnx.Module):
      out["/".join(str(p) for p in path)] = same.get(type(node), type(node))
  return out
