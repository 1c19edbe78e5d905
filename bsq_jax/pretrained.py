"""Start from PyTorch weights: state_dicts of numpy arrays -> Flax variables.

`load_torch_resnet` takes the pytorch-classification CIFAR ResNet that the
paper's release trains (names like ``layer2.0.downsample.0.weight``). torch
itself is needed only to read a ``.pth`` file (`read_torch_checkpoint`), and is
imported there, lazily.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bsq_jax import layers
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant, freeze_scheme

# Flax leaf name -> PyTorch parameter / buffer name.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
         "mean": "running_mean", "var": "running_var"}


def cifar_torch_name(path: Tuple[str, ...]) -> str:
  """('layer2_0', 'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
  parts = []
  for part in path[:-1]:
    part = re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", part)
    part = {"downsample_conv": "downsample.0",
            "downsample_bn": "downsample.1"}.get(part, part)
    parts.append(part)
  return ".".join(parts + [_LEAF[path[-1]]])


def torch_to_flax_array(value: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO for convolutions, (out, in) -> (in, out) for dense."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return value


def load_state_dict(model, state_dict: Mapping[str, Any], sample_input,
                    torch_name: Callable[[Tuple[str, ...]], str]) -> Dict:
  """Fills `model`'s float variables from a state_dict, checking every key.

  Raises ValueError naming the first missing, misshapen or unexpected key.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_input))
  used = set()

  def fill(path, leaf):
    name = torch_name(tuple(k.key for k in path[1:]))
    if name not in state_dict:
      raise ValueError(f"state_dict: missing key {name!r} "
                       f"(expected shape for {'/'.join(k.key for k in path)}: "
                       f"{leaf.shape})")
    value = torch_to_flax_array(np.asarray(state_dict[name]))
    if value.shape != leaf.shape:
      raise ValueError(f"state_dict: key {name!r} has shape "
                       f"{np.shape(state_dict[name])}, which does not fit "
                       f"{leaf.shape} for this model")
    used.add(name)
    return jnp.asarray(value)

  variables = jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(shapes))
  extra = sorted(k for k in state_dict
                 if k not in used and not k.endswith("num_batches_tracked"))
  if extra:
    raise ValueError(f"state_dict: unexpected keys for this model: {extra[:5]}")
  return variables


def load_torch_resnet(state_dict: Mapping[str, Any], depth: int,
                      num_classes: int, act_bits: int,
                      weight_bits: Optional[int] = None):
  """A CIFAR ResNet and its variables from a PyTorch state_dict.

  weight_bits=None keeps float weights; an int converts every quantized layer
  to bit planes of that precision (spec section 3). Returns (model, variables)
  with `model.apply(variables, x_nhwc, train=False)` giving the logits.
  """
  from bsq_jax.models import build_model  # pylint: disable=import-outside-toplevel
  model = build_model({"name": "cifar_resnet", "depth": depth,
                       "num_classes": num_classes, "act_bits": act_bits})
  return _load_torch_model(model, state_dict,
                           jnp.zeros((1, 32, 32, 3), jnp.float32), weight_bits)


def read_torch_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """Reads a state_dict into numpy arrays keyed by PyTorch's names.

  A `.npz` (``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``)
  needs nothing else; a `.pth` needs torch (not a requirement), and is loaded
  with ``weights_only=True``.
  """
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k.removeprefix("module."): f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: expected a .npz of arrays keyed by PyTorch "
                       f"parameter names ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from e
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch: pip install torch "
                      f"(CPU build is enough), or save the state_dict as "
                      f".npz") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
  # DataParallel checkpoints prefix every key with 'module.'.
  return {k.removeprefix("module."): v.detach().cpu().numpy()
          for k, v in obj.items() if hasattr(v, "detach")}


# --------------------------------------------------------------------------
# Shared by the CIFAR ResNet and torchvision's ImageNet models.


def _load_torch_model(model, state_dict: Mapping[str, Any], sample_input,
                      weight_bits: Optional[int]):
  """(model, variables) for `model` filled from a PyTorch state_dict.

  Torch names come from the Flax path (`cifar_torch_name`). A PACT clip
  (act_bits <= 3) has no torch counterpart and starts at its initial value.
  weight_bits=None keeps float weights; an int converts every quantized
  tensor to bit planes of that precision (spec section 3).
  """
  no_acts = dataclasses.replace(model.rules, acts=())
  variables = load_state_dict(model.clone(rules=no_acts), state_dict,
                              sample_input, cifar_torch_name)
  if model.rules.has_pact:  # add the PACT clips, at their initial value
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               sample_input))["params"]
    loaded = flax.traverse_util.flatten_dict(variables["params"])
    alpha = jnp.float32(layers.PACT_INIT)
    variables = dict(variables, params=flax.traverse_util.unflatten_dict({
        k: loaded[k] if k[-1] != "pact_alpha" else alpha
        for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))}))
  if weight_bits is None:
    return model, variables
  scheme = sch.uniform_scheme(model, sample_input, weight_bits)
  variables = dict(variables,
                   params=sch.float_to_bsq(variables["params"], scheme))
  return model.clone(quant=Quant("bsq", freeze_scheme(scheme))), variables


def _num_classes(state_dict: Mapping[str, Any]) -> int:
  if "fc.weight" not in state_dict:
    raise ValueError("state_dict: missing key 'fc.weight'")
  return int(np.shape(state_dict["fc.weight"])[0])


def load_torchvision_resnet50(state_dict: Mapping[str, Any], act_bits: int,
                              weight_bits: Optional[int] = None,
                              quantize_shortcut: bool = True):
  """torchvision's ResNet-50 (`resnet50().state_dict()`, numpy values).

  The number of classes is read off ``fc.weight``. Returns (model, variables)
  with `model.apply(variables, x_nhwc, train=False)` giving the logits; see
  `load_torch_resnet` for weight_bits.
  """
  from bsq_jax.models import imagenet_resnet  # pylint: disable=import-outside-toplevel
  model = imagenet_resnet.from_config(
      {"act_bits": act_bits, "num_classes": _num_classes(state_dict),
       "quantize_shortcut": quantize_shortcut}, Quant(), None)
  x = jnp.zeros((1, 224, 224, 3), jnp.float32)
  return _load_torch_model(model, state_dict, x, weight_bits)


def load_torchvision_inception_v3(state_dict: Mapping[str, Any],
                                  act_bits: int,
                                  weight_bits: Optional[int] = None,
                                  aux_logits: bool = True,
                                  transform_input: bool = True):
  """torchvision's Inception-V3 (`inception_v3().state_dict()`, numpy values).

  aux_logits=False drops the auxiliary head (its ``AuxLogits.*`` keys, if
  present, are ignored). transform_input=True matches torchvision's pretrained
  weights, which set it (a model made with weights=None does not). Returns
  (model, variables) as `load_torchvision_resnet50`.
  """
  from bsq_jax.models import inception_v3  # pylint: disable=import-outside-toplevel
  if not aux_logits:
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith("AuxLogits.")}
  model = inception_v3.from_config(
      {"act_bits": act_bits, "num_classes": _num_classes(state_dict),
       "aux_logits": aux_logits, "transform_input": transform_input},
      Quant(), None)
  x = jnp.zeros((1, 299, 299, 3), jnp.float32)
  return _load_torch_model(model, state_dict, x, weight_bits)


def load_for_model_config(state_dict: Mapping[str, Any],
                          model_cfg: Mapping[str, Any]):
  """(model, float variables) of the model that `model_cfg` builds (any
  family of `bsq_jax.models`), from a PyTorch state_dict in its layout."""
  from bsq_jax.models import build_model, input_shape  # pylint: disable=import-outside-toplevel
  if not model_cfg.get("aux_logits", True):  # Inception without its aux head
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith("AuxLogits.")}
  model = build_model(model_cfg)
  sample = jnp.zeros((1,) + input_shape(model_cfg), jnp.float32)
  return _load_torch_model(model, state_dict, sample, None)
