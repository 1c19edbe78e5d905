"""Crash points for the kill-and-resume tests.

With ``BSQ_JAX_DIE_AT=<point>:<n>`` in the environment, the process sends
itself SIGKILL the n-th time it passes `<point>`, which is one of:

    step       after a dispatched chunk of train steps (mid-epoch)
    save       while an epoch's checkpoint is being written (async, torn)
    host_pass  right after a re-quantization that changed the precision,
               before anything of it is saved

SIGKILL leaves no chance to clean up, as with the OOM killer or a preempted
node. Unset (always, outside the tests), a point costs one environment lookup.
"""

import os
import signal

POINTS = ("step", "save", "host_pass")
_passed = {}


def point(name: str) -> None:
  spec = os.environ.get("BSQ_JAX_DIE_AT")
  if not spec:
    return
  where, _, count = spec.partition(":")
  if where not in POINTS:
    raise ValueError(f"BSQ_JAX_DIE_AT: expected <{'|'.join(POINTS)}>:<n>, "
                     f"got {spec!r}")
  if where == name:
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
      os.kill(os.getpid(), signal.SIGKILL)
