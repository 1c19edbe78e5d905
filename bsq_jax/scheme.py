"""Model-level views of the quantized tensors: roles, scheme, host pass,
conversions between modes, and compression accounting (spec sections 6, 9, 10).

A params tree holds each quantized tensor as one node: a `BitPlanes` (bsq
mode), a `Levels` (finetune mode) or a plain array (float mode). The node's
path, joined by "/", is its name in the scheme ("layer1_0/conv1/kernel").
Which nodes are quantized is read off the model once (`quantized_names`), and
which leaves get clipping is decided once (`roles`); nothing matches names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import jax
import numpy as np

from bsq_jax import bitplanes as bp

Params = Dict[str, Any]
Scheme = Dict[str, int]
QUANT_NODES = (bp.BitPlanes, bp.Levels)

# Leaf roles: what the optimizer may do to a leaf.
PLANE, LEVEL, SCALE, FLOAT = "plane", "level", "scale", "float"


def _is_node(x) -> bool:
  return isinstance(x, QUANT_NODES)


def walk(params: Params, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[str, Any]]:
  """Yields (path, node) for every quantized node and float array, in order."""
  for key in params:
    value = params[key]
    path = prefix + (key,)
    if isinstance(value, Mapping):
      yield from walk(value, path)
    else:
      yield "/".join(path), value


def quantized(params: Params) -> Iterator[Tuple[str, Any]]:
  """(path, node) for the BitPlanes / Levels nodes of a params tree."""
  return ((p, v) for p, v in walk(params) if _is_node(v))


def map_nodes(fn: Callable[[str, Any], Any], params: Params,
              prefix: Tuple[str, ...] = ()) -> Params:
  """Rebuilds `params` with node -> fn(path, node) for every node and array."""
  out = {}
  for key in params:
    value, path = params[key], prefix + (key,)
    out[key] = (map_nodes(fn, value, path) if isinstance(value, Mapping)
                else fn("/".join(path), value))
  return out


def roles(params: Params) -> Params:
  """A tree like `params` whose leaves say PLANE, LEVEL, SCALE or FLOAT."""
  def role(_, node):
    if isinstance(node, bp.BitPlanes):
      return bp.BitPlanes(PLANE, PLANE, SCALE)
    if isinstance(node, bp.Levels):
      return bp.Levels(LEVEL, SCALE)
    return FLOAT
  return map_nodes(role, params)


def scheme_of(params: Params) -> Scheme:
  """Precision per quantized tensor of bsq params: their planes' last axis."""
  return {p: int(v.pos.shape[-1]) for p, v in quantized(params)
          if isinstance(v, bp.BitPlanes)}


def sizes_of(params: Params) -> Dict[str, int]:
  """m, the number of weights, of every quantized tensor (any mode)."""
  def size(v):
    shape = v.pos.shape[:-1] if isinstance(v, bp.BitPlanes) else np.shape(v.c)
    return int(np.prod(shape))
  return {p: size(v) for p, v in quantized(params)}


def quantized_names(model, sample_input) -> Tuple[str, ...]:
  """Paths of the tensors a `QuantizedModel` quantizes (its rules' choice)."""
  return model.quantized_names(sample_input)


def uniform_scheme(model, sample_input, bits: int) -> Scheme:
  return {name: bits for name in quantized_names(model, sample_input)}


# --------------------------------------------------------------------------
# Host pass and conversions.


def _host(node):
  return type(node)(*(np.asarray(x) for x in node))


def requantize_params(params: Params, max_bits: int = 8) -> Tuple[Params, Scheme]:
  """Section 6 on every layer. The caller resets momentum and recompiles."""
  new = map_nodes(lambda _, v: bp.requantize(_host(v), max_bits)
                  if isinstance(v, bp.BitPlanes) else v, params)
  return new, scheme_of(new)


