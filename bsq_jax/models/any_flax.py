"""Any Flax model as a model config: the "flax" family of `bsq_jax.models`.

A checkpoint or an exported file stores the model config and rebuilds the
network from it, so a user's model is named, not pickled:

    model.name        "flax"
    model.module      "my_package.nets:MyNet" (import path : class name)
    model.kwargs      the class's constructor fields (JSON values; classes,
                      functions, partials and dtypes as `fields` writes them)
    model.nnx         True for an `nnx.Module` (weight rules only)
    model.live        the fields with no JSON form (`fields`): the model
                      object is kept for the process that made the config
    model.input_shape (H, W, C) of one image
    model.num_classes must match the data set
    model.rules       what BSQ quantizes: {"weights": [[pattern, quantize],
                      ...], "acts": [[pattern, bits, clip], ...], "bias": bool}
                      (`bsq_jax.rules.from_config`; empty: every kernel)
    model.scale_grad  "lsq" (default) or "none": how the quantized tensors'
                      scales are trained (`bsq_jax.quantize.SCALE_GRADS`)

`model_config(MyNet(width=8), (32, 32, 1), 10, Rules(bias=True))` writes it
from a module instance. The class must be importable by that path (a class
defined in `__main__` or a test file counts while that module is loaded).
A config with live fields rebuilds the model only in a process that made
the same config (calling `model_config` again in a new process will do);
elsewhere it fails with one line that names the field.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
from flax import nnx

from bsq_jax import rules as rules_lib
from bsq_jax.layers import Quant
from bsq_jax.models import fields
from bsq_jax.nnx_model import NNXModel
from bsq_jax.quantize import QuantizedModel

FIELDS = ("name", "module", "kwargs", "nnx", "input_shape", "num_classes",
          "rules", "scale_grad", "live")


def from_config(cfg: Mapping[str, Any], quant: Quant,
                axis_name: Optional[str]) -> QuantizedModel:
  unknown = set(cfg) - set(FIELDS)
  if unknown:
    raise ValueError(f"model: unknown fields {sorted(unknown)} for a 'flax' "
                     f"model; expected {', '.join(FIELDS)}")
  rules = rules_lib.from_config(cfg.get("rules") or {})
  return QuantizedModel(_module(cfg), rules, quant, axis_name,
                        cfg.get("scale_grad", "lsq"))


def _module(cfg: Mapping[str, Any]):
  """The linen module or `NNXModel` the config names."""
  if cfg.get("live"):
    return fields.held(cfg)
  cls = fields.resolve_path(cfg.get("module"))
  kwargs = fields.decode(dict(cfg.get("kwargs") or {}))
  if cfg.get("nnx", False):
    return NNXModel(cls, (), kwargs)
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise ValueError(f"model.module: {cfg['module']} is not a flax.linen "
                     f"Module class{_hint(cls)}")
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"model.kwargs: {e}") from None


def _hint(obj) -> str:
  """What to do with a model.module that is no linen class."""
  if isinstance(obj, type) and issubclass(obj, nnx.Module):
    return " but an nnx.Module (set model.nnx=True)"
  if isinstance(obj, functools.partial):
    return (f" but a functools.partial of {obj.func.__qualname__}; name that "
            f"class and put the partial's arguments in model.kwargs, or give "
            f"model_config() the instance")
  return f" but a {type(obj).__name__}"


def config_input_shape(cfg: Mapping[str, Any]):
  shape = cfg.get("input_shape")
  if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and
          all(isinstance(v, int) and v > 0 for v in shape)):
    raise ValueError(f"model.input_shape: expected (H, W, C), got {shape!r}")
  return tuple(shape)


def rules_config(rules: rules_lib.Rules) -> Dict[str, Any]:
  """The config form of `rules` (what `rules.from_config` reads back)."""
  return {"weights": [[r.pattern, r.quantize] for r in rules.weights],
          "acts": [[r.pattern, r.bits, r.clip] for r in rules.acts],
          "bias": rules.bias}


def model_config(model, input_shape: Sequence[int], num_classes: int,
                 rules: rules_lib.Rules = rules_lib.Rules(),
                 nnx_kwargs: Optional[Mapping[str, Any]] = None,
                 scale_grad: str = "lsq") -> Dict[str, Any]:
  """The model config of a linen module instance (its class and fields), of
  an nnx.Module class with its constructor kwargs (`nnx_kwargs`), or of an
  nnx.Module instance. Fields without a JSON form (`fields`) keep the model
  for this process only."""
  if isinstance(model, nnx.Module):
    cls, kwargs, live = type(model), {}, ["instance"]
  elif nnx_kwargs is not None:
    cls, (kwargs, live) = model, fields.encode_fields(dict(nnx_kwargs))
  else:
    cls = type(model)
    kwargs, live = fields.encode_fields({
        f.name: getattr(model, f.name) for f in dataclasses.fields(model)
        if f.name not in ("parent", "name") and
        not _same(getattr(model, f.name), f.default)})
  cfg = {"name": "flax", "module": f"{cls.__module__}:{cls.__qualname__}",
         "kwargs": kwargs, "nnx": isinstance(model, nnx.Module) or
         nnx_kwargs is not None, "input_shape": list(input_shape),
         "num_classes": num_classes, "rules": rules_config(rules)}
  if scale_grad != "lsq":
    cfg["scale_grad"] = scale_grad
  if live:
    cfg["live"] = live
    fields.hold(cfg, NNXModel.of(model) if isinstance(model, nnx.Module)
                else (NNXModel(cls, (), dict(nnx_kwargs)) if nnx_kwargs
                      is not None else model))
  return cfg


def _same(value, default) -> bool:
  """Whether a field holds its default (arrays and odd types compare
  unequal rather than raise)."""
  try:
    return bool(value == default)
  except Exception:  # pylint: disable=broad-except
    return False
