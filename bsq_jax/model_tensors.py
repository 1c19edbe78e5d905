"""A trained model's tensors as a packed file holds them, in network order.

Between a Flax model's variables and the packed file (`bsq_jax.packed_format`)
stand three questions, answered here: which tensors the model has and in what
order it creates them (`model_layout`), whether given variables are that
model's (`check_layout`, and the scheme against the params), and what integer
levels each quantized tensor's weights are (`tensor_levels`). Export writes
what `model_tensors` returns, inspect reports it, and the loader checks the
model it rebuilds with the same layout, so the three cannot disagree.

What is stored is exactly what the trained network used (spec section 2):
for a tensor of precision n >= 1 the signed integer level

    q = sign(x) * round(|x| * K(n)),  x = clip(c, -1, 1),  K(n) = 2**n - 1,

where c is the unscaled weight of the BSQ planes (bsq mode) or the finetuned
`Levels.c` (finetune mode), together with the float32 scale s, so that the
weight is  w = s * q / K(n). The levels are read off the very
`bitplanes.quantize_ste` code the network trains with, and
`packed_loader.load_model` feeds q back through it, so the rebuilt model's
weights and logits equal the trained network's bit for bit.

JAX, Flax and the models are imported inside the functions, so that
`bsq_jax.inspect_model` reads a packed file with numpy alone.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bsq_jax.packed_format import (Entry, ExportError, PackedTensor,
                                   zero_tensor)

EXPORT_MODES = ("bsq", "finetune")


@functools.lru_cache(maxsize=None)
def _levels_fn():
  """One jitted Q_n(clip(c)) over all tensors: the same code as bp.weight
  (BitPlanes) and bp.level_weight (Levels), without the scale."""
  import jax
  from bsq_jax import bitplanes as bp

  def levels(nodes, bits):
    return [bp.quantize_ste(bp.unscaled(v) if isinstance(v, bp.BitPlanes)
                            else v.c, n) for v, n in zip(nodes, bits)]
  return jax.jit(levels, static_argnums=1)


def _check_node(path: str, node: Any, bits: int) -> Tuple[int, ...]:
  from bsq_jax import bitplanes as bp
  if not 0 <= bits <= 16:
    raise ExportError(f"{path}: precision {bits} out of range 0..16")
  if isinstance(node, bp.BitPlanes):
    if node.bits != bits:
      raise ExportError(f"{path}: planes hold {node.bits} bits, the scheme "
                        f"says {bits}")
    return tuple(np.shape(node.pos)[:-1])
  if isinstance(node, bp.Levels):
    return tuple(np.shape(node.c))
  raise ExportError(f"{path}: expected BitPlanes or Levels, got "
                    f"{type(node).__name__}")


def tensor_levels(items: Sequence[Tuple[str, Any, int]]) -> List[PackedTensor]:
  """Integer levels of (path, BitPlanes / Levels node, precision) triples.

  q is read off `bitplanes.quantize_ste`'s output (q / K), computed the way
  the network computes it, so it is what the network rounds to.
  """
  from bsq_jax import bitplanes as bp
  shapes = [_check_node(p, v, n) for p, v, n in items]
  live = [(p, v, n) for p, v, n in items if n > 0]
  host = [type(v)(*(np.asarray(x, np.float32) for x in v)) for _, v, _ in live]
  out = _levels_fn()(host, tuple(n for _, _, n in live)) if live else []
  by_path = {p: np.asarray(r) for (p, _, _), r in zip(live, out)}
  tensors = []
  for (path, node, bits), shape in zip(items, shapes):
    scale = np.float32(np.asarray(node.scale, np.float32))
    if bits == 0:
      tensors.append(zero_tensor(path, shape, scale))
      continue
    r = by_path[path]
    if not np.all(np.isfinite(r)):
      raise ExportError(f"{path}: non-finite weights cannot be packed")
    mag = np.rint(np.abs(r.astype(np.float64)) * bp.steps(bits))
    tensors.append(PackedTensor(path, shape, bits, scale, np.signbit(r),
                                mag.astype(np.uint16)))
  return tensors


def _check_scheme(mode: str, scheme: Optional[Mapping[str, int]],
                  params: Mapping[str, Any]) -> Dict[str, int]:
  from bsq_jax import bitplanes as bp
  from bsq_jax import scheme as sch
  if mode not in EXPORT_MODES:
    raise ExportError(f"mode: expected one of {EXPORT_MODES}, got {mode!r}")
  nodes = dict(sch.quantized(params))
  kind = bp.BitPlanes if mode == "bsq" else bp.Levels
  if any(not isinstance(v, kind) for v in nodes.values()):
    raise ExportError(f"{mode} mode: expected {kind.__name__} nodes, found "
                      f"{sorted({type(v).__name__ for v in nodes.values()})}")
  if mode == "bsq":
    found = sch.scheme_of(params)
    if scheme is not None and dict(scheme) != found:
      diff = sorted(k for k in set(found) | set(scheme)
                    if found.get(k) != scheme.get(k))
      raise ExportError(f"scheme disagrees with the planes' precisions on "
                        f"{diff}")
    scheme = found
  elif scheme is None:
    raise ExportError("finetune mode needs the scheme (Levels do not hold "
                      "their precision)")
  if set(scheme) != set(nodes):
    raise ExportError(f"scheme and params disagree on layers "
                      f"{sorted(set(scheme) ^ set(nodes))}")
  return {k: int(v) for k, v in scheme.items()}


def model_layout(model_cfg: Mapping[str, Any], mode: str,
                 scheme: Optional[Mapping[str, int]]):
  """(model, abstract variables, [(collection, path)] in network order).

  The order is the order the model creates its variables in, which is the
  order of the layers in the network (jax's trees sort dict keys instead).
  """
  import jax
  import jax.numpy as jnp
  from bsq_jax import scheme as sch
  from bsq_jax.layers import Quant
  from bsq_jax.models import build_model, input_shape
  try:
    model = build_model(model_cfg, Quant(mode, scheme))
    sample = jnp.zeros((1,) + tuple(input_shape(model_cfg)), jnp.float32)
    order: List[Tuple[str, str]] = []

    def init():
      v = model.init(jax.random.key(0), sample, train=False)
      order.extend((c, p) for c in v for p, _ in sch.walk(v[c]))
      return v
    abstract = jax.eval_shape(init)
  except (KeyError, ValueError, TypeError) as e:
    raise ExportError(f"cannot build the model of config {dict(model_cfg)}: "
                      f"{str(e).splitlines()[0] if str(e) else e!r}") from None
  return model, abstract, order


def _shapes(variables: Mapping[str, Any], collections) -> Dict[str, Any]:
  from bsq_jax import scheme as sch
  out = {}
  for c in collections:
    for p, v in sch.walk(variables.get(c, {})):
      out[f"{c}/{p}"] = ((type(v).__name__,) + tuple(
          tuple(np.shape(x)) for x in v) if isinstance(v, sch.QUANT_NODES)
                         else tuple(np.shape(v)))
  return out


def check_layout(variables: Mapping[str, Any], abstract: Mapping[str, Any]
                 ) -> None:
  """Raises ExportError unless `variables` has the model's tensors and shapes
  (collections the model does not declare are ignored)."""
  got, want = _shapes(variables, abstract), _shapes(abstract, abstract)
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    first = "; ".join(f"{k}: {got.get(k, 'missing')} vs {want.get(k, 'none')}"
                      for k in diff[:3])
    raise ExportError(f"tensors do not match the model the config builds "
                      f"(given vs expected): {first}{more}")


def model_tensors(model_cfg: Mapping[str, Any], mode: str,
                  scheme: Optional[Mapping[str, int]],
                  variables: Mapping[str, Any]
                  ) -> Tuple[Dict[str, int], List[Entry]]:
  """What export writes and inspect reports, in network order.

  Checks `variables` against the model `model_cfg` builds in `mode`; returns
  the scheme and (collection, path, PackedTensor | float32 array) entries.
  """
  from bsq_jax import scheme as sch
  scheme = _check_scheme(mode, scheme, variables["params"])
  _, abstract, order = model_layout(model_cfg, mode, scheme)
  check_layout(variables, abstract)
  leaves = {c: dict(sch.walk(variables[c])) for c in abstract}
  quantized = [(p, leaves[c][p], scheme[p]) for c, p in order
               if c == "params" and p in scheme]
  levels = {t.path: t for t in tensor_levels(quantized)}
  entries = []
  for c, p in order:
    if c == "params" and p in scheme:
      entries.append((c, p, levels[p]))
      continue
    arr = np.asarray(leaves[c][p])
    if not np.issubdtype(arr.dtype, np.floating):
      raise ExportError(f"{c}/{p}: expected a float array, got {arr.dtype}")
    entries.append((c, p, arr.astype(np.float32)))
  return scheme, entries
