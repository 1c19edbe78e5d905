"""Checks a run config before anything touches the workdir.

Every problem raises `ConfigError` with one line that names the field and
what is expected; main.py prints it and exits non-zero.
"""

from __future__ import annotations

from typing import Any, Mapping

from bsq_jax import budget

# Activation precisions the quantizer takes (spec section 7); 32 is float.
ACT_BITS = "1..16 or 32 (float)"


def act_bits_ok(bits: int) -> bool:
  return bits == 32 or 1 <= bits <= 16


STAGES = ("pretrain", "convert", "bsq", "finetune", "scratch", "uniform",
          "hawq")
SCHEDULES = ("pretrain", "bsq", "finetune")


class ConfigError(ValueError):
  """A config value that cannot run."""


def stages_of(config: Mapping[str, Any]) -> tuple:
  names = tuple(s.strip() for s in str(config["stages"]).split(",") if s.strip())
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ConfigError(f"config.stages: unknown stage(s) {unknown or names}; "
                      f"expected a comma-separated subset of {', '.join(STAGES)}")
  return names


def _number(config, path: str, kind=float, lo=None, hi=None, lo_open=False):
  node = config
  for part in path.split("."):
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, (int, float) if kind is float
                                              else int):
    raise ConfigError(f"config.{path}: expected {kind.__name__}, got "
                      f"{node!r} ({type(node).__name__})")
  if lo is not None and (node <= lo if lo_open else node < lo):
    raise ConfigError(f"config.{path}: expected {'>' if lo_open else '>='} "
                      f"{lo}, got {node}")
  if hi is not None and node > hi:
    raise ConfigError(f"config.{path}: expected <= {hi}, got {node}")
  return node


def check(config: Mapping[str, Any]) -> None:
  """Raises ConfigError for the first value that cannot run."""
  stages = stages_of(config)
  if "hawq" in stages and "hawq" not in config:
    raise ConfigError("config.hawq: missing (probes, batches); the hawq "
                      "stage needs them (see configs/cifar_resnet20.py)")
  if "hawq" in config:
    _number(config, "hawq.probes", int, 1)
    _number(config, "hawq.batches", int, 1)
  _number(config, "seed", int, 0)
  _number(config, "batch_size", int, 1)
  _number(config, "eval_batch_size", int, 1)
  _number(config, "chunk_steps", int, 1)
  _number(config, "cpu_chunk_steps", int, 1)
  _number(config, "eval_every", int, 1)
  if config["model"]["name"] == "cifar_resnet":
    depth = _number(config, "model.depth", int, 8)
    if (depth - 2) % 6:
      raise ConfigError(f"config.model.depth: expected 6k+2 (20, 32, 44, 56, "
                        f"110), got {depth}")
  _number(config, "model.num_classes", int, 2)
  if config["model"]["name"] != "flax":  # a "flax" model's acts are rules
    act = _number(config, "model.act_bits", int, 1)
    if not act_bits_ok(act):
      raise ConfigError(f"config.model.act_bits: expected {ACT_BITS}, "
                        f"got {act}")
  _number(config, "convert.bits", int, 1, 16)
  for name in SCHEDULES:
    _number(config, f"{name}.epochs", int, 0)
    _number(config, f"{name}.lr", float, 0.0, lo_open=True)
    _number(config, f"{name}.weight_decay", float, 0.0)
    _number(config, f"{name}.momentum", float, 0.0, 1.0)
    milestones = config[name]["lr_milestones"]
    if not all(isinstance(m, int) and m >= 0 for m in milestones):
      raise ConfigError(f"config.{name}.lr_milestones: expected epochs as "
                        f"non-negative ints, got {milestones!r}")
  _number(config, "bsq.requant_interval", int, 1)
  _number(config, "bsq.max_bits", int, 1, 16)
  if config["bsq"]["alpha"] is not None:
    _number(config, "bsq.alpha", float, 0.0)
  _number(config, "bsq.default_alpha", float, 0.0)
  _number(config, "bsq.target_bits", float, 0.0)
  _number(config, "bsq.target_kbytes", float, 0.0)
  try:
    budget.check_budget_fields(config["bsq"]["alpha"] is not None,
                               config["bsq"]["target_bits"] or None,
                               config["bsq"]["target_kbytes"] or None,
                               config["bsq"]["max_bits"])
  except ValueError as e:
    raise ConfigError(f"config.{e}") from e
