"""Which config fields change a run's results, and the workdir's record of
them: a workdir's checkpoints never go on under settings that did not
produce them.

`run.json` holds the result-changing settings (flat, `bsq.alpha`: 0.3) of
the run that made the workdir; `config.json` the whole config of the last
command. A run whose settings differ from `run.json`'s, in a field that a
stage already in the workdir depends on, stops before it writes anything,
with one line naming the fields. Fields that change no result (`NEUTRAL`:
where the data is, how steps are dispatched, which stages run) may change
freely; `EXTENDS` fields may grow: the stages that use them go on from their
last epoch as if the larger value had been set from the start.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, List, Mapping

from bsq_jax.checkpoint import CheckpointError

# Where the data is, how steps are dispatched and evaluated, which stages
# run: none of them changes a checkpoint or a test accuracy.
NEUTRAL = ("stages", "eval_every", "eval_batch_size", "chunk_steps",
           "cpu_chunk_steps", "xla_fast_compile", "data.data_dir",
           "data.manual_dir", "data.download", "data.fashion_mnist_dir",
           "data.host_prefetch")
# May only grow. The finetuning schedule feeds no later stage, and its
# learning rate depends on the milestones, not on the number of epochs, so
# more epochs continue the finished ones exactly.
EXTENDS = ("finetune.epochs",)

# The stages each stage starts from.
INPUTS = {"convert": ("pretrain",), "bsq": ("convert",), "finetune": ("bsq",),
          "scratch": ("bsq", "pretrain"), "uniform": ("convert",),
          "hawq": ("bsq", "pretrain")}
# What every stage depends on, and the config sections of each stage's own.
COMMON = ("seed", "batch_size", "model", "data")
OWN = {"pretrain": ("pretrain",), "convert": ("convert",), "bsq": ("bsq",),
       "finetune": ("finetune",), "scratch": ("finetune",),
       "uniform": ("finetune",), "hawq": ("hawq", "finetune")}
LEGACY = ("model", "data", "seed")  # all that run.json held before `settings`


def flat(config) -> Dict[str, Any]:
  """{'bsq.alpha': 0.3, ...}, as JSON reads it back (tuples become lists)."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(f"{prefix}{k}.", v)
      else:
        out[prefix + k] = v
  walk("", config.to_dict() if hasattr(config, "to_dict") else config)
  return json.loads(json.dumps(out))


def _is(field: str, names: Iterable[str]) -> bool:
  return any(field == n or field.startswith(n + ".") for n in names)


def result_settings(config) -> Dict[str, Any]:
  return {k: v for k, v in flat(config).items() if not _is(k, NEUTRAL)}


def changes_results(field: str) -> bool:
  """Whether a different value of `field` makes a different run (a field
  that may only grow does not: it extends the run)."""
  return not _is(field, NEUTRAL + EXTENDS)


def depends_on(stages: Iterable[str]) -> tuple:
  """The config sections the results of `stages` depend on, inputs too."""
  sections, todo, seen = set(COMMON), list(stages), set()
  while todo:
    stage = todo.pop()
    if stage not in seen:
      seen.add(stage)
      sections.update(OWN.get(stage, ()))
      todo += INPUTS.get(stage, ())
  return tuple(sorted(sections))


def differences(held: Mapping[str, Any], want: Mapping[str, Any],
                stages: Iterable[str]) -> List[str]:
  """'field (old there, new here)' for each field that `stages` depend on
  and that differs, a grown `EXTENDS` field excepted."""
  sections = depends_on(stages)
  out = []
  for k in sorted(set(held) | set(want)):
    old, new = held.get(k), want.get(k)
    if old == new or not _is(k, sections):
      continue
    if _is(k, EXTENDS) and isinstance(old, int) and isinstance(new, int) \
        and new > old:
      continue
    out.append(f"{k} ({old!r} there, {new!r} here)")
  return out


def workdir_name(base: str, fields: Mapping[str, Any]) -> str:
  """`base`, then `-field=value` for each field: 'workdirs/smoke-bsq.alpha=0.5'.
  Characters a shell would need quoted become '_'."""
  parts = [re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{k}={v}")
           for k, v in fields.items()]
  return "-".join([base] + parts)


def stages_in(workdir: str, stages: Iterable[str]) -> List[str]:
  """The `stages` that have checkpoints in `workdir`, finished or not."""
  return [s for s in stages
          if os.path.isdir(os.path.join(workdir, s, "checkpoints"))]


def check_workdir(workdir: str, config, stages: Iterable[str],
                  legacy: Mapping[str, Any]) -> str:
  """'new' (no run.json), 'same' or 'legacy' (a run.json of an earlier
  version, which recorded only `legacy`'s fields); raises CheckpointError,
  one line, when the workdir holds a run of other settings."""
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    return "new"
  try:
    with open(path) as f:
      held = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable ({e}); use a new --workdir"
                          ) from None
  if "settings" not in held:
    diff = [k for k in LEGACY if held.get(k) != legacy[k]]
    if diff:
      raise CheckpointError(
          f"--workdir {workdir} holds a run of another {'/'.join(diff)} "
          f"({path}); use a new --workdir")
    return "legacy"
  want = result_settings(config)
  diff = differences(held["settings"], want, stages_in(workdir, stages))
  if diff:
    fields = {d.split(" ")[0]: want.get(d.split(" ")[0]) for d in diff}
    raise CheckpointError(
        f"--workdir {workdir} holds a run of other settings: "
        f"{'; '.join(diff)}; use a new --workdir, e.g. "
        f"--workdir={workdir_name(workdir.rstrip('/'), fields)}")
  return "same"


def write(workdir: str, config, run_json: bool = True) -> None:
  """config.json, and run.json (this run's result-changing settings) unless
  `run_json` is False: an earlier version's run.json is kept as it is, as
  nothing says which settings made its stages."""
  os.makedirs(workdir, exist_ok=True)
  files = [("config.json", flat(config))]
  if run_json:
    files.append(("run.json", {"settings": result_settings(config)}))
  for name, content in files:
    tmp = os.path.join(workdir, name + ".tmp")
    with open(tmp, "w") as f:
      json.dump(content, f, indent=1)
    os.replace(tmp, os.path.join(workdir, name))
