"""Any Flax model as a model config: the "flax" family of `bsq_jax.models`.

A checkpoint or an exported file stores the model config and rebuilds the
network from it, so a user's model is named, not pickled:

    model.name        "flax"
    model.module      "my_package.nets:MyNet" (import path : class name)
    model.kwargs      the class's constructor fields (JSON values)
    model.nnx         True for an `nnx.Module` class (weight rules only)
    model.input_shape (H, W, C) of one image
    model.num_classes must match the data set
    model.rules       what BSQ quantizes: {"weights": [[pattern, quantize],
                      ...], "acts": [[pattern, bits, clip], ...], "bias": bool}
                      (`bsq_jax.rules.from_config`; empty: every kernel)

`model_config(MyNet(width=8), (32, 32, 1), 10, Rules(bias=True))` writes it
from a module instance. The class must be importable by that path (a class
defined in `__main__` or a test file counts while that module is loaded).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn

from bsq_jax import rules as rules_lib
from bsq_jax.layers import Quant
from bsq_jax.quantize import QuantizedModel, from_nnx

FIELDS = ("name", "module", "kwargs", "nnx", "input_shape", "num_classes",
          "rules")


def resolve(path: str):
  """'package.module:Class' -> the class (loaded modules are looked up
  first, so a class of `__main__` or of a test file resolves)."""
  if not isinstance(path, str) or path.count(":") != 1:
    raise ValueError(f"model.module: expected 'package.module:Class', got "
                     f"{path!r}")
  module_name, _, attr = path.partition(":")
  try:
    module = (sys.modules.get(module_name)
              or importlib.import_module(module_name))
  except ImportError as e:
    raise ValueError(f"model.module: cannot import {module_name!r} ({e})"
                     ) from None
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"model.module: {module_name!r} has no {attr!r}")
    obj = getattr(obj, part)
  return obj


def from_config(cfg: Mapping[str, Any], quant: Quant,
                axis_name: Optional[str]) -> QuantizedModel:
  unknown = set(cfg) - set(FIELDS)
  if unknown:
    raise ValueError(f"model: unknown fields {sorted(unknown)} for a 'flax' "
                     f"model; expected {', '.join(FIELDS)}")
  cls = resolve(cfg.get("module"))
  kwargs = dict(cfg.get("kwargs") or {})
  rules = rules_lib.from_config(cfg.get("rules") or {})
  if cfg.get("nnx", False):
    return dataclasses.replace(from_nnx(cls, rules=rules, quant=quant,
                                        **kwargs), axis_name=axis_name)
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise ValueError(f"model.module: {cfg['module']} is not a flax.linen "
                     f"Module class (set model.nnx=True for an nnx.Module)")
  try:
    model = cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"model.kwargs: {e}") from None
  return QuantizedModel(model, rules, quant, axis_name)


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
                 nnx_kwargs: Optional[Mapping[str, Any]] = None
                 ) -> Dict[str, Any]:
  """The model config of a linen module instance (its class and fields),
  or of an nnx.Module class with its constructor kwargs (`nnx_kwargs`)."""
  if nnx_kwargs is not None:
    cls, kwargs, nnx = model, dict(nnx_kwargs), True
  else:
    cls, nnx = type(model), False
    kwargs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name") and
              getattr(model, f.name) != f.default}
  try:
    json.dumps(kwargs)
  except TypeError as e:
    raise ValueError(f"model.kwargs: the fields of {cls.__name__} must be "
                     f"JSON values to be stored with the run ({e})") from None
  return {"name": "flax", "module": f"{cls.__module__}:{cls.__qualname__}",
          "kwargs": kwargs, "nnx": nnx, "input_shape": list(input_shape),
          "num_classes": num_classes, "rules": rules_config(rules)}
