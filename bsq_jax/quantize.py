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
same for an NNX module through `bsq_jax.nnx_model.NNXModel` (`from_nnx`).
An NNX module has no interceptor; its adapter sets BatchNorm's axis and
the convolution itself, and activation rules are refused for it.

`scale_grad` "lsq" (the default) scales the gradient of every quantized
tensor's scale by 1/sqrt(m K(n)) (`bitplanes.lsq_factor`): without it a
large layer's one scale diverges at ordinary learning rates. The paper's
built-in models keep the authors' "none".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsq_jax import bitplanes as bp
from bsq_jax import conv
from bsq_jax import layers
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.nnx_model import NNXModel, call_kwargs, signature_of
from bsq_jax.rules import RuleError, Rules

# How a quantized tensor's scale is trained: "lsq" scales its gradient by
# 1/sqrt(m K(n)) (`bitplanes.lsq_factor`), the default for any model;
# "none" is the authors' release, which the paper's built-in models keep.
SCALE_GRADS = ("lsq", "none")


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a model holds: its float params (shape structs, by path in
  jax's sorted tree order) and the class of every module, by path."""
  params: Dict[str, Any]
  owners: Dict[str, type]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
  """An unchanged Flax model (a linen module, or an NNX module through
  `NNXModel`), with BSQ's storage for what `rules` select, in the mode and
  scheme of `quant`."""
  model: Any
  rules: Rules = Rules()
  quant: Quant = Quant()
  axis_name: Optional[str] = None
  scale_grad: str = "lsq"

  def __post_init__(self):
    if self.scale_grad not in SCALE_GRADS:
      raise ValueError(f"scale_grad: expected one of {SCALE_GRADS}, got "
                       f"{self.scale_grad!r}")
    if isinstance(self.model, NNXModel) and self.rules.acts:
      raise RuleError("activation rules: an NNX module's calls cannot be "
                      "intercepted as linen's are; quantize its weights only "
                      "(no acts), or write the model in linen")

  def clone(self, **changes) -> "QuantizedModel":
    return dataclasses.replace(self, **changes)

  def finetune(self, scheme) -> "QuantizedModel":
    """This model in finetune mode at the fixed `scheme` (path -> bits)."""
    return self.clone(quant=Quant("finetune", freeze_scheme(scheme)))

  def encode(self, params, *args, **kwargs):
    """Float params of the model (trained ones, say) with the selected
    tensors as planes at `quant.default_bits`; the inputs as for `init`."""
    names = self.quantized_names(*args, **kwargs)
    return sch.float_to_bsq(jax.device_get(params),
                            {n: self.quant.default_bits for n in names})

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
    if isinstance(self.model, NNXModel):
      out = self.model.apply(variables, *args, train=train, mutable=mutable,
                             rngs=rngs, axis_name=self.axis_name, **kwargs)
    else:
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
    if isinstance(self.model, NNXModel):
      owners.update(self.model.owners())
      return dict(self.model.init(rngs, *args, **kwargs))
    with nn.intercept_methods(self._interceptor(False, owners)):
      return dict(self.model.init(rngs, *args,
                                  **self._call_kwargs(train, kwargs)))

  # -- the stored form --------------------------------------------------------

  def _stored(self, path: str, w: jax.Array):
    """A freshly initialized float tensor in the mode's form (traceable)."""
    if self.quant.mode == "bsq":
      return bp.encode(w, self.quant.bits(path), jnp)
    s = jnp.max(jnp.abs(w))
    return bp.Levels(c=w / jnp.where(s > 0, s, 1.0), scale=s)

  def _used(self, path: str, node):
    """The float weight a stored tensor stands for (section 2). In bsq
    mode without a scheme, planes of any precision are taken as they are."""
    if isinstance(node, bp.BitPlanes):
      n = (self.quant.bits(path) if self.quant.mode == "bsq" and
           self.quant.scheme is not None else node.bits)
      if node.bits != n:
        raise ValueError(f"{path}: planes have shape {node.pos.shape}, the "
                         f"scheme expects {node.pos.shape[:-1] + (n,)}")
      return bp.weight(self._scale_grad(node, node.pos.shape[:-1], n))
    if isinstance(node, bp.Levels):
      n = self.quant.bits(path)
      return bp.level_weight(self._scale_grad(node, jnp.shape(node.c), n), n)
    return node

  def _scale_grad(self, node, shape, n: int):
    """`node` with LSQ's gradient scale on its scale (`bitplanes.lsq_factor`)
    where `scale_grad` asks for it."""
    if self.scale_grad == "none" or n == 0:
      return node
    factor = bp.lsq_factor(int(np.prod(shape)), n)
    return node._replace(scale=bp.scale_gradient(node.scale, factor))

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
    return call_kwargs(signature_of(type(self.model).__call__), train, kwargs)


def _adapt(module: nn.Module, train: bool, axis_name: Optional[str]) -> None:
  """Fields set on the bound module for this call only (see module doc)."""
  if (train and axis_name is not None and isinstance(module, nn.BatchNorm)
      and module.axis_name is None):
    object.__setattr__(module, "axis_name", axis_name)
  if (isinstance(module, nn.Conv) and module.conv_general_dilated is None
      and module.conv_general_dilated_cls is None):
    object.__setattr__(module, "conv_general_dilated",
                       conv.conv_general_dilated)


def from_nnx(nnx_class, *args, rules: Rules = Rules(), quant: Quant = Quant(),
             **kwargs) -> QuantizedModel:
  """An `nnx.Module` class and its constructor arguments (without `rngs`),
  as a QuantizedModel (`bsq_jax.nnx_model`)."""
  return QuantizedModel(NNXModel(nnx_class, args, dict(kwargs)), rules, quant)
