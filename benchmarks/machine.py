"""What the benchmarks say about the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess

import jax


def machine() -> dict:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  return {"cpu": cpu, "cores": os.cpu_count(),
          "device": f"{jax.devices()[0].device_kind} x{jax.local_device_count()}",
          "jax": jax.__version__, "python": platform.python_version(),
          "load": load}


def busy_processes() -> list:
  """Other processes using CPU now (from `ps`), to tell if the box is shared."""
  try:
    out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"],
                         capture_output=True, text=True, check=False).stdout
  except OSError:
    return []
  busy = []
  for line in out.splitlines()[1:]:
    pid, pcpu, comm = line.split(None, 2)
    if (int(pid) != os.getpid() and comm.strip() != "ps"  # ps: this probe
        and float(pcpu) >= 20.0):
      busy.append(f"{comm} ({pcpu}%)")
  return busy
