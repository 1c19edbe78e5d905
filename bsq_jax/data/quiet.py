"""TensorFlow and tfds kept quiet unless the user asks for their logs.

TensorFlow is here only to read datasets, yet importing it prints notices a
user did not ask for (tensorflow 2.21 on CPU, twice, one per native library):

    WARNING: All log messages before absl::InitializeLog() is called are ...
    I0000 ... port.cc:153] oneDNN custom operations are on. You may see ...

and tfds, looking for a dataset that is not prepared yet, adds an absl
warning ("Variant folder .../cifar10/3.0.2 has no dataset_info.json").

`tensorflow_env()`, called before TensorFlow is imported, sets
TF_CPP_MIN_LOG_LEVEL=3 (TF's C++ INFO/WARNING/ERROR lines off) and
TF_ENABLE_ONEDNN_OPTS=0 (the oneDNN notice is logged before TF reads its log
level, so only turning oneDNN's custom kernels off stops it; they change
TF's math kernels, which no data path here uses). A variable the user set
keeps its value. `tfds_lookup()` drops tfds's INFO/WARNING records while it
looks for a prepared dataset; preparing and downloading still log.

To see everything again: TF_CPP_MIN_LOG_LEVEL=0 (or 1). With a level below
2 set, neither function changes anything.
"""

from __future__ import annotations

import contextlib
import logging
import os

LEVEL = "TF_CPP_MIN_LOG_LEVEL"
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def wanted() -> bool:
  """Whether the user asked for TensorFlow's logs (TF_CPP_MIN_LOG_LEVEL < 2)."""
  return os.environ.get(LEVEL, "").strip() in ("0", "1")


def tensorflow_env() -> None:
  """Quiet defaults for TensorFlow's start-up; call before importing it."""
  if wanted():
    return
  os.environ.setdefault(LEVEL, "3")
  os.environ.setdefault(ONEDNN, "0")


class _DropTfdsChatter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.ERROR
            or "tensorflow_datasets" not in record.pathname)


@contextlib.contextmanager
def tfds_lookup():
  """Within: tfds's absl INFO/WARNING records are dropped (unless wanted())."""
  if wanted():
    yield
    return
  absl_logger = logging.getLogger("absl")
  drop = _DropTfdsChatter()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)
