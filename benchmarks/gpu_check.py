"""The steps of benchmarks/gpu_check.sh that run Python (one subcommand each).

    python benchmarks/gpu_check.py versions --out DIR
    python benchmarks/gpu_check.py bench    --out DIR [--dry-run] [--budget-s S]
    python benchmarks/gpu_check.py pipeline --out DIR --fashion-dir D [--dry-run]
    python benchmarks/gpu_check.py report   --out DIR --command "..."

Each step writes a JSON file into DIR (rewritten as it goes, so a step cut
short by its time limit still leaves what it measured); `report` turns them
and the logs into DIR/gpu.md (the layout of results/gpu.md). `--dry-run`
runs the same code at tiny sizes, for CPU (tests/test_gpu_check.py).

jax 0.10.2 (the pins) and 0.11.2 (the GPU machine's): this file uses only
APIs that both have (`jax.devices`, `Device.memory_stats`, `device_kind`,
`jax.block_until_ready`); `Device.memory_stats()` returns None on CPU, which
the report shows as "n/a".
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ResNet-20 at batch 128 on 50,000 CIFAR-sized images: 390 steps per epoch,
# run as 3 rolled-scan dispatches of 130 steps (one compile; 100 would need a
# second one for the last 90). The dry run: ResNet-8 (width 4), 6 steps of 16.
SIZES = {
    "gpu": dict(depth=20, width=16, batch=128, epoch_steps=390, chunk=130,
                epochs=2, step_steps=30),
    "dry": dict(depth=8, width=4, batch=16, epoch_steps=6, chunk=3,
                epochs=1, step_steps=4),
}
MODES = ("float", "finetune", "bsq")  # bsq last: its peak memory is the largest
DRY_MODES = ("bsq",)  # the same code for every mode: the dry run times one
DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
GOAL_EPOCH_S = 2.0  # issue 18: a ResNet-20 BSQ epoch of 50,000 images, one H200
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
            "optax", "orbax-checkpoint", "chex", "numpy", "ml_collections",
            "tensorboardX", "absl-py")


def _write(out: str, name: str, data) -> None:
  tmp = os.path.join(out, name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, os.path.join(out, name))


def _read(out: str, name: str):
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# -- versions ----------------------------------------------------------------

def versions(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  pkgs = {}
  for name in PACKAGES:
    try:
      pkgs[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  smi = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
       "--format=csv,noheader"], capture_output=True, text=True,
      check=False) if _which("nvidia-smi") else None
  info = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"),
          "python": platform.python_version(), "packages": pkgs,
          "backend": jax.default_backend(),
          "devices": [f"{d.id}: {d.device_kind} ({d.platform})"
                      for d in jax.devices()],
          "nvidia_smi": smi.stdout.strip() if smi else "not found",
          "cpu_cores": os.cpu_count()}
  _write(args.out, "versions.json", info)
  print(json.dumps(info, indent=1))


def _which(cmd: str) -> bool:
  return any(os.access(os.path.join(p, cmd), os.X_OK)
             for p in os.environ.get("PATH", "").split(os.pathsep))


# -- bench -------------------------------------------------------------------

def _memory(device) -> dict:
  stats = device.memory_stats()  # None on CPU
  if not stats:
    return {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use",
                                "bytes_limit") if k in stats}


def _epoch_s(trainer, state, data, epoch, chunk):
  """One epoch as StageLoop._epoch drives it (metrics read after every chunk)."""
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  loss = 0.0
  for state, _, sums in trainer.train_epoch(state, data, 0, epoch, chunk):
    loss += float(jax.device_get(sums["loss"]))
  jax.block_until_ready(state)
  return state, time.perf_counter() - t0, loss


def bench(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import speed  # pylint: disable=import-outside-toplevel
  from bsq_jax import scheme as sch  # pylint: disable=import-outside-toplevel
  from bsq_jax.epoch import put_dataset  # pylint: disable=import-outside-toplevel
  z = SIZES["dry" if args.dry_run else "gpu"]
  deadline = time.perf_counter() + args.budget_s
  cfg = dict(speed.CFG, depth=z["depth"], width=z["width"])
  rng = np.random.default_rng(0)
  n = z["batch"] * z["epoch_steps"]
  mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n)
  data = put_dataset(images, labels, mean, std)
  few = z["batch"] * z["step_steps"]
  step_data = put_dataset(images[:few], labels[:few], mean, std)
  R = {"sizes": z, "model": cfg, "modes": {}, "skipped": [],
       "device": jax.devices()[0].device_kind, "count": jax.device_count()}
  device = jax.local_devices()[0]
  t = time.perf_counter()
  scans, _ = speed.setup(None, cfg, z["batch"], bits=8, loop="scan",
                         chunk_steps=z["chunk"])
  steps, bparams = speed.setup(None, cfg, z["batch"], bits=8, loop="straight",
                               chunk_steps=1, cpu_chunk_steps=1)
  R["setup_s"] = time.perf_counter() - t
  _write(args.out, "bench.json", R)
  longest = 0.0
  for mode in DRY_MODES if args.dry_run else MODES:
    if time.perf_counter() + 1.5 * longest > deadline:
      R["skipped"].append(f"{mode}: time budget ({args.budget_s:.0f} s)")
      continue
    t_mode = time.perf_counter()
    r = R["modes"][mode] = {}
    trainer, state = scans[mode]
    state, first, _ = _epoch_s(trainer, state, data, 0, z["chunk"])
    r["first_epoch_s"] = first
    r["epoch_s"] = []
    for e in range(z["epochs"]):
      state, s, loss = _epoch_s(trainer, state, data, e + 1, z["chunk"])
      r["epoch_s"].append(s)
      r["loss"] = loss
    r["compile_s"] = first - min(r["epoch_s"])
    r["scan_traces"] = trainer.traces
    _write(args.out, "bench.json", R)
    # The step: one step per dispatch (straight-line trainer), timed alone.
    trainer, state = steps[mode]
    state, times, _ = speed.run_epoch(trainer, state, step_data, 0, 1)
    r["step_compile_s"] = times[0] - statistics.median(times[1:])
    r["step_s"] = statistics.median(times[1:])
    if mode == "bsq":
      times = []
      for _ in range(3):
        t = time.perf_counter()
        sch.requantize_params(state.params)
        times.append(time.perf_counter() - t)
      r["host_pass_s"] = statistics.median(times)
    del state
    gc.collect()
    r["memory"] = _memory(device)
    longest = time.perf_counter() - t_mode
    r["mode_s"] = longest
    _write(args.out, "bench.json", R)
    print(f"{mode}: {json.dumps(r, default=str)}", flush=True)
  R["params_bytes"] = {"bsq": speed._nbytes(bparams)}  # pylint: disable=protected-access
  _write(args.out, "bench.json", R)


# -- pipeline ----------------------------------------------------------------

# A short real run of every stage. chunk_steps 117 = 468 / 4: an epoch of
# 60,000 images at batch 128 in 4 equal dispatches, one compile per trainer.
PIPELINE = {
    "gpu": ["--config.data.train_subset=0", "--config.chunk_steps=117",
            "--config.stages=pretrain,convert,bsq,finetune,scratch,uniform",
            "--config.pretrain.epochs=2", "--config.bsq.epochs=2",
            "--config.bsq.requant_interval=2", "--config.finetune.epochs=1"],
    # Made-up IDX files (64 training, 32 test images) unless --fashion-dir.
    "dry": ["--config.data.train_subset=0", "--config.chunk_steps=2",
            "--config.cpu_chunk_steps=2", "--config.batch_size=16",
            "--config.eval_batch_size=16", "--config.model.depth=8",
            "--config.model.width=4", "--config.xla_fast_compile=True",
            "--config.stages=pretrain,convert,bsq,finetune",
            "--config.pretrain.epochs=1", "--config.bsq.epochs=1",
            "--config.bsq.requant_interval=1", "--config.finetune.epochs=1"],
}


def _fake_fashion_mnist() -> str:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from fake_fmnist import write_fmnist  # pylint: disable=import-outside-toplevel
  folder = tempfile.mkdtemp(prefix="gpu_check_fmnist_")
  write_fmnist(folder, n_train=64, n_test=32)
  return folder
_LOG = re.compile(r"^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d+)\s+\d+ \S+:\d+\] (.*)$")


def log_times(lines, year: int):
  """(seconds, message) of each absl log line, from its time stamp."""
  out = []
  for line in lines:
    m = _LOG.match(line)
    if m:
      stamp = datetime.strptime(f"{year}{m.group(1)} {m.group(2)}",
                                "%Y%m%d %H:%M:%S.%f")
      out.append((stamp.timestamp(), m.group(3)))
  return out


def stage_times(events, t_start: float, t_end: float) -> dict:
  """Wall seconds per stage, from main.py's `stage NAME` lines; `startup`
  is the time before the first stage (imports, data onto the device)."""
  starts = [(t, msg.split()[1]) for t, msg in events
            if re.fullmatch(r"stage \w+", msg)]
  out = {"startup": (starts[0][0] if starts else t_end) - t_start}
  for i, (t, name) in enumerate(starts):
    out[name] = (starts[i + 1][0] if i + 1 < len(starts) else t_end) - t
  return out


def epoch_lines(events) -> list:
  """main.py's per-epoch lines with seconds since the previous line of this
  kind (the first of a stage counts from the stage's start: compile too).
  Matched by message, not by the module that logs it (stages.py and
  stage_loop.py since the split of train.py)."""
  out, last = [], None
  for t, msg in events:
    if re.fullmatch(r"stage \w+", msg):
      last = t
    elif re.match(r"\w+ epoch \d+:", msg):
      out.append({"s": t - last if last else None, "line": msg[:90]})
      last = t
  return out


def pipeline(args) -> None:
  flags = PIPELINE["dry" if args.dry_run else "gpu"]
  fashion = args.fashion_dir or (
      _fake_fashion_mnist() if args.dry_run else DEFAULT_FASHION)
  # Not under --out: the checkpoints would come back with the report.
  workdir = os.path.join(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"),
                         "fmnist_run")
  # --verbosity=0: the absl log lines that stage_times and epoch_lines read.
  cmd = [sys.executable, "main.py", "--config=configs/fashion_mnist_resnet20.py",
         f"--workdir={workdir}", f"--config.data.fashion_mnist_dir={fashion}",
         "--verbosity=0", *flags]
  R = {"command": " ".join(cmd[1:]), "python": "python"}
  _write(args.out, "pipeline.json", R)
  t_start = time.time()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = proc.communicate(timeout=args.budget_s)
    code = proc.returncode
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
    code = f"killed after its {args.budget_s:.0f} s budget"
  t_end = time.time()
  with open(os.path.join(args.out, "pipeline.log"), "w") as f:
    f.write(stdout + stderr)
  events = log_times(stderr.splitlines(), datetime.now().year)
  R.update(returncode=code, wall_s=t_end - t_start,
           stages=stage_times(events, t_start, t_end),
           epochs=epoch_lines(events),
           table=stdout.strip() if code == 0 else "",
           error=(stderr.strip().splitlines() or [""])[-1] if code else "")
  _write(args.out, "pipeline.json", R)
  print(json.dumps(R, indent=1))


# -- report ------------------------------------------------------------------

TEST_STATUS = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def test_counts(log: str) -> dict:
  """Outcomes per status from a `pytest -v` log, read line by line (so a
  run stopped by its time limit still counts what finished)."""
  counts, failed, collected = {}, [], None
  for line in log.splitlines():
    # "collected 42 items / 30 deselected / 12 selected", or xdist's
    # "4 workers [12 items]" (already net of the deselected).
    m = re.search(r"collected (\d+) items?(?: / \d+ deselected / (\d+) selected)?"
                  r"|\d+ workers \[(\d+) items?\]", line)
    if m:
      collected = int(m.group(2) or m.group(1) or m.group(3))
    s = TEST_STATUS.search(line)
    if s and "::" in line and not line.startswith(("FAILED ", "ERROR ")):
      counts[s.group(1)] = counts.get(s.group(1), 0) + 1
      if s.group(1) in ("FAILED", "ERROR"):
        failed.append(next(w for w in line.split() if "::" in w))
  return {"counts": counts, "failed": failed, "collected": collected}


def _ms(s):
  return f"{s * 1e3:.1f}" if isinstance(s, (int, float)) else "-"


def _s(s, digits=2):
  return f"{s:.{digits}f}" if isinstance(s, (int, float)) else "-"


def bench_lines(B) -> list:
  if not B:
    return ["Not run.", ""]
  z = B["sizes"]
  L = [f"ResNet-{z['depth']} (width {z['width']}), batch {z['batch']}, "
       f"{B['device']} x{B['count']}; dataset on the device "
       f"({z['batch'] * z['epoch_steps']} random CIFAR-sized images), "
       f"bsq at 8 bits in every layer. Epoch = {z['epoch_steps']} steps "
       f"through the rolled scan, {z['epoch_steps'] // z['chunk']} dispatches "
       f"of {z['chunk']} steps, metrics read after each (as `main.py`); "
       f"best of {z['epochs']} after the first. Step = one step per dispatch "
       f"(the straight-line trainer), median of {z['step_steps'] - 1}. "
       f"Compile = first epoch (or step) minus a steady one. Peak memory: "
       f"the process's peak so far, modes run in the order "
       f"{', '.join(MODES)}.", "",
       "| mode | step (ms) | epoch (s) | images/s | epoch / (steps x step) | "
       "epoch / float epoch | compile: epoch, step (s) | host pass (s) | "
       "peak GPU memory (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
  modes = B["modes"]
  fl = min(modes["float"]["epoch_s"]) if "float" in modes else None
  for mode in ("float", "bsq", "finetune"):
    r = modes.get(mode)
    if not r or not r.get("epoch_s"):
      L.append(f"| {mode} | not measured | | | | | | | |")
      continue
    ep = min(r["epoch_s"])
    step = r.get("step_s")
    peak = r.get("memory", {}).get("peak_bytes_in_use")
    L.append(
        f"| {mode} | {_ms(step)} | {_s(ep, 3)} | "
        f"{z['batch'] * z['epoch_steps'] / ep:.0f} | "
        f"{_s(ep / (z['epoch_steps'] * step), 3) if step else '-'} | "
        f"{_s(ep / fl, 3) if fl else '-'} | {_s(r['compile_s'], 1)}, "
        f"{_s(r.get('step_compile_s'), 1)} | {_s(r.get('host_pass_s'), 3)} | "
        f"{_s(peak / 2**20, 0) if peak else 'n/a'} |")
  bsq = modes.get("bsq", {})
  if bsq.get("epoch_s") and z["depth"] == 20:
    ep = min(bsq["epoch_s"])
    L += ["", f"Goal: a BSQ epoch of 50,000 images under {GOAL_EPOCH_S:.0f} s: "
          f"{'met' if ep < GOAL_EPOCH_S else 'not met'} ({ep:.3f} s)."]
  L += [f"\nSkipped: {'; '.join(B['skipped'])}." if B["skipped"] else "", ""]
  return L


def pipeline_lines(P) -> list:
  if not P:
    return ["Not run.", ""]
  L = [f"    {P['python']} {P['command']}", "",
       f"Exit status {P.get('returncode', '-')}, wall {_s(P.get('wall_s'), 1)} s"
       + (f"; last line: `{P['error']}`" if P.get("error") else "") + ".", "",
       "| part | wall (s) |", "|---|---|"]
  L += [f"| {k} | {_s(v, 1)} |" for k, v in P.get("stages", {}).items()]
  if P.get("epochs"):
    L += ["", "Epoch lines (seconds since the previous one; a stage's first "
          "includes its compile and the evaluation):", ""]
    L += [f"    {_s(e['s'], 1):>6} s  {e['line']}" for e in P["epochs"]]
  if P.get("table"):
    L += ["", "Final table:", "", P["table"]]
  return L + [""]


def report(args) -> None:
  V = _read(args.out, "versions.json") or {}
  T = {}
  if os.path.exists(os.path.join(args.out, "tests.log")):
    with open(os.path.join(args.out, "tests.log")) as f:
      T = test_counts(f.read())
  L = ["# GPU check (benchmarks/gpu_check.sh)", "",
       f"Run {V.get('date', '?')} with:", "", f"    {args.command}", "",
       "## Machine and versions", "",
       f"- devices ({V.get('backend', '?')}): {', '.join(V.get('devices', []))}",
       f"- nvidia-smi: {V.get('nvidia_smi', '?')}",
       f"- CPU cores: {V.get('cpu_cores', '?')}; Python {V.get('python', '?')}",
       "- " + ", ".join(f"{k} {v}" for k, v in V.get("packages", {}).items()),
       "", "## Tests on this device", ""]
  if T:
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(T["counts"].items()))
    L += [f"Selection: `{args.tests}`.", "",
          f"{counts or 'nothing finished'} (of {T['collected'] or '?'} "
          f"selected)" + ("; stopped by its time limit" if args.tests_timed_out
                           else "") + ".", ""]
    L += [f"- failed: `{t}`" for t in T["failed"]]
  else:
    L += ["Not run."]
  L += ["", "## Train step and epoch", ""] + bench_lines(
      _read(args.out, "bench.json"))
  L += ["## Fashion-MNIST through main.py", ""] + pipeline_lines(
      _read(args.out, "pipeline.json"))
  with open(os.path.join(args.out, "gpu.md"), "w") as f:
    f.write("\n".join(L).rstrip() + "\n")
  print("\n".join(L))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("step", choices=("versions", "bench", "pipeline", "report"))
  p.add_argument("--out", required=True)
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("--budget-s", type=float, default=600)
  p.add_argument("--fashion-dir", default=None, help="the four IDX files "
                 f"(default {DEFAULT_FASHION}; --dry-run: made-up ones)")
  p.add_argument("--workdir", default=None, help="pipeline: where its run "
                 "folder goes (default: --out)")
  p.add_argument("--command", default="")
  p.add_argument("--tests", default="")
  p.add_argument("--tests-timed-out", action="store_true")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  {"versions": versions, "bench": bench, "pipeline": pipeline,
   "report": report}[args.step](args)


if __name__ == "__main__":
  main()
