"""Which parameters and activations of a Flax model BSQ quantizes.

Rules are regular expressions, matched whole (`re.fullmatch`) and tried in
order; the first rule that matches decides, as qwix's rules do.

- A `WeightRule` matches a parameter path ("layer1_0/conv1/kernel") and says
  whether that parameter is quantized. Only the kernel and bias of the
  layers in `LINEAR_LAYERS` can be; a rule that picks anything else (a norm
  scale, an embedding, an integer array) is an error, and so is a rule that
  matches no parameter at all.
- An `ActRule` matches a module path ("layer1_0/act1") and quantizes that
  module's output to `bits` bits (spec section 7).

`Rules()` is the default: every kernel of a conv or dense layer (a kernel
of another kind of layer is left in float), no bias, no activation. `Rules(bias=True)` adds the bias of every layer whose kernel is
quantized, as its own tensor with its own precision (the paper's way).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import numpy as np

from bsq_jax.config_check import ACT_BITS, act_bits_ok
from bsq_jax.layers import ReLU

# The layers whose kernel (and bias) can be held as bit planes.
LINEAR_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral,
                 nn.Einsum)
QUANTIZABLE_PARAMS = ("kernel", "bias")


class RuleError(ValueError):
  """A rule that selects nothing, or selects what cannot be quantized."""


def _compiled(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise RuleError(f"{what} {pattern!r}: not a regular expression ({e})"
                    ) from None


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """Parameters whose path fully matches `pattern`: quantized, or not."""
  pattern: str
  quantize: bool = True

  def __post_init__(self):
    _compiled(self.pattern, "weight rule")


@dataclasses.dataclass(frozen=True)
class ActRule:
  """Activations of the modules whose path fully matches `pattern`, at `bits`.

  clip "relu": the module is a `bsq_jax.layers.ReLU`, and the paper's block
  activation takes its place: ReLU6 for bits >= 4, PACT (a learnable clip)
  for bits <= 3, then the quantizer, on the module's input (spec section 7).
  clip "none": the output of any module, quantized signed as it is.
  bits=32 leaves the module as it is.
  """
  pattern: str
  bits: int = 4
  clip: str = "relu"

  def __post_init__(self):
    _compiled(self.pattern, "activation rule")
    if not act_bits_ok(self.bits):
      raise RuleError(f"activation rule {self.pattern!r}: bits expected "
                      f"{ACT_BITS}, got {self.bits!r}")
    if self.clip not in ("relu", "none"):
      raise RuleError(f"activation rule {self.pattern!r}: clip expected "
                      f"'relu' or 'none', got {self.clip!r}")


# The default: every kernel of a LINEAR_LAYERS layer (a kernel of any other
# layer is skipped, where a user's rule that picks it is an error).
DEFAULT_KERNELS = WeightRule(r"(.*/)?kernel")
DEFAULT_WEIGHTS = (DEFAULT_KERNELS,)


@dataclasses.dataclass(frozen=True)
class Rules:
  """The weight rules, the activation rules and the bias option."""
  weights: Tuple[WeightRule, ...] = DEFAULT_WEIGHTS
  acts: Tuple[ActRule, ...] = ()
  bias: bool = False

  def __post_init__(self):
    object.__setattr__(self, "weights", tuple(self.weights))
    object.__setattr__(self, "acts", tuple(self.acts))

  # -- weights ----------------------------------------------------------------

  def _weight_rule(self, path: str) -> Optional[WeightRule]:
    return next((r for r in self.weights if re.fullmatch(r.pattern, path)),
                None)

  def select(self, params: Mapping[str, np.ndarray],
             owners: Mapping[str, type]) -> Tuple[str, ...]:
    """The quantized parameter paths of a model, in the params' order.

    params: path -> array (or its shape struct), every parameter.
    owners: module path -> the module's class, for every module.
    Raises RuleError on a rule that matches no parameter, or one that picks
    a parameter that cannot be quantized.
    """
    chosen, used = [], set()
    for path, value in params.items():
      rule = self._weight_rule(path)
      if rule is None:
        continue
      used.add(rule)
      if not rule.quantize:
        continue
      why_not = _not_quantizable(path, value, owners)
      if why_not and rule is DEFAULT_KERNELS:
        continue  # the default skips what it cannot take; a rule says so
      if why_not:
        raise RuleError(f"weight rule {rule.pattern!r} matches {path}"
                        f"{why_not}")
      chosen.append(path)
    if self.bias:
      kernels = {p.rsplit("/", 1)[0] for p in chosen if p.endswith("kernel")}
      chosen += [p for p in params if p.endswith("/bias") and
                 p.rsplit("/", 1)[0] in kernels and p not in chosen]
      chosen.sort(key=list(params).index)
    for rule in self.weights:
      if rule not in used:
        raise RuleError(f"weight rule {rule.pattern!r} matches no parameter "
                        f"(closest: {_closest(rule.pattern, params)}; the "
                        f"model has {len(params)})")
    if not chosen:
      raise RuleError(f"no parameter is quantized: the weight rules "
                      f"{[r.pattern for r in self.weights]} select none of "
                      f"{_some(params)}")
    return tuple(chosen)

  # -- activations ------------------------------------------------------------

  def act_rule(self, module_path: str) -> Optional[ActRule]:
    rule = next((r for r in self.acts
                 if re.fullmatch(r.pattern, module_path)), None)
    return None if rule is None or rule.bits == 32 else rule

  def check_acts(self, owners: Mapping[str, type]) -> None:
    """Every activation rule must match a module, and a "relu" rule only
    ReLU modules."""
    for rule in self.acts:
      matched = [m for m in owners if re.fullmatch(rule.pattern, m)]
      if not matched:
        raise RuleError(f"activation rule {rule.pattern!r} matches no module "
                        f"(the model has {_some(owners)})")
      wrong = [m for m in matched if self.act_rule(m) is rule and
               rule.clip == "relu" and not issubclass(owners[m], ReLU)]
      if wrong:
        raise RuleError(f"activation rule {rule.pattern!r} (clip 'relu') "
                        f"matches {wrong[0]}, a {owners[wrong[0]].__name__}; "
                        f"it replaces bsq_jax.layers.ReLU modules only (use "
                        f"clip 'none' to quantize any module's output)")

  @property
  def has_pact(self) -> bool:
    """Whether some activation has a learnable PACT clip (bits <= 3)."""
    return any(r.clip == "relu" and r.bits <= 3 for r in self.acts)


def _not_quantizable(path: str, value, owners: Mapping[str, type]
                     ) -> Optional[str]:
  """Why the parameter at `path` cannot be quantized (the end of a message
  that names it), or None."""
  module, _, name = path.rpartition("/")
  owner = owners.get(module)
  if not np.issubdtype(np.dtype(value.dtype), np.floating):
    return (f", a {np.dtype(value.dtype)} array; only float parameters can "
            f"be quantized")
  if owner is None or not issubclass(owner, LINEAR_LAYERS):
    kind = owner.__name__ if owner is not None else "unknown"
    return (f", a parameter of a {kind} layer; only the kernel and bias of "
            f"{', '.join(c.__name__ for c in LINEAR_LAYERS)} layers can be "
            f"quantized")
  if name not in QUANTIZABLE_PARAMS:
    return "; only a layer's kernel and bias can be quantized"
  return None


def _some(names: Sequence[str], limit: int = 6) -> str:
  names = list(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _closest(pattern: str, names: Sequence[str], count: int = 3) -> str:
  """The names most like a pattern that matched none of them."""
  return ", ".join(difflib.get_close_matches(pattern, list(names), count,
                                             cutoff=0.0))


def from_config(cfg: Mapping) -> Rules:
  """Rules from a model config's `rules` field: a dict with `weights`
  ([pattern, quantize] pairs), `acts` ([pattern, bits(, clip)]) and `bias`."""
  cfg = dict(cfg or {})
  unknown = set(cfg) - {"weights", "acts", "bias"}
  if unknown:
    raise RuleError(f"model.rules: unknown fields {sorted(unknown)}; "
                    f"expected weights, acts, bias")
  weights = tuple(WeightRule(*_as_tuple(r)) for r in cfg.get("weights", ())
                  ) or DEFAULT_WEIGHTS
  acts = tuple(ActRule(*_as_tuple(r)) for r in cfg.get("acts", ()))
  return Rules(weights, acts, bool(cfg.get("bias", False)))


def _as_tuple(rule) -> tuple:
  return (rule,) if isinstance(rule, str) else tuple(rule)

