"""A HAWQ-V2-style mixed-precision baseline: Hessian-aware
per-layer precisions at the size BSQ reached, for the `hawq` stage.

The algorithm, on the float (pretrained) model:

1. Trace. For every quantized tensor i (the tensors the model's rules
   select; w_i has m_i elements), the trace of its block H_ii of the loss
   Hessian, by Hutchinson's method: for each of `hawq.batches` training
   batches (no augmentation, BatchNorm in inference mode) and each of
   `hawq.probes` probes, draw one Rademacher vector v over all quantized
   tensors together (entries +-1, independent), compute the
   Hessian-vector product Hv (one per probe, however many tensors), and take
   v_i . (Hv)_i = v_i^T H_ii v_i + sum_{j != i} v_i^T H_ij v_j for every i.
   E[v_i v_i^T] = I and E[v_i v_j^T] = 0 for j != i, so its expectation is
   tr(H_ii) exactly: the cross terms are noise of mean zero. (HAWQ-V2's
   reference code draws v on one block at a time, one product per tensor
   and probe; one joint vector costs L times fewer products for the same
   expectation, at the price of that extra noise.) The estimate is the mean
   over batches and probes; its average, tr(H_ii) / m_i, is what HAWQ-V2
   calls the layer's average trace. A negative estimate (a direction of
   negative curvature, or noise) is taken as 0: insensitive by this measure.

   The product is reverse over reverse, grad_w (grad_w L(w) . v), not the
   cheaper forward over reverse (`jax.jvp` of `jax.grad`): the models'
   straight-through quantizers (`bitplanes.quantize_ste`, the activations'
   `layers._quantize_to_scale`) are custom_vjp functions whose forward rules
   call themselves, and JAX refuses forward mode through those. Where the
   loss has straight-through steps, "the Hessian" is the Jacobian J of the
   gradient the training uses; reverse over reverse gives J^T v, whose
   diagonal blocks have the same traces as J's.

2. Sensitivity. For every candidate precision n, Omega_i(n) = tr(H_ii) /
   m_i * ||Q_n(w_i) - w_i||^2, where Q_n(w) is the spec's conversion (section
   3: s = max|w|, rounded to K(n) = 2^n - 1 levels a side), i.e. the weight
   `bitplanes.weight(bitplanes.encode(w, n))` that `float_to_bsq` gives.
   The candidates are 1..max_bits; 0 (the layer all zero, Q_0(w) = 0)
   joins them only when the budget is below every layer at 1 bit, a size
   that BSQ's finetune scheme can reach by zeroing layers.

3. Allocation. The precisions n_i minimizing sum_i Omega_i(n_i) subject to
   sum_i m_i n_i <= B, the budget being BSQ's total bits (the scheme that
   `bsq_to_finetune` gives for the bsq stage's final params, as `scratch`
   uses). This is a multiple-choice knapsack, solved exactly by dynamic
   programming over the layers. Exactness: every cost m_i n_i is a multiple
   of g = gcd(m_1, ..., m_L), so sum m_i n_i <= B holds iff
   sum (m_i / g) n_i <= floor(B / g); in these units, and counted above the
   all-minimum scheme, every reachable total is an integer in 0..E with
   E = floor(B / g) - sum (m_i / g) n_min. The table T_l[e] = the least
   summed sensitivity of layers 1..l at exactly e units (inf if none) then
   holds every feasible scheme's optimum without any rounding of sizes; the
   answer is min_e T_L[e], read back through the stored choice per (l, e).
   Ties go to the lower precision and the smaller size. The sums are float64;
   the optimum is exact up to their rounding. Cost: O(L * |candidates| * E)
   time and L * (E + 1) bytes for the choices; E <= (max_bits - 1) * TP / g
   (ResNet-20: g = 2, E < 1e6, about 20 MB and well under a second). A table
   above 2 GiB is refused with an error rather than attempted.

The traces depend only on the float model, the batches and the probes, not
on BSQ's result: a run keeps them in `<workdir>/hawq_traces.json` with that
key (`TraceCache`), and a sweep copies the file to its other alphas' runs
(the estimate costs about 3 minutes on 2 CPU cores for ResNet-20).

Then the stage converts the float model to the chosen scheme (`float_to_bsq`)
and finetunes it exactly as `scratch` does (`stages.Run.hawq`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from functools import reduce
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bsq_jax import bitplanes as bp
from bsq_jax import scheme as sch
from bsq_jax.step import cross_entropy

MAX_TABLE_BYTES = 2**31  # the allocation's choice table, at most


# --------------------------------------------------------------------------
# 1. Hutchinson's estimate of the block traces.


def split(params: Mapping[str, Any], names: Iterable[str]
          ) -> Dict[str, jax.Array]:
  """The tensors `names` of a float params tree, by path."""
  flat = dict(sch.walk(params))
  missing = set(names) - set(flat)
  if missing:
    raise KeyError(f"params lack the quantized tensors {sorted(missing)}")
  return {n: flat[n] for n in names}


def merge(params: Mapping[str, Any], w: Mapping[str, jax.Array]):
  """`params` with the tensors of `w` (by path) in their places."""
  return sch.map_nodes(lambda p, v: w[p] if p in w else v, params)


def rademacher(key: jax.Array, like: Mapping[str, jax.Array]
               ) -> Dict[str, jax.Array]:
  """Independent +-1 entries, one array per tensor of `like`."""
  keys = jax.random.split(key, len(like))
  return {n: jax.random.rademacher(k, jnp.shape(w), jnp.float32)
          for k, (n, w) in zip(keys, sorted(like.items()))}


def block_products(loss: Callable[[Mapping], jax.Array],
                   w: Mapping[str, jax.Array],
                   v: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
  """v_i . (H v)_i for every tensor i, H the Hessian of `loss` at `w`
  (one Hessian-vector product for all tensors, reverse over reverse: see
  the module docstring)."""
  w, v = dict(w), dict(v)
  grad = jax.grad(loss)
  hv = jax.grad(lambda u: sum(jnp.vdot(g, v[n]) for n, g in grad(u).items()))(w)
  return {n: jnp.sum(v[n] * hv[n]) for n in w}


def hessian_traces(loss: Callable[[Mapping, Any, Any], jax.Array],
                   w: Mapping[str, jax.Array], batches: Sequence[Any],
                   probes: int, seed: int = 0, const: Any = ()
                   ) -> Dict[str, float]:
  """tr(H_ii) per tensor of `w`, H the Hessian in w of loss(w, const, batch),
  averaged over `batches` and `probes` Rademacher probes each (module
  docstring). `const` (the rest of the model) is an argument of the one
  compiled product, not a constant baked into it."""
  if probes < 1 or not batches:
    raise ValueError("hessian_traces: needs probes >= 1 and a batch")

  @jax.jit
  def estimate(w, const, batch, key):
    return block_products(lambda u: loss(u, const, batch), w,
                          rademacher(key, w))

  totals = {n: 0.0 for n in w}
  key = jax.random.key(seed)
  for b, batch in enumerate(batches):
    for p in range(probes):
      got = jax.device_get(estimate(w, const, batch, jax.random.fold_in(
          jax.random.fold_in(key, b), p)))
      totals = {n: totals[n] + float(got[n]) for n in totals}
  count = len(batches) * probes
  return {n: t / count for n, t in totals.items()}


def model_traces(model, params, batch_stats, names: Sequence[str],
                 batches: Sequence[Tuple[Any, Any]], probes: int,
                 seed: int = 0) -> Dict[str, float]:
  """`hessian_traces` of a float model's mean cross-entropy on (images,
  labels) batches, BatchNorm in inference mode, in the tensors `names`."""
  def loss(w, const, batch):
    rest, stats = const
    images, labels = batch
    out = model.apply({"params": merge(rest, w), "batch_stats": stats},
                      images, train=False)
    logits = out[0] if isinstance(out, tuple) else out
    return cross_entropy(logits, labels)
  return hessian_traces(loss, split(params, names), batches, probes, seed,
                        (params, batch_stats))


def fingerprint(*trees) -> str:
  """A digest of the arrays of `trees` (paths, shapes, dtypes and bytes)."""
  digest = hashlib.sha256()
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(trees):
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(leaf_path)}|{a.dtype}|{a.shape}|"
                  .encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TraceCache:
  """Step 1's estimates in a JSON file, reused only under the same key: the
  float model's fingerprint, the tensors, the batches and the probes."""
  path: str
  key: Dict[str, Any]

  FILE = "hawq_traces.json"

  def load(self):
    """The traces (tr(H_ii) by path), or None: no file, or another key."""
    if not os.path.exists(self.path):
      return None
    try:
      with open(self.path) as f:
        held = json.load(f)
    except (OSError, ValueError):
      return None
    if held.get("key") != self.key:
      return None
    return {n: float(v) for n, v in held["traces"].items()}

  def save(self, traces: Mapping[str, float]) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"key": self.key, "traces": dict(traces)}, f, indent=1)
    os.replace(tmp, self.path)


