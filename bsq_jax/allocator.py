"""Which malloc the process runs on, and where tcmalloc / jemalloc live.

On 2-core CPU machines the ResNet-20 train step took 1.3-1.5x less time
under tcmalloc (`LD_PRELOAD`), and short whole runs 1.36x
(results/speed.md, results/allocator_run.md). An allocator can only be
preloaded before the process starts, so main.py starts itself again under
it (`restart_env`, then `os.execve`) before it imports JAX: on Linux, when
JAX will run on the CPU, tcmalloc is installed and not loaded. Opt out with
`BSQ_JAX_TCMALLOC=0` (or main.py's `--notcmalloc`). The restarted process
carries `BSQ_JAX_TCMALLOC_RESTARTED=1`, so it never restarts again.
`hint()` is the line main.py logs on CPU when it runs without tcmalloc.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, Optional, Tuple

OPT_OUT = "BSQ_JAX_TCMALLOC"            # "0": stay on the default malloc
RESTARTED = "BSQ_JAX_TCMALLOC_RESTARTED"  # set in the restarted process

# Debian/Ubuntu package names and the files they install, by allocator.
LIBRARIES = {
    "tcmalloc": ("libtcmalloc-minimal4", ("libtcmalloc_minimal.so.4",
                                          "libtcmalloc.so.4")),
    "jemalloc": ("libjemalloc2", ("libjemalloc.so.2",)),
}
_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find(name: str) -> Optional[str]:
  """Path of the allocator's shared library, or None if not installed."""
  for directory in _DIRS:
    for lib in LIBRARIES[name][1]:
      hits = sorted(glob.glob(f"{directory}/{lib}"))
      if hits:
        return hits[0]
  return None


def loaded(name: str, maps: str = "/proc/self/maps") -> bool:
  """Whether this process has the allocator mapped (False if unknown)."""
  try:
    with open(maps) as f:
      return any(name in line for line in f)
  except OSError:
    return False


def hint() -> Optional[str]:
  """A one-line suggestion to run under tcmalloc, or None if it is loaded
  (or this is not Linux, where LD_PRELOAD and the packages differ)."""
  if not sys.platform.startswith("linux") or loaded("tcmalloc"):
    return None
  path = find("tcmalloc")
  how = (f"LD_PRELOAD={path} python main.py ..." if path else
         f"apt-get install {LIBRARIES['tcmalloc'][0]}, then "
         f"LD_PRELOAD=<its libtcmalloc_minimal.so.4> python main.py ...")
  return ("CPU steps ran 1.3-1.5x faster under tcmalloc in "
          f"results/speed.md; to use it: {how}")


def _accelerator_installed() -> bool:
  """Whether a JAX accelerator plugin (CUDA, ROCm) or libtpu is installed,
  found without importing JAX."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  spec = importlib.util.find_spec("jax_plugins")
  return bool(spec and spec.submodule_search_locations and
              any(pkgutil.iter_modules(spec.submodule_search_locations)))


def jax_on_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or it
  is unset and no accelerator plugin is installed."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_installed()


def restart_env(environ: Mapping[str, str]) -> Tuple[Optional[dict], str]:
  """(environment to restart the process with under tcmalloc, or None; why).

  None when: not Linux, opted out (`BSQ_JAX_TCMALLOC=0`), already restarted
  once, tcmalloc loaded, not installed, or JAX will not run on the CPU.
  """
  if not sys.platform.startswith("linux"):
    return None, "not Linux"
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return None, f"{OPT_OUT}={environ[OPT_OUT]}"
  if loaded("tcmalloc"):
    return None, "tcmalloc loaded"
  if environ.get(RESTARTED):
    return None, ("restarted once under LD_PRELOAD="
                  f"{environ.get('LD_PRELOAD', '')}, but tcmalloc is not loaded")
  path = find("tcmalloc")
  if path is None:
    return None, "tcmalloc not installed"
  if not jax_on_cpu(environ):
    return None, "JAX runs on an accelerator"
  env = dict(environ)
  env["LD_PRELOAD"] = " ".join(p for p in (path, environ.get("LD_PRELOAD", ""))
                               if p)
  env[RESTARTED] = "1"
  return env, f"LD_PRELOAD={path}"


def restart_under_tcmalloc(log=None) -> str:
  """Replaces this process with the same command under tcmalloc where
  `restart_env` says so (then it does not return); else returns why not."""
  env, why = restart_env(os.environ)
  if env is None:
    return why
  if log:
    log(f"restarting under tcmalloc ({why}; {OPT_OUT}=0 to stay on the "
        "default malloc)")
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
  return why  # not reached


def note(no_restart: str) -> Optional[Tuple[bool, str]]:
  """main.py's one line on CPU, (is a warning, text): tcmalloc in use, why
  the restart under it did not take, or how to get it; None when opted out.
  `no_restart` is what `restart_under_tcmalloc` returned."""
  if loaded("tcmalloc"):
    return False, "malloc: tcmalloc"
  if no_restart.startswith("restarted once"):
    return True, f"malloc: {no_restart}; running on the default malloc"
  if no_restart.startswith(("--notcmalloc", OPT_OUT)):
    return None
  line = hint()
  return (True, line) if line else None
