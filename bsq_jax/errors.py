"""Bad input ends a run with one line naming the field or file, exit 1."""

import contextlib
import sys

from bsq_jax.checkpoint import CheckpointError
from bsq_jax.config_check import ConfigError
from bsq_jax.data import DataError
from bsq_jax.stage_loop import Diverged

EXPECTED = (ConfigError, DataError, CheckpointError, Diverged,
            FileNotFoundError, KeyError, ValueError)


@contextlib.contextmanager
def one_line():
  """Turns expected errors into `error: <message>` on stderr and exit 1."""
  try:
    yield
  except EXPECTED as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
