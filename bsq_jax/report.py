"""What a person reads: progress with an ETA for the whole run, a JSON-lines
metrics file, TensorBoard scalars, per-layer precision after a host pass,
and the summary
table with the paper's columns (and, where BSQ left all-zero tensors, how
many, and BSQ's bits as finetuning counts them). Only process 0 writes."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

import jax
from absl import logging

SUMMARY_COLUMNS = ("stage", "average bits", "compression", "test accuracy")
# Shown only when some stage has one: tensors at 0 bits in finetuning.
ZERO_COLUMN = "all-zero tensors"


class _DropLibraryChatter:
  """Keeps orbax's per-save INFO lines out of the run log."""

  def filter(self, record) -> bool:
    return "orbax" not in record.pathname or record.levelno >= 30


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_DropLibraryChatter())


def is_writer() -> bool:
  return jax.process_index() == 0


def duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m'."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunProgress:
  """What a person sees of a run, whatever absl's verbosity, and the same
  from main.py and from Python: on stderr of process 0, the stage (k of n),
  the epoch and an ETA for all the run's remaining steps. On a terminal a
  tqdm bar over the whole run; otherwise a line at the end of each epoch
  and, in a long epoch, at most one every `every` seconds."""

  def __init__(self, stages=(), steps: Optional[Mapping[str, int]] = None,
               every: float = 60.0):
    self.stages, self.every = tuple(stages), every
    self.total = sum((steps or {}).values())
    self.done, self.start, self.first = 0, time.time(), None
    self._last_line = time.time()
    self.bar = None
    if is_writer() and sys.stderr.isatty() and self.total:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=self.total, unit="step", leave=False,
                      bar_format="{desc} {bar} {n_fmt}/{total_fmt} {postfix}")

  def tag(self, stage: str) -> str:
    """'[3/5] bsq': the stage's place in this run."""
    if stage not in self.stages:
      return stage
    return f"[{self.stages.index(stage) + 1}/{len(self.stages)}] {stage}"

  def eta(self) -> str:
    """'run eta 1m05s' once a step has run (compiling counts)."""
    if not self.done or self.first is None or self.done >= self.total:
      return ""
    per_step = (time.time() - self.first) / self.done
    return f"run eta {duration(per_step * (self.total - self.done))}"

  def say(self, line: str) -> None:
    if not is_writer():
      return
    if self.bar is not None:
      self.bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)

  def begin_epoch(self) -> None:
    if self.first is None:
      self.first = time.time()

  def steps(self, stage: str, epoch: str, n: int, **values: float) -> None:
    """`n` more steps of `stage`'s epoch ('2/6'); `values` shown beside."""
    self.done += n
    shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    if self.bar is not None:
      self.bar.set_description_str(f"{self.tag(stage)} epoch {epoch}",
                                   refresh=False)
      self.bar.set_postfix_str(f"{shown} {self.eta()}", refresh=False)
      self.bar.update(n)
    elif time.time() - self._last_line >= self.every:
      self.say(f"{self.tag(stage)} epoch {epoch}: {shown}, {self.eta()}")
      self._last_line = time.time()

  def end_epoch(self, line: str) -> None:
    eta = self.eta()
    self.say(f"{line}{'; ' + eta if eta else ''}")
    self._last_line = time.time()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch
  tensors; that costs 3-15 s of CPU per process (more than a tiny run's
  whole stage), and this log writes floats. A None in sys.modules makes
  tensorboardX's `import torch` fail as if torch were absent; the entry is
  removed afterwards, so the user's own `import torch` still works."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    return importlib.import_module("tensorboardX").SummaryWriter
  finally:
    if hide:  # still None: the None made every import of torch fail
      del sys.modules["torch"]


class MetricsLog:
  """metrics.jsonl (one record per epoch) plus TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tensorboard")

  def forget_after(self, stage: str, epoch: int) -> None:
    """Drops records of `stage` past `epoch`: a resumed run redoes them."""
    if not (is_writer() and os.path.exists(self.path)):
      return
    kept = [r for r in self.records()
            if not (r.get("stage") == stage and r.get("epoch", -1) > epoch)]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    if not is_writer():
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._scalars(record)

  def _scalars(self, record: Mapping[str, Any]) -> None:
    try:
      if self._tb is None:
        self._tb = _summary_writer_class()(self._tb_dir)
    except ImportError:
      return
    step = record.get("global_epoch", record.get("epoch", 0))
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(f"{record.get('stage', 'run')}/{key}", value, step)
    self._tb.flush()

  def records(self) -> List[Dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def precision_line(bits: Mapping[str, int]) -> str:
  """'conv1=8 layer1_0/conv1=6 ...' with the '/kernel' suffix dropped."""
  return " ".join(f"{k.removesuffix('/kernel')}={v}" for k, v in bits.items())


def _last_records(records: Iterable[Mapping[str, Any]]
                  ) -> Dict[str, Mapping[str, Any]]:
  """The last record of each stage, in run order."""
  last: Dict[str, Mapping[str, Any]] = {}
  for r in records:
    last[r["stage"]] = r
  return last


def _finetuned_bits(r: Mapping[str, Any]) -> Optional[float]:
  """A bsq record's average bits as finetuning counts them, where that
  differs from its own (1-bit all-zero tensors become 0 bits)."""
  tuned = r.get("finetune_average_bits")
  return None if tuned is None or tuned == r.get("average_bits") else tuned


def summary_rows(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """The last record of each stage, in run order."""
  rows = []
  for s, r in _last_records(records).items():
    bits, tuned = r.get("average_bits"), _finetuned_bits(r)
    rows.append({
        "stage": s,
        "average bits": (bits if tuned is None else
                         f"{_cell(bits)} ({_cell(tuned)} as finetuned)"),
        "compression": r.get("compression"),
        "test accuracy": percent(r.get("test_accuracy")),
        ZERO_COLUMN: (f"{r['zero_tensors']} of {len(r['bits'])}"
                      if "zero_tensors" in r and r.get("bits") else None)})
  return rows


def summary_notes(records: Iterable[Mapping[str, Any]]) -> str:
  """What the table cannot say: a bsq result whose all-zero 1-bit tensors
  finetuning counts at 0 bits."""
  notes = []
  for s, r in _last_records(records).items():
    tuned = _finetuned_bits(r)
    if tuned is not None:
      notes.append(
          f"{s}: {r['zero_tensors']} of {len(r['bits'])} quantized tensors "
          f"ended at 1 bit with no bit set. Finetuning holds them at 0 bits "
          f"(all zero; docs/algorithm.md), so this scheme is "
          f"{_cell(tuned)} average bits ({_cell(r['finetune_compression'])}x) "
          f"in the stages that finetune it.")
  return "".join(f"\n{n}\n" for n in notes)


def percent(fraction: Optional[float]) -> Optional[str]:
  """0.8767 -> '87.67%', as the README and the results quote accuracies."""
  return None if fraction is None else f"{100 * fraction:.2f}%"


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}" if v < 1 else f"{v:.2f}"
  return str(v)


def markdown_table(rows: List[Mapping[str, Any]],
                   columns=SUMMARY_COLUMNS) -> str:
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def write_summary(workdir: str, records: List[Mapping[str, Any]],
                  command: Optional[str] = None) -> str:
  rows = summary_rows(records)
  zeros = any(r.get("zero_tensors") for r in _last_records(records).values())
  table = (markdown_table(rows, SUMMARY_COLUMNS + ((ZERO_COLUMN,) if zeros
                                                   else ()))
           + summary_notes(records))
  if is_writer():
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      if command:
        f.write(f"Command: `{command}`\n\n")
      f.write(table)
  return table
