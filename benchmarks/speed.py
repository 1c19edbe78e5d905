"""Train-step speed of ResNet-20 (float / bsq / finetune) on the local devices.

    python benchmarks/speed.py --preset quick --out results/speed.md

Everything is measured in one process and interleaved across modes (rep 1:
float, bsq, finetune; rep 2: ...) so that a shared, noisy machine hits every
mode alike; figures are medians. XLA flags can only be set before jax starts,
so the flag trials run as child processes of this script (`--child`),
alternated with a child on the default flags, and are compared with that
baseline child only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=("quick", "full"), default="quick")
  p.add_argument("--out", default="results/speed.md")
  p.add_argument("--devices", type=int, default=0,
                 help="force this many host (CPU) devices; 0 = as found")
  p.add_argument("--shared", default="auto", choices=("auto", "yes", "no"),
                 help="say in the report that the machine was shared")
  p.add_argument("--budget-s", type=float, default=None,
                 help="wall-clock budget; phases that would overrun are "
                      "skipped and reported as not measured "
                      "(default: the preset's)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

# pylint: disable=wrong-import-position
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np

from bsq_jax import allocator, optim
from bsq_jax import scheme as sch
from bsq_jax.epoch import AXIS, Trainer, put_dataset
from bsq_jax.layers import Quant, freeze_scheme
from bsq_jax.models import build_model, init_variables, input_shape
from bsq_jax.models import memory_bytes
from bsq_jax.step import TrainState
from machine import busy_processes, machine

CFG = {"name": "cifar_resnet", "depth": 20, "num_classes": 10, "act_bits": 4,
       "width": 16, "channels": 3}
R50 = {"name": "resnet50", "act_bits": 4, "num_classes": 1000}
BATCH = 128
MODES = ("float", "bsq", "finetune")
PRESETS = {
    # steps: train steps in the timing dataset (= steps per epoch);
    # chunk: steps per dispatch when timing the step; reps: interleaved reps.
    # epoch_chunk None: the Trainer's own (chunk_steps, or cpu_chunk_steps
    # on CPU). A trial is XLA flags ("--xla_...") or an env var ("NAME=v");
    # "LD_PRELOAD=@tcmalloc" preloads that allocator where it is installed.
    "quick": dict(steps=4, chunk=2, reps=3, epoch_reps=2, host_reps=5,
                  budget_s=1500, torch_steps=10,
                  epoch_chunk=None, trial_reps=3, trials=(
                      "BSQ_JAX_CONV=xla", "LD_PRELOAD=@tcmalloc",
                      "LD_PRELOAD=@jemalloc")),
    "full": dict(steps=40, chunk=10, reps=10, epoch_reps=4, host_reps=7,
                 budget_s=7200, torch_steps=40,
                 epoch_chunk=None, trial_reps=6, trials=(
                     "BSQ_JAX_CONV=xla", "LD_PRELOAD=@tcmalloc",
                     "LD_PRELOAD=@jemalloc",
                     "--xla_cpu_use_onednn=true",
                     "--xla_cpu_use_xnnpack=true",
                     "--xla_cpu_enable_fast_math=true",
                     "--xla_cpu_multi_thread_eigen=false",
                     "--xla_backend_optimization_level=0")),
}
TORCH_REF = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "torch_reference.py")
TARGETS = {"bsq_over_float": 1.10, "epoch_over_steps": 1.05, "host_pass_s": 1.0}


def _nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def setup(devices, cfg=CFG, batch=BATCH, bits=8, alpha=5e-3, **trainer_kw):
  """Trainers and fresh states for the three modes (default: ResNet-20 at 8
  bits, batch 128); `trainer_kw` go to every Trainer (loop=, chunk_steps=).
  Returns ({mode: (trainer, state)}, the bsq params)."""
  fmodel = build_model(cfg, Quant("float"), None)
  sample = jnp.zeros((1,) + input_shape(cfg), jnp.float32)
  variables = jax.device_get(init_variables(fmodel, jax.random.key(0), sample))
  scheme = sch.uniform_scheme(fmodel, sample, bits)
  fparams = variables["params"]
  bparams = sch.float_to_bsq(fparams, scheme)
  tparams, tscheme = sch.bsq_to_finetune(bparams)
  out = {}
  for mode, params, sc in (("float", fparams, None), ("bsq", bparams, scheme),
                           ("finetune", tparams, tscheme)):
    tp = 1 if mode == "float" else sch.account(
        params, sc if mode == "finetune" else None).total_params
    tx = optim.make_optimizer(0.1, 0.0, 1e-4, 0.9, tp)
    model = build_model(cfg, Quant(mode, freeze_scheme(sc)), AXIS)
    trainer = Trainer(model, tx, sch.roles(params), tp, batch, batch, True,
                      devices, **trainer_kw)
    opt_state = tx.init(params)
    if mode == "bsq":  # a realistic alpha; it does not change the work done
      opt_state = optim.set_hyperparams(opt_state, alpha=alpha)
    out[mode] = (trainer, TrainState(params, variables["batch_stats"],
                                     opt_state))
  return out, bparams


def run_epoch(trainer, state, data, epoch, chunk):
  """One epoch via train_epoch; returns (state, [seconds per chunk], steps)."""
  times, steps = [], []
  gen = trainer.train_epoch(state, data, 0, epoch, chunk)
  while True:
    t0 = time.perf_counter()
    try:
      state, n, sums = next(gen)
    except StopIteration:
      break
    jax.block_until_ready((state, sums))
    times.append(time.perf_counter() - t0)
    steps.append(n)
  return state, times, steps


def _read_at_once(chunks):
  """As StageLoop._epoch: each chunk's metrics read once it is dispatched."""
  for state, n, sums in chunks:
    yield state, n, jax.device_get(sums)


