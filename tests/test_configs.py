"""Every config builds and passes the config checks."""

import glob
import importlib
import os

import pytest

from bsq_jax import config_check

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob("configs/*.py")
               if not p.endswith("__init__.py"))


@pytest.mark.parametrize("name", NAMES)
def test_config_is_valid(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_check.check(config)
  if config.model.name == "cifar_resnet":
    assert config.model.depth in (8, 20, 32, 44, 56, 110)
  elif config.model.name == "flax":  # a plain Flax model, by import path
    from bsq_jax.models import build_model, input_shape  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    model = build_model(config.model.to_dict())
    assert model.quantized_names(
        jnp.zeros((1,) + input_shape(config.model.to_dict())))
  else:  # ImageNet: the paper's alphas, 4-bit activations, batch 256
    assert config.bsq.default_alpha == {"resnet50": 5e-3,
                                        "inception_v3": 2e-2}[config.model.name]
    assert (config.model.act_bits, config.batch_size) == (4, 256)
    assert config.data.name == "imagenet2012"
    assert (config.bsq.momentum, config.bsq.weight_decay) == (0.9, 1e-4)


def test_paper_schedule():
  from configs import cifar_resnet20
  c = cifar_resnet20.get_config()
  assert (c.pretrain.epochs, c.bsq.epochs, c.finetune.epochs) == (350, 350, 300)
  assert c.bsq.requant_interval == 100 and c.model.act_bits == 4
  assert c.bsq.alpha is None and c.bsq.default_alpha == 5e-3
  assert c.convert.bits == 8 and c.batch_size == 128


@pytest.mark.parametrize("field,value,message", [
    ("bsq.alpha", -1.0, "bsq.alpha: expected >= 0"),
    ("model.depth", 21, "6k\\+2"),
    ("model.act_bits", 20, "act_bits"),
    ("convert.bits", 17, "convert.bits"),
    ("bsq.requant_interval", 0, "requant_interval"),
    ("pretrain.lr", 0.0, "pretrain.lr"),
    ("bsq.epochs", -1, "bsq.epochs"),
    ("stages", "pretrain,train", "unknown stage"),
    ("bsq.target_bits", 3.0, "not both"),  # with the explicit alpha below
])
def test_bad_values_name_the_field(field, value, message):
  from configs import cifar_resnet20
  c = cifar_resnet20.get_config()
  c.bsq.alpha = 0.01
  node = c
  *path, leaf = field.split(".")
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(c)
