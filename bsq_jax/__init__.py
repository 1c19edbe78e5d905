"""bsq-jax: BSQ mixed-precision quantization (ICLR 2021) in JAX/Flax.

The public API, for your own model and training loop (bsq_jax/api.py and
docs/library.md):

    quantize_model(model, rules) a linen or NNX model with its selected
                                 weights as bit planes: init / apply
    Rules, WeightRule, ActRule   what is quantized (regexes, first match wins)
    bit_lasso(alpha, tp)         the bit-level group Lasso, an optax transform
    project(params)              plane clipping after apply_updates
    clip_planes()                the same as the last transform of a chain
    host_pass(params, tx, state) re-quantize between epochs, new scheme
    to_finetune(params)          the fixed-scheme form; model.finetune(scheme)
    account(params, scheme)      average bits, compression
    save(path, model, v, x)      the packed file; load(file or workdir)
    pipeline_config()            every field of a pipeline run (the paper's)
    model_config(model, ...)     your model in a pipeline config
    train_and_evaluate(config, workdir)  the whole pipeline

Names are imported on first use, so that `import bsq_jax.packed_format`
(numpy alone) does not start JAX. No name here is also a module's, so
`bsq_jax.<name>` is the same whatever was imported before.
"""

import importlib

_EXPORTS = {
    "quantize_model": "bsq_jax.api", "bit_lasso": "bsq_jax.optim",
    "project": "bsq_jax.api", "clip_planes": "bsq_jax.api",
    "host_pass": "bsq_jax.api", "HostPass": "bsq_jax.api",
    "to_finetune": "bsq_jax.api", "account": "bsq_jax.scheme",
    "save": "bsq_jax.api", "load": "bsq_jax.api",
    "Rules": "bsq_jax.rules", "WeightRule": "bsq_jax.rules",
    "ActRule": "bsq_jax.rules", "RuleError": "bsq_jax.rules",
    "QuantizedModel": "bsq_jax.quantize",
    "BitPlanes": "bsq_jax.bitplanes", "Levels": "bsq_jax.bitplanes",
    "model_config": "bsq_jax.models.any_flax",
    "train_and_evaluate": "bsq_jax.train",
    "pipeline_config": "bsq_jax.defaults",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'bsq_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