def one_chunk_behind(chunks):
  """A trial: each chunk's metrics read once the next chunk is dispatched,
  so the device has work queued while the host reads (measured slower on
  2-core CPU; kept to measure elsewhere)."""
  pending = None
  for item in chunks:
    if pending is not None:
      yield pending[0], pending[1], jax.device_get(pending[2])
    pending = item
  if pending is not None:
    yield pending[0], pending[1], jax.device_get(pending[2])


def full_epoch(trainer, state, data, epoch, chunk, lag=False):
  """An epoch as StageLoop._epoch drives it (metrics read at once), or with the
  metrics one chunk behind (lag=True); seconds."""
  t0 = time.perf_counter()
  totals = {}
  reader = one_chunk_behind if lag else _read_at_once
  for state, _, sums in reader(
      trainer.train_epoch(state, data, 0, epoch, chunk)):
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
  jax.block_until_ready(state)
  return state, time.perf_counter() - t0


def measure_steps(setups, data, p, modes=MODES, log=print, deadline=None):
  """Compile time and per-step seconds per mode, interleaved over reps.

  A mode whose first call would start after `deadline` is skipped; reps stop
  at the deadline (at least one steady rep per compiled mode is run).
  """
  states = {m: setups[m][1] for m in modes}
  first, chunk_s, traces = {}, {}, {}
  for m in modes:  # first call: trace + compile + run
    if deadline and first and time.perf_counter() + 2.5 * max(
        sum(v) for v in first.values()) > deadline:
      log(f"  {m}: skipped (time budget)")
      continue
    trainer = setups[m][0]
    states[m], times, _ = run_epoch(trainer, states[m], data, 0, p["chunk"])
    first[m], chunk_s[m] = times, list(times[1:])
    log(f"  {m}: first epoch chunks {[round(t, 2) for t in times]}s, "
        f"traces {trainer.traces}")
  done = list(first)
  for rep in range(p["reps"]):
    if deadline and rep and time.perf_counter() > deadline:
      log("  reps stopped (time budget)")
      break
    for m in done:
      states[m], times, _ = run_epoch(setups[m][0], states[m], data, rep + 1,
                                      p["chunk"])
      chunk_s[m] += times
    log(f"  rep {rep + 1}/{p['reps']}: " + ", ".join(
        f"{m} {statistics.median(chunk_s[m]) / p['chunk'] * 1e3:.0f}ms/step"
        for m in done))
  for m in done:
    traces[m] = setups[m][0].traces
  step_s = {m: statistics.median(chunk_s[m]) / p["chunk"] for m in done}
  compile_s = {m: first[m][0] - statistics.median(chunk_s[m]) for m in done}
  return step_s, compile_s, chunk_s, states, traces


