"""The library's entry point: a config and a workdir in, the summary table
out (`train_and_evaluate`, as Flax's examples name it).

What each stage starts from and leaves is bsq_jax/stages.py's; the epochs
of one stage (host pass, budget, checkpoints, records) are
bsq_jax/stage_loop.py's.
"""

from __future__ import annotations

from typing import Optional

from bsq_jax.stages import Run


def train_and_evaluate(config, workdir: str, command: Optional[str] = None) -> str:
  """Runs the config's stages in `workdir`; returns the summary table."""
  return Run(config, workdir, command).run()