def float_to_bsq(params: Params, scheme: Mapping[str, int]) -> Params:
  """Encodes the float tensors that `scheme` names at its precisions."""
  missing = set(scheme) - {p for p, _ in walk(params)}
  if missing:
    raise KeyError(f"float params lack the quantized tensors {sorted(missing)}")
  return map_nodes(lambda p, v: bp.encode(v, scheme[p]) if p in scheme else v,
                   params)


def _finetune_bits(v: bp.BitPlanes) -> int:
  """A bsq tensor's precision in finetuning: a 1-bit tensor with no bit set
  is all zero and becomes 0 bits (spec section 10, step 5)."""
  if v.bits == 1 and not np.any(bp.unscaled(_host(v), np)):
    return 0
  return v.bits


def bsq_to_finetune(params: Params) -> Tuple[Params, Scheme]:
  """c from the planes (clipped to [-1, 1]); 1-bit all-zero tensors -> 0 bits."""
  scheme = {}
  def convert(path, v):
    if not isinstance(v, bp.BitPlanes):
      return v
    v = _host(v)
    scheme[path] = _finetune_bits(v)
    c = np.clip(bp.unscaled(v, np), -1.0, 1.0).astype(np.float32)
    return bp.Levels(c=c, scale=v.scale)
  return map_nodes(convert, params), scheme


def finetune_scheme(params: Params) -> Scheme:
  """The scheme `bsq_to_finetune` gives bsq params, without converting them
  (only the 1-bit tensors are read)."""
  return {p: _finetune_bits(v) for p, v in quantized(params)
          if isinstance(v, bp.BitPlanes)}


def zero_tensors(scheme: Mapping[str, int]) -> Tuple[str, ...]:
  """The tensors a scheme holds at 0 bits: all zero, nothing stored."""
  return tuple(k for k, n in scheme.items() if n == 0)


def finetune_to_bsq(params: Params, scheme: Mapping[str, int]) -> Params:
  """Writes finetuned c back as binary planes, keeping the scale."""
  return map_nodes(lambda p, v: bp.encode_levels(np.asarray(v.c), scheme[p],
                                                 np.asarray(v.scale))
                   if isinstance(v, bp.Levels) else v, params)


def used_weights(params: Params, scheme: Mapping[str, int] | None = None
                 ) -> Dict[str, jax.Array]:
  """The weight each quantized tensor contributes to the forward pass."""
  out = {}
  for path, v in quantized(params):
    out[path] = (bp.weight(v) if isinstance(v, bp.BitPlanes)
                 else bp.level_weight(v, scheme[path]))
  return out


# --------------------------------------------------------------------------
# Accounting (section 9).


@dataclasses.dataclass(frozen=True)
class Accounting:
  bits: Dict[str, int]   # precision per quantized tensor
  sizes: Dict[str, int]  # m per quantized tensor

  @property
  def total_params(self) -> int:   # TP
    return sum(self.sizes.values())

  @property
  def total_bits(self) -> int:     # TB
    return sum(self.sizes[k] * self.bits[k] for k in self.sizes)

  @property
  def average_bits(self) -> float:
    return self.total_bits / self.total_params

  @property
  def compression(self) -> float:
    return 32.0 * self.total_params / max(self.total_bits, 1)


def account(params: Params, scheme: Mapping[str, int] | None = None) -> Accounting:
  """Accounting for bsq params (scheme read off the planes) or finetune params."""
  sizes = sizes_of(params)
  bits = dict(scheme) if scheme is not None else scheme_of(params)
  if set(bits) != set(sizes):
    raise ValueError(f"scheme and params disagree on layers: "
                     f"{sorted(set(bits) ^ set(sizes))}")
  return Accounting(bits=bits, sizes=sizes)


def bit_density(params: Params) -> Dict[str, np.ndarray]:
  """Fraction of nonzero entries of pos - neg in each bit plane, MSB first."""
  out = {}
  for path, v in quantized(params):
    if isinstance(v, bp.BitPlanes):
      diff = np.asarray(v.pos) - np.asarray(v.neg)
      axes = tuple(range(diff.ndim - 1))
      out[path] = np.mean(diff != 0, axis=axes) if diff.shape[-1] else np.zeros(0)
  return out