def child(flags_json: str) -> None:
  """Float and bsq step time under the XLA_FLAGS this process started with."""
  p = dict(PRESETS[json.loads(flags_json)["preset"]])
  setups, _ = setup(None)
  rng = np.random.default_rng(0)
  n = p["steps"] * BATCH
  data = put_dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 10, n), (125.3, 123.0, 113.9),
                     (63.0, 62.1, 66.7))
  p["reps"] = p["trial_reps"]
  step_s, compile_s, _, _, _ = measure_steps(
      setups, data, p, ("float", "bsq"), log=lambda *_: None)
  print("RESULT " + json.dumps({"step_s": step_s, "compile_s": compile_s}))


def missing_library(flags: str) -> Optional[str]:
  """Why a trial cannot run here (its allocator is not installed), or None."""
  if "=@" not in flags:
    return None
  name = flags.split("=@", 1)[1]
  if allocator.find(name):
    return None
  return (f"{name} is not installed (apt-get install "
          f"{allocator.LIBRARIES[name][0]})")


def skip_reason(flags: str, need_s: float, deadline: float) -> Optional[str]:
  """Why a child run under `flags` is skipped: no library, or no time."""
  return missing_library(flags) or (
      "time budget" if time.perf_counter() + need_s > deadline else None)


def trial_env(flags: str) -> dict:
  """This process's environment with a trial's XLA flag or variable set."""
  env = dict(os.environ)
  if flags.startswith("--"):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  elif flags:
    name, value = flags.split("=", 1)
    env[name] = (allocator.find(value[1:]) if value.startswith("@")
                 else value)
  return env


def run_child(cmd, flags: str):
  """Runs a child that prints `RESULT {json}`; its result, or an error."""
  proc = subprocess.run(cmd, env=trial_env(flags), capture_output=True,
                        text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def run_trial(flags: str, preset: str):
  return run_child([sys.executable, os.path.abspath(__file__), "--child",
                    json.dumps({"preset": preset})], flags)


def run_torch(mode: str, flags: str, steps: int):
  return run_child([sys.executable, TORCH_REF, "--mode", mode, "--steps",
                    str(steps)], flags)


def reference(args, R, p, deadline, longest) -> None:
  """The PyTorch ResNet-20 step (if torch imports) beside a bsq_jax child,
  under the default allocator and, where installed, tcmalloc."""
  R["reference"] = []
  if importlib.util.find_spec("torch") is None:
    R["skipped"].append("PyTorch reference: torch is not installed "
                        "(optional: pip install torch)")
    return
  for flags in ("", "LD_PRELOAD=@tcmalloc"):
    why = skip_reason(flags, 2 * (longest + 20), deadline)
    if why:
      R["skipped"].append(f"PyTorch reference {flags}: {why}")
      continue
    ours = run_trial(flags, args.preset)
    theirs = {m: run_torch(m, flags, p["torch_steps"]) for m in ("float", "bsq")}
    R["reference"].append((flags, ours, theirs))
    print(f"reference {flags or 'default'}: bsq_jax {ours} / torch {theirs}",
          flush=True)
    write_report(args, R)


def reference_lines(rows) -> list:
  """The PyTorch reference table (benchmarks/torch_reference.py)."""
  L = ["## PyTorch reference on this machine\n",
       "`benchmarks/torch_reference.py`: the same ResNet-20 in PyTorch (bsq "
       "rebuilds each weight from 8+8 bit planes every step, as the authors' "
       "release does), batch 128, each step timed alone, median; run in a "
       "child right after a bsq_jax child under the same allocator.\n",
       "| allocator | mode | bsq_jax step (ms) | PyTorch step (ms) | "
       "PyTorch images/s | bsq_jax / PyTorch step |", "|---|---|---|---|---|---|"]
  for flags, ours, theirs in rows:
    name = flags.split("@")[1] if flags else "default (glibc)"
    for m, t in theirs.items():
      err = ours.get("error") or t.get("error")
      if err:
        L.append(f"| {name} | {m} | failed: {err} | | | |")
        continue
      a, b = ours["step_s"][m], t["step_s"]
      L.append(f"| {name} | {m} | {a * 1e3:.1f} | {b * 1e3:.1f} | "
               f"{BATCH / b:.1f} | {a / b:.3f}x |")
  if rows:
    L.append(f"\ntorch {rows[0][2]['float'].get('torch', '?')}, "
             f"{rows[0][2]['float'].get('threads', '?')} threads.")
  else:
    L.append("| (not run) | | not measured | | | |")
  return L + [""]


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:.2f} MiB"


