"""A model's constructor fields as JSON, so that a run can rebuild the model
in a new process (a checkpoint, an exported file).

Besides JSON values, a field may hold what Flax models commonly hold, each
written as a tagged object:
- a class or a function importable by its path (`block_cls=ResNetBlock`,
  `act=nn.relu`): {"__import__": "package.module:Name"};
- a `functools.partial` of such (`conv=partial(nn.Conv, use_bias=False)`):
  {"__partial__": <its function>, "args": [...], "keywords": {...}};
- a dtype (`dtype=jnp.bfloat16`): {"__dtype__": "bfloat16"}.

What none of these can write (a lambda, a class defined inside a function,
an object) is "live": the model object is kept in the process that made
the config (`hold` / `held`), so a run resumes wherever the config is made
again from the object, and elsewhere (the command line, a packed file) fails
with one line that names the field. Two live models of one class with the
same JSON fields share one entry: the one made last is used.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np


class Unencodable(ValueError):
  """A value no JSON form can hold; the message says what it is."""


def _import_path(obj) -> Optional[str]:
  module, name = getattr(obj, "__module__", None), getattr(
      obj, "__qualname__", None)
  if not module or not name or "<" in name:
    return None
  try:
    found = resolve_path(f"{module}:{name}")
  except ValueError:
    return None
  return f"{module}:{name}" if found is obj else None


def encode(value: Any) -> Any:
  """The JSON form of a field's value (module doc); Unencodable if none."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [encode(v) for v in value]
  if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
    return {k: encode(v) for k, v in value.items()}
  if isinstance(value, functools.partial):
    return {"__partial__": encode(value.func),
            "args": [encode(a) for a in value.args],
            "keywords": {k: encode(v) for k, v in value.keywords.items()}}
  if isinstance(value, np.dtype):
    return {"__dtype__": value.name}
  if callable(value):
    path = _import_path(value)
    if path is not None:
      return {"__import__": path}
  raise Unencodable(f"{value!r} is not importable by a path")


def decode(value: Any) -> Any:
  if isinstance(value, list):
    return [decode(v) for v in value]
  if not isinstance(value, dict):
    return value
  if "__import__" in value:
    return resolve_path(value["__import__"])
  if "__partial__" in value:
    return functools.partial(decode(value["__partial__"]),
                             *decode(value["args"]),
                             **decode(value["keywords"]))
  if "__dtype__" in value:
    return np.dtype(value["__dtype__"])
  return {k: decode(v) for k, v in value.items()}


def encode_fields(fields: Mapping[str, Any]) -> Tuple[Dict[str, Any],
                                                      List[str]]:
  """(JSON form of the fields that have one, names of the live ones)."""
  out, live = {}, []
  for name, value in fields.items():
    try:
      out[name] = encode(value)
    except Unencodable:
      live.append(name)
  return out, live


def resolve_path(path: str):
  """'package.module:Name' -> the object (loaded modules are looked up
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


# Models whose config has live fields, by that config (this process only).
_HELD: Dict[str, Any] = {}


def _key(cfg: Mapping[str, Any]) -> str:
  return json.dumps({k: cfg.get(k) for k in ("module", "kwargs", "live")},
                    sort_keys=True)


def hold(cfg: Mapping[str, Any], model: Any) -> None:
  _HELD[_key(cfg)] = model


def held(cfg: Mapping[str, Any]) -> Any:
  """The model object kept for a config with live fields, or a one-line
  ValueError that names them."""
  model = _HELD.get(_key(cfg))
  if model is None:
    live = cfg.get("live") or []
    what = ("the nnx.Module instance" if live == ["instance"] else
            f"model.kwargs.{live[0]}")
    raise ValueError(
        f"{what} of {cfg.get('module')} has no JSON form, so this model "
        f"exists only in the process that made it; to resume or load it in "
        f"a new process, give the field an importable value (a module-level "
        f"class or function, a partial of one) or, for NNX, the class with "
        f"JSON constructor kwargs")
  return model