# --------------------------------------------------------------------------
# 2. Sensitivities.


def quantization_error(w: np.ndarray, bits: int) -> float:
  """||Q_n(w) - w||^2, Q_n the conversion of spec section 3 (n = 0: all zero)."""
  w = np.asarray(w, np.float32)
  q = np.asarray(bp.weight(bp.encode(w, bits)), np.float64)
  return float(np.sum(np.square(q - w.astype(np.float64))))


def sensitivities(traces: Mapping[str, float], weights: Mapping[str, Any],
                  candidates: Sequence[int]) -> Dict[str, np.ndarray]:
  """Omega_i(n) = max(tr_i, 0) / m_i * ||Q_n(w_i) - w_i||^2, n over
  `candidates` (one float64 array per tensor, in their order)."""
  out = {}
  for name, w in weights.items():
    avg = max(float(traces[name]), 0.0) / max(np.size(w), 1)
    out[name] = np.asarray([avg * quantization_error(w, n) for n in candidates],
                           np.float64)
  return out


# --------------------------------------------------------------------------
# 3. The exact allocation.


def allocate(sens: Mapping[str, Sequence[float]], sizes: Mapping[str, int],
             budget_bits: int, candidates: Sequence[int]) -> Dict[str, int]:
  """The scheme minimizing sum_i sens[i][k_i] with sum m_i n_i <= budget_bits,
  n_i = candidates[k_i]; exact dynamic programming (module docstring).
  ValueError if even the smallest candidate everywhere does not fit."""
  names = list(sens)
  cands = [int(n) for n in candidates]
  if sorted(cands) != cands or len(set(cands)) != len(cands) or cands[0] < 0:
    raise ValueError(f"candidates: expected increasing precisions >= 0, got "
                     f"{candidates}")
  m = [int(sizes[n]) for n in names]
  g = reduce(math.gcd, m, 0) or 1
  units = [mi // g for mi in m]
  low = cands[0]
  room = int(budget_bits) // g - low * sum(units)
  if room < 0:
    raise ValueError(f"budget of {budget_bits} bits is below every layer at "
                     f"{low} bits ({low * sum(m)} bits)")
  if len(names) * (room + 1) > MAX_TABLE_BYTES:
    raise ValueError(f"allocation table of {len(names)} x {room + 1} entries "
                     f"exceeds {MAX_TABLE_BYTES} bytes")
  best = np.full(room + 1, np.inf)
  best[0] = 0.0
  choice = np.zeros((len(names), room + 1), np.uint8)
  for i, name in enumerate(names):
    values = np.asarray(sens[name], np.float64)
    new = np.full(room + 1, np.inf)
    for k, n in enumerate(cands):
      extra = units[i] * (n - low)
      if extra > room:
        break
      cand = np.full(room + 1, np.inf)
      cand[extra:] = best[:room + 1 - extra] + values[k]
      better = cand < new  # strict: ties keep the lower precision
      new[better] = cand[better]
      choice[i, better] = k
    best = new
  used = int(np.argmin(best))  # the first minimum: the smallest size
  scheme = {}
  for i in reversed(range(len(names))):
    k = int(choice[i, used])
    scheme[names[i]] = cands[k]
    used -= units[i] * (cands[k] - low)
  assert used == 0
  return {n: scheme[n] for n in names}


# --------------------------------------------------------------------------
# The whole baseline.


@dataclasses.dataclass(frozen=True)
class Allocation:
  scheme: Dict[str, int]          # the chosen precision per tensor
  traces: Dict[str, float]        # tr(H_ii) / m_i, the average trace
  budget_bits: int                # BSQ's total bits
  total_bits: int                 # the scheme's, <= budget_bits
  sensitivity: float              # sum_i Omega_i(n_i) at the scheme
  candidates: Tuple[int, ...]

  def record(self) -> Dict[str, Any]:
    """What the metrics log keeps (JSON)."""
    return {"hawq_budget_bits": self.budget_bits,
            "hawq_total_bits": self.total_bits,
            "hawq_sensitivity": self.sensitivity,
            "hawq_candidates": list(self.candidates),
            "hawq_average_trace": dict(self.traces)}


def hawq_allocation(traces: Mapping[str, float], weights: Mapping[str, Any],
                    budget_bits: int, max_bits: int = 8) -> Allocation:
  """Steps 2 and 3 for block traces tr(H_ii) (step 1's `hessian_traces`)."""
  sizes = {n: int(np.size(w)) for n, w in weights.items()}
  candidates = tuple(range(1, max_bits + 1))
  if budget_bits < sum(sizes.values()):  # only all-zero layers can fit
    candidates = (0,) + candidates
  sens = sensitivities(traces, weights, candidates)
  scheme = allocate(sens, sizes, budget_bits, candidates)
  return Allocation(
      scheme=scheme,
      traces={n: float(traces[n]) / max(sizes[n], 1) for n in weights},
      budget_bits=int(budget_bits),
      total_bits=sum(sizes[n] * scheme[n] for n in scheme),
      sensitivity=float(sum(sens[n][candidates.index(scheme[n])]
                            for n in scheme)),
      candidates=candidates)
