"""Model families: plain Flax models, each with the rules that say what BSQ
quantizes in it (`bsq_jax.rules`).

`build_model(model_cfg, quant, axis_name)` is the one place a model is made
from its config, so a checkpoint or an exported file that stores the model
config can rebuild the same network. It returns a
`bsq_jax.quantize.QuantizedModel`: the plain model, its rules and `quant`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bsq_jax.layers import Quant
from bsq_jax.models import any_flax, cifar_resnet, imagenet_resnet, inception_v3
from bsq_jax.quantize import QuantizedModel


def _cifar_resnet(cfg: Mapping[str, Any], quant: Quant,
                  axis_name: Optional[str]):
  cifar_resnet.check_depth(cfg["depth"])
  model = cifar_resnet.CifarResNet(depth=cfg["depth"],
                                   num_classes=cfg["num_classes"],
                                   width=cfg.get("width", 16))
  rules = cifar_resnet.rules(cfg["act_bits"],
                             cfg.get("quantize_shortcut", False))
  return QuantizedModel(model, rules, quant, axis_name, scale_grad="none")


# name -> (constructor, input shape (H, W, C) without the batch axis)
FAMILIES: Dict[str, Tuple[Callable, Callable[[Mapping], Tuple[int, ...]]]] = {
    "cifar_resnet": (_cifar_resnet,
                     lambda cfg: (cfg.get("image_size", 32),) * 2 +
                     (cfg.get("channels", 3),)),
    # ImageNet, torchvision's layouts; fields in each module's from_config.
    "resnet50": (imagenet_resnet.from_config,
                 imagenet_resnet.config_input_shape),
    "inception_v3": (inception_v3.from_config,
                     inception_v3.config_input_shape),
    # Any Flax model, by import path (bsq_jax/models/any_flax.py).
    "flax": (any_flax.from_config, any_flax.config_input_shape),
}


def _family(cfg: Mapping[str, Any]):
  name = cfg["name"]
  if name not in FAMILIES:
    raise ValueError(f"model.name: expected one of {sorted(FAMILIES)}, "
                     f"got {name!r}")
  return FAMILIES[name]


def build_model(cfg: Mapping[str, Any], quant: Quant = Quant(),
                axis_name: Optional[str] = None):
  """The Flax module for model config `cfg` in the given quantization mode."""
  return _family(cfg)[0](cfg, quant, axis_name)


def input_shape(cfg: Mapping[str, Any]) -> Tuple[int, ...]:
  """(H, W, C) of one input image for this model config."""
  return tuple(_family(cfg)[1](cfg))


# Initialization runs once, so it is compiled for compile speed: at XLA's
# default optimization level the CPU backend spends about 12 s on the
# threefry-heavy initializers of a ResNet-8, at level 0 about 2.5 s.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True}


def init_variables(model, key, sample) -> Dict[str, Any]:
  """`model.init(key, sample)`, compiled once at a low optimization level."""
  init = jax.jit(model.init).lower(key, sample).compile(
      compiler_options=_INIT_COMPILER_OPTIONS)
  return init(key, sample)


def _nbytes(tree) -> int:
  return int(sum(np.prod(l.shape) * np.dtype(l.dtype).itemsize
                 for l in jax.tree.leaves(tree)))


def memory_bytes(model_cfg: Mapping[str, Any], mode: str,
                 bits: int = 8) -> Dict[str, int]:
  """Bytes a model config holds per replica in `mode`, from shapes only.

  bsq mode counts every quantized tensor at `bits` bits (two float32 planes
  per bit and weight), as right after the 8-bit conversion. Returns
  ``params``, ``grads`` (same as params), ``momentum`` (SGD's trace buffer:
  one per param leaf), ``batch_stats`` and ``total`` (their sum). Activations
  and XLA temporaries are not included.
  """
  model = build_model(model_cfg, Quant(mode, None, bits))
  x = jax.ShapeDtypeStruct((1,) + input_shape(model_cfg), jnp.float32)
  shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v), x)
  params = _nbytes(shapes["params"])
  stats = _nbytes(shapes.get("batch_stats", {}))
  out = {"params": params, "grads": params, "momentum": params,
         "batch_stats": stats}
  out["total"] = sum(out.values())
  return out