def main(args) -> None:
  p = PRESETS[args.preset]
  t_start = time.perf_counter()
  deadline = t_start + (args.budget_s or p["budget_s"])
  R = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
       "machine": machine(), "busy": busy_processes(), "p": p,
       "preset": args.preset, "t_start": t_start, "skipped": []}
  print(f"machine: {R['machine']}", flush=True)
  out = lambda: write_report(args, R)  # the report is rewritten after each phase

  setups, bparams = setup(None)
  # Memory (cheap): real ResNet-20 trees, ResNet-50 from shapes.
  for m in MODES:  # momentum = optax.trace's buffer (3rd link of the chain)
    assert (jax.tree.structure(setups[m][1].opt_state.inner_state[2].trace) ==
            jax.tree.structure(setups[m][1].params)), m
  R["mem20"] = {m: {"params": _nbytes(setups[m][1].params),
                    "momentum": _nbytes(setups[m][1].opt_state.inner_state[2])}
                for m in MODES}
  R["mem50"] = {m: memory_bytes(R50, m, 8) for m in ("float", "bsq")}
  # Host pass on ResNet-20 bsq params (8 bits, as after the conversion).
  host_s = []
  for _ in range(p["host_reps"]):
    t0 = time.perf_counter()
    sch.requantize_params(bparams, 8)
    host_s.append(time.perf_counter() - t0)
  R["host_s"] = host_s
  print(f"host pass: {statistics.median(host_s):.3f}s", flush=True)
  out()

  rng = np.random.default_rng(0)
  n = p["steps"] * BATCH
  data = put_dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 10, n), (125.3, 123.0, 113.9),
                     (63.0, 62.1, 66.7))
  R["epoch_steps"] = setups["float"][0].steps_per_epoch(data)
  R["epoch_chunk"] = p["epoch_chunk"] or setups["float"][0].chunk_steps
  print(f"steps: chunks of {p['chunk']}, {p['reps']} interleaved reps",
        flush=True)
  (R["step_s"], R["compile_s"], R["chunk_s"], states,
   R["traces"]) = measure_steps(setups, data, p, deadline=deadline)
  out()

  # Full epochs with the default chunk size, against steps x step time.
  R["epoch_s"], R["epoch_first"] = {}, {}
  longest = max(R["compile_s"].values())
  for m in R["step_s"]:
    if time.perf_counter() + 1.5 * longest > deadline:
      R["skipped"].append(f"epoch ({m}): time budget")
      continue
    states[m], R["epoch_first"][m] = full_epoch(
        setups[m][0], states[m], data, 100, p["epoch_chunk"])
    R["epoch_s"][m] = []
    R.setdefault("epoch_chunk_s", {})[m] = []
    for rep in range(p["epoch_reps"]):
      states[m], t = full_epoch(setups[m][0], states[m], data, 101 + rep,
                                p["epoch_chunk"])
      R["epoch_s"][m].append(t)
      # Side by side: the same chunks timed alone (the step at the epoch's
      # own chunk size), so epoch / steps counts only what is not the step.
      states[m], times, _ = run_epoch(setups[m][0], states[m], data,
                                      101 + rep, p["epoch_chunk"])
      R["epoch_chunk_s"][m] += times
      if m == "bsq":  # side by side: metrics read one chunk behind
        states[m], t = full_epoch(setups[m][0], states[m], data, 101 + rep,
                                  p["epoch_chunk"], lag=True)
        R.setdefault("epoch_lagged_s", []).append(t)
    print(f"epoch {m}: {R['epoch_s'][m]}", flush=True)
    out()

  # Trials: XLA flags in child processes, each after a baseline child.
  R["trials"] = []
  for flags in p["trials"]:
    why = skip_reason(flags, 4 * (longest + 20), deadline)
    if why:
      R["skipped"].append(f"trial {flags}: {why}")
      continue
    base = run_trial("", args.preset)
    var = run_trial(flags, args.preset)
    R["trials"].append((flags, base, var))
    print(f"trial {flags}: base {base} / variant {var}", flush=True)
    out()
  reference(args, R, p, deadline, longest)
  R["busy"] += busy_processes()
  R["done"] = True
  out()


