"""The loader: a packed model file rebuilt as a Flax model and its variables.

`read_packed` (`bsq_jax.packed_format`) gives integer levels and float32
arrays; this module turns them back into what the network trains with, a
`Levels` (finetune) or a `BitPlanes` (bsq) per quantized tensor, builds the
model the header's config names and checks the variables against it with
the layout export used (`bsq_jax.model_tensors`). Kept apart from the format
because it needs JAX, Flax and the models, which a numpy reader does not.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from bsq_jax import bitplanes as bp
from bsq_jax.model_tensors import EXPORT_MODES, check_layout, model_layout
from bsq_jax.packed_format import ExportError, read_packed


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def load_model(path: str, mode: str = "finetune"):
  """(model, variables) of a packed file; `model.apply(variables, x,
  train=False)` gives the trained network's logits bit for bit.

  mode "finetune" (default): each quantized tensor is a `Levels` with
    c = q / K(n) in float32; `quantize_ste` rounds it back to exactly q, so
    the weights equal the trained ones bit for bit (signed zeros included).
    A fixed-scheme model, ready for inference or further finetuning.
  mode "bsq": each quantized tensor is a `BitPlanes` holding the binary
    decomposition of q (as `bitplanes.encode_levels` makes it), ready for
    further BSQ training; weights equal the trained ones as values (binary
    planes cannot make -0.0: such a weight becomes 0.0, which changes no
    sum that has a nonzero term).
  """
  if mode not in EXPORT_MODES:
    raise ValueError(f"mode: expected one of {EXPORT_MODES}, got {mode!r}")
  packed = read_packed(path)
  flat = {}
  for t in packed.header["tensors"]:
    name = f"{t['collection']}/{t['path']}"
    if t["kind"] == "float32":
      flat[name] = packed.floats[name]
      continue
    pt = packed.quantized[t["path"]]
    if mode == "finetune":
      flat[name] = bp.Levels(c=pt.unscaled(), scale=pt.scale)
    else:
      flat[name] = bp.encode_levels(pt.unscaled(), pt.bits, pt.scale)
  variables = jax.tree.map(jnp.asarray, _nest(flat))
  try:
    model, abstract, _ = model_layout(packed.model_config, mode,
                                      packed.scheme)
    check_layout(variables, abstract)
  except ExportError as e:
    raise ExportError(f"{path}: {e}") from None
  return model, variables
