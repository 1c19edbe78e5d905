"""Which malloc the process runs on, and where tcmalloc / jemalloc live.

On 2-core CPU machines the ResNet-20 train step took 1.3-1.5x less time
under tcmalloc (`LD_PRELOAD`), and short whole runs 1.36x
(results/speed.md, results/allocator_run.md). An allocator can only be
preloaded before the process starts, so bsq_jax does not switch it itself:
`hint()` is the line main.py logs on CPU when tcmalloc is not loaded.
"""

from __future__ import annotations

import glob
import sys
from typing import Optional

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