def write_report(args, R):
  p, mach = R["p"], R["machine"]
  step_s = R.get("step_s", {})
  busy = R["busy"]
  shared = args.shared == "yes" or (args.shared == "auto" and bool(busy))
  total_s = time.perf_counter() - R["t_start"]
  NA = "not measured"
  L = ["# ResNet-20 train-step speed (bsq_jax)\n",
       "Written by `benchmarks/speed.py`; every number below comes from the "
       "run itself." + ("" if R.get("done") else
                        " **The run had not finished when this was written.**")
       + "\n", "```\n" + R["command"] + "\n```\n", "## Machine\n",
       f"- CPU: {mach['cpu']}, {mach['cores']} cores (os.cpu_count)",
       f"- jax {mach['jax']}, devices: {mach['device']}, python "
       f"{mach['python']}",
       f"- load average at start: {', '.join(f'{x:.2f}' for x in mach['load'])}"]
  if shared:
    L.append("- **The machine was shared during the run** (other CPU-heavy "
             "processes seen: " + ", ".join(sorted(set(busy))[:6] or
                                            ["declared with --shared yes"]) +
             "); absolute times are noisy, ratios between interleaved "
             "configurations are the figures to trust.")
  else:
    L.append("- No other CPU-heavy process was seen at start or end.")
  L.append(f"- preset `{R['preset']}`: global batch {BATCH}, 32x32x3 random "
           f"uint8 images ({R.get('epoch_steps', '?')} steps per epoch), step "
           f"timing in chunks of {p['chunk']} steps, up to {p['reps']} "
           f"interleaved reps; run time so far {total_s:.0f} s (budget "
           f"{args.budget_s or p['budget_s']:.0f} s).")
  for s in R["skipped"]:
    L.append(f"- skipped: {s}")
  L.append("")

  L.append("## Train step (ResNet-20, batch 128)\n")
  L.append("| mode | step (ms, median) | images/s | step / float step | "
           "compile (s) | chunk traces | chunk times (s) |")
  L.append("|---|---|---|---|---|---|---|")
  for m in MODES:
    if m not in step_s:
      L.append(f"| {m} | {NA} | | | | | |")
      continue
    rel = (f"{step_s[m] / step_s['float']:.3f}" if "float" in step_s else NA)
    L.append(f"| {m} | {step_s[m] * 1e3:.1f} | {BATCH / step_s[m]:.1f} | "
             f"{rel} | {R['compile_s'][m]:.1f} | {R['traces'][m]} | "
             f"{', '.join(f'{t:.2f}' for t in R['chunk_s'][m])} |")
  L.append("")
  L.append(f"Step time = median over steady chunks of {p['chunk']} steps "
           f"(one `train_epoch` dispatch each, `jax.block_until_ready` on "
           f"the state) / {p['chunk']}. Compile = time of the first chunk "
           f"call (trace + compile + run) minus the median steady chunk. "
           f"`chunk traces` = `Trainer.traces` after all calls at this chunk "
           f"size (1 means no retrace).\n")

  L.append("## Epoch against the sum of its steps\n")
  ep = R.get("epoch_s", {})
  L.append("| mode | epoch (s, median) | steps x step (s) | epoch / steps | "
           "step at the epoch's chunk (ms) | epoch / those steps | "
           "first epoch (s, with its compile) |")
  L.append("|---|---|---|---|---|---|---|")
  ratios, own = {}, {}
  for m in MODES:
    if m not in ep:
      L.append(f"| {m} | {NA} | | | | | |")
      continue
    med = statistics.median(ep[m])
    ratios[m] = med / (R["epoch_steps"] * step_s[m])
    own_step = (statistics.median(R["epoch_chunk_s"][m]) / R["epoch_chunk"]
                if R.get("epoch_chunk_s", {}).get(m) else None)
    if own_step:
      own[m] = med / (R["epoch_steps"] * own_step)
    L.append(f"| {m} | {med:.2f} | {R['epoch_steps'] * step_s[m]:.2f} | "
             f"{ratios[m]:.3f} | "
             f"{own_step * 1e3 if own_step else float('nan'):.1f} | "
             f"{own.get(m, float('nan')):.3f} | "
             f"{R['epoch_first'][m]:.1f} |")
  if R.get("epoch_lagged_s") and "bsq" in ep:
    lagged = statistics.median(R["epoch_lagged_s"])
    L.append(f"\nTrial: bsq epoch with each chunk's metrics read once the "
             f"next chunk is dispatched (`one_chunk_behind`), alternated with "
             f"the row above: median {lagged:.2f} s, epoch / steps "
             f"{lagged / (R['epoch_steps'] * step_s['bsq']):.3f}, "
             f"{lagged / statistics.median(ep['bsq']):.3f}x of reading at "
             f"once.")
  L.append(f"\nEpoch = `train_epoch` with the Trainer's own chunk of "
           f"{R.get('epoch_chunk', '?')} steps per dispatch (`chunk_steps`, or "
           f"`cpu_chunk_steps` on CPU), metrics read per chunk as "
           f"`StageLoop._epoch` does. Its chunk differs from the timing chunks (a "
           f"separate compile, not counted), so `epoch / steps` also holds the "
           f"chunk size's own effect on the step. `step at the epoch's chunk` "
           f"times the same chunks alone (`jax.block_until_ready` after each, "
           f"alternated with the epochs); `epoch / those steps` is then what "
           f"is not the step: reading metrics, Python between dispatches.\n")

  L.append("## Host pass\n")
  hs = R["host_s"]
  host_med = statistics.median(hs)
  L.append(f"`scheme.requantize_params` on ResNet-20 bsq params (8 bits, as "
           f"converted): median {host_med:.3f} s over {len(hs)} "
           f"({', '.join(f'{t:.3f}' for t in hs)}).\n")

  L.append("## Memory (bytes per replica)\n")
  L.append("| model | mode | params | momentum | params + momentum | vs float |")
  L.append("|---|---|---|---|---|---|")
  m20, m50 = R["mem20"], R["mem50"]
  for m in MODES:
    tot = m20[m]["params"] + m20[m]["momentum"]
    ftot = m20["float"]["params"] + m20["float"]["momentum"]
    L.append(f"| ResNet-20 (real trees) | {m} | {fmt_bytes(m20[m]['params'])}"
             f" | {fmt_bytes(m20[m]['momentum'])} | {fmt_bytes(tot)} | "
             f"{tot / ftot:.2f}x |")
  for m in ("float", "bsq"):
    tot = m50[m]["params"] + m50[m]["momentum"]
    ftot = m50["float"]["params"] + m50["float"]["momentum"]
    L.append(f"| ResNet-50 (memory_bytes, shapes) | {m} | "
             f"{fmt_bytes(m50[m]['params'])} | {fmt_bytes(m50[m]['momentum'])}"
             f" | {fmt_bytes(tot)} | {tot / ftot:.2f}x |")
  L.append(f"\nResNet-50 `memory_bytes` total (params, grads, momentum, batch "
           f"stats): bsq {fmt_bytes(m50['bsq']['total'])} vs float "
           f"{fmt_bytes(m50['float']['total'])}; activations not included.\n")

  L.append("## Targets\n")
  L.append("| target | measured | met |")
  L.append("|---|---|---|")
  if "bsq" in step_s and "float" in step_s:
    r = step_s["bsq"] / step_s["float"]
    L.append(f"| bsq step <= {TARGETS['bsq_over_float']:.2f}x float step | "
             f"{r:.3f}x | {'yes' if r <= TARGETS['bsq_over_float'] else 'NO'} |")
  else:
    L.append(f"| bsq step <= {TARGETS['bsq_over_float']:.2f}x float step | "
             f"{NA} | unknown |")
  for name, got in (("timing chunk", ratios), ("epoch's own chunk", own)):
    if not got:
      continue
    w = max(got.values())
    L.append(f"| epoch <= {TARGETS['epoch_over_steps']:.2f}x sum of its steps "
             f"at the {name} (worst of {', '.join(got)}) | {w:.3f}x | "
             f"{'yes' if w <= TARGETS['epoch_over_steps'] else 'NO'} |")
  if not ratios:
    L.append(f"| epoch <= {TARGETS['epoch_over_steps']:.2f}x sum of its steps"
             f" | {NA} | unknown |")
  L.append(f"| host pass < {TARGETS['host_pass_s']:.0f} s (ResNet-20) | "
           f"{host_med:.3f} s | "
           f"{'yes' if host_med < TARGETS['host_pass_s'] else 'NO'} |\n")

  L.append("## Trials: closing the gap to the PyTorch release\n")
  here = ", ".join(f"{m} {BATCH / s:.1f}" for m, s in step_s.items())
  L.append("The issue's figures (not measured here): the authors' PyTorch "
           "release trains BSQ ResNet-20 at about 290-310 images/s on a "
           "2-core CPU; a plain Flax float step reached about 175 images/s "
           f"there. Here (images/s): {here or NA}. The PyTorch reference "
           "below measures the gap on this machine.\n")
  L.append("Each trial is a fresh child process (float and bsq) run right "
           "after a baseline child with the defaults; compare within a row. "
           "A trial is XLA_FLAGS, or an environment variable: "
           "`BSQ_JAX_CONV=xla` puts back XLA's own convolution kernel "
           "gradient in place of the per-tap matrix products of "
           "`bsq_jax/conv.py` (a speed-up below 1 is what conv.py saves); "
           "`LD_PRELOAD=@tcmalloc` runs the child on that malloc "
           "(`bsq_jax/allocator.py` finds the library).\n")
  L.append("| trial | mode | baseline step (ms) | with trial (ms) | "
           "speed-up |")
  L.append("|---|---|---|---|---|")
  for flags, base, var in R.get("trials", []):
    if "error" in base or "error" in var:
      L.append(f"| `{flags}` | - | {base.get('error', 'ok')} | "
               f"{var.get('error', 'ok')} | failed |")
      continue
    for m in base["step_s"]:
      if m in var["step_s"]:
        b, v = base["step_s"][m], var["step_s"][m]
        L.append(f"| `{flags}` | {m} | {b * 1e3:.1f} | {v * 1e3:.1f} | "
                 f"{b / v:.3f}x |")
  if not R.get("trials"):
    L.append(f"| (none run) | | {NA} | {NA} | |")
  L.append("")
  L += reference_lines(R.get("reference", []))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(L))
  print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
  if ARGS.child:
    child(ARGS.child)
  else:
    main(ARGS)
