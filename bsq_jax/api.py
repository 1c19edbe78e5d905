"""BSQ in your own training loop: the pieces, as `bsq_jax` exports them.

    qmodel = bsq_jax.quantize_model(model, bsq_jax.Rules())  # linen or NNX
    variables = qmodel.init(key, x)            # selected kernels as 8-bit planes
    tx = optax.chain(bsq_jax.bit_lasso(alpha, bsq_jax.account(params).total_params),
                     optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))
    ...  # your step: qmodel.apply(...), tx.update, optax.apply_updates,
    ...  # then bsq_jax.project(params) keeps planes in [0, 2]
    params, opt_state, scheme = bsq_jax.host_pass(params, tx, opt_state)
    ft_params, scheme = bsq_jax.to_finetune(params)   # the fixed scheme
    ft_model = qmodel.finetune(scheme)
    bsq_jax.save("model.bsq", ft_model, {"params": ..., ...}, x)
    model, variables = bsq_jax.load("model.bsq")      # or a run's workdir

The pipeline (`bsq_jax.train`) is built from the same pieces: its steps
call `QuantizedModel.apply`, its chain is `bit_lasso` + coupled decay +
momentum (`optim.make_optimizer`), its host pass is `host_pass` with all
momentum reset (the paper's `reset="all"`), its clipping is `project`'s
and its finetuning starts from `to_finetune`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from bsq_jax import optim
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.nnx_model import NNXModel
from bsq_jax.quantize import QuantizedModel
from bsq_jax.rules import Rules

RESETS = ("changed", "all")


def quantize_model(model, rules: Rules = Rules(), *, bits: int = 8,
                   scale_grad: str = "lsq",
                   axis_name: Optional[str] = None) -> QuantizedModel:
  """A linen module or an nnx.Module, unchanged, with the parameters that
  `rules` select held as `bits`-bit planes. Its `init` gives those planes
  (an NNX module's own current weights, encoded); its `apply` takes planes
  of any precision, so a host pass needs no new model."""
  if isinstance(model, nnx.Module):
    model = NNXModel.of(model)
  elif not isinstance(model, nn.Module):
    raise TypeError(f"model: expected a flax.linen Module or an nnx.Module "
                    f"instance, got {type(model).__name__}")
  if not 1 <= bits <= 8:
    raise ValueError(f"bits: expected 1..8, got {bits}")
  return QuantizedModel(model, rules, Quant("bsq", None, bits), axis_name,
                        scale_grad)


def project(params):
  """Planes clipped into [0, 2], finetune levels into [-1, 1]; apply after
  `optax.apply_updates`, as `optax.projections` are."""
  return optim.project(params, sch.roles(params))


def clip_planes() -> optax.GradientTransformation:
  """`project` as the last transform of a chain, for loops that only call
  `optax.apply_updates`: the update lands each plane inside its box (up to
  float rounding of p + (clip(p + u) - p))."""
  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("clip_planes needs params in update()")
    clipped = project(optax.apply_updates(params, updates))
    return jax.tree.map(lambda c, p: c - p, clipped, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class HostPass(NamedTuple):
  params: Any
  opt_state: Any
  scheme: sch.Scheme


def host_pass(params, tx: Optional[optax.GradientTransformation] = None,
              opt_state=None, max_bits: int = 8,
              reset: str = "changed") -> HostPass:
  """Between epochs: every bsq tensor re-quantized, all-zero planes dropped
  and precisions adjusted (at most `max_bits`); returns the new params, the
  optimizer state for them and the scheme (path -> bits).

  reset "changed": optimizer state is made anew where a shape changed and
  kept elsewhere; "all": made anew everywhere (the paper's pipeline).
  Without `tx` the optimizer state is None."""
  if reset not in RESETS:
    raise ValueError(f"reset: expected one of {RESETS}, got {reset!r}")
  new, scheme = sch.requantize_params(jax.device_get(params), max_bits)
  if tx is None:
    return HostPass(new, None, scheme)
  fresh = tx.init(new)
  if reset == "changed" and opt_state is not None:
    fresh = jax.tree.map(
        lambda old, made: old if np.shape(old) == np.shape(made) else made,
        opt_state, fresh)
  return HostPass(new, fresh, scheme)


def to_finetune(params) -> Tuple[Any, sch.Scheme]:
  """bsq params -> (finetune params, scheme): each tensor's levels as float
  c at its fixed precision (1-bit all-zero tensors at 0 bits)."""
  return sch.bsq_to_finetune(jax.device_get(params))


def _model_config(model: QuantizedModel, sample) -> dict:
  """The config that rebuilds `model` (the "flax" family) for a file."""
  from bsq_jax.models.any_flax import model_config  # pylint: disable=import-outside-toplevel
  inner = model.model
  floating = model.clone(quant=Quant("float"))
  out = jax.eval_shape(lambda x: floating.apply(
      floating.init(jax.random.key(0), x), x), sample)
  num_classes = int(out.shape[-1])
  shape = tuple(np.shape(sample)[1:])
  if isinstance(inner, NNXModel):
    if inner.instance is not None:
      return model_config(inner.instance, shape, num_classes, model.rules,
                          scale_grad=model.scale_grad)
    return model_config(inner.cls, shape, num_classes, model.rules,
                        nnx_kwargs=dict(inner.kwargs),
                        scale_grad=model.scale_grad)
  return model_config(inner, shape, num_classes, model.rules,
                      scale_grad=model.scale_grad)


def save(path: str, model: QuantizedModel, variables: Mapping[str, Any],
         sample):
  """Writes the packed model file (each tensor bit-packed at its precision);
  returns its `ExportStats`. `variables` in bsq form (planes) or finetune
  form (`model` then holds the scheme); `sample`: an input batch."""
  from bsq_jax.export import export_model  # pylint: disable=import-outside-toplevel
  planes = bool(sch.scheme_of(variables["params"]))  # any BitPlanes
  mode = "bsq" if planes else "finetune"
  scheme = None if planes else model.quant.scheme
  variables = {"batch_stats": {}, **jax.device_get(dict(variables))}
  return export_model(path, _model_config(model, sample), mode,
                      None if scheme is None else dict(scheme), variables)


def load(source: str, stage: Optional[str] = None, mode: str = "finetune"
         ) -> Tuple[QuantizedModel, dict]:
  """(model, variables) from a packed file (in `mode`: "finetune" levels or
  "bsq" planes) or a run's workdir (its `stage` in that stage's own mode,
  by default the last finished of finetune, bsq); `model.apply(variables,
  x)` gives the trained network's logits."""
  if os.path.isdir(source):
    from bsq_jax import checkpoint  # pylint: disable=import-outside-toplevel
    from bsq_jax.models import build_model  # pylint: disable=import-outside-toplevel
    result = checkpoint.load_result(source, stage)
    model = build_model(result.model_config,
                        Quant(result.mode, freeze_scheme(result.scheme)))
    return model, jax.device_get(result.variables)
  from bsq_jax.packed_loader import load_model  # pylint: disable=import-outside-toplevel
  return load_model(source, mode)
