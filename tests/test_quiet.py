"""bsq_jax.data.quiet: TensorFlow's and tfds's start-up chatter stays off
stderr unless the user asks (TF_CPP_MIN_LOG_LEVEL below 2)."""

import logging
import os
import subprocess
import sys

import pytest

from bsq_jax.data import quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clean_env(monkeypatch):
  monkeypatch.delenv(quiet.LEVEL, raising=False)
  monkeypatch.delenv(quiet.ONEDNN, raising=False)


def test_quiet_defaults(clean_env):
  quiet.tensorflow_env()
  assert os.environ[quiet.LEVEL] == "3"
  assert os.environ[quiet.ONEDNN] == "0"


def test_a_users_variables_win(clean_env, monkeypatch):
  monkeypatch.setenv(quiet.LEVEL, "2")
  monkeypatch.setenv(quiet.ONEDNN, "1")
  quiet.tensorflow_env()
  assert os.environ[quiet.LEVEL] == "2" and os.environ[quiet.ONEDNN] == "1"


@pytest.mark.parametrize("level", ["0", "1"])
def test_asking_for_tf_logs_changes_nothing(clean_env, monkeypatch, level):
  monkeypatch.setenv(quiet.LEVEL, level)
  quiet.tensorflow_env()
  assert os.environ[quiet.LEVEL] == level
  assert quiet.ONEDNN not in os.environ
  record = logging.LogRecord("absl", logging.WARNING,
                             "/x/tensorflow_datasets/core/file_utils.py", 1,
                             "Variant folder", None, None)
  with quiet.tfds_lookup():
    assert logging.getLogger("absl").filter(record)


def test_tfds_lookup_drops_only_tfds_chatter_and_only_within(clean_env):
  absl_logger = logging.getLogger("absl")

  def record(path, level=logging.WARNING):
    return logging.LogRecord("absl", level, path, 1, "m", None, None)

  tfds_warning = record("/x/tensorflow_datasets/core/utils/file_utils.py")
  with quiet.tfds_lookup():
    assert not absl_logger.filter(tfds_warning)
    assert absl_logger.filter(record("/x/tensorflow_datasets/a.py",
                                     logging.ERROR))
    assert absl_logger.filter(record("/work/bsq_jax/train.py"))
  assert absl_logger.filter(tfds_warning)


def test_loading_cifar_says_only_its_error(tmp_path):
  """A fresh interpreter (TensorFlow's notices come at its first import):
  tfds's lookup of an unprepared CIFAR-10 prints nothing but the error."""
  script = ("import sys\n"
            "from bsq_jax.data import DataError, cifar\n"
            "try:\n"
            "  cifar.load('cifar10', data_dir=sys.argv[1], download=False)\n"
            "except DataError as e:\n"
            "  print(e)\n")
  env = {k: v for k, v in os.environ.items()
         if k not in (quiet.LEVEL, quiet.ONEDNN)}
  env["PYTHONPATH"] = REPO
  result = subprocess.run([sys.executable, "-c", script,
                           str(tmp_path / "tfds")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert "cifar-10-binary.tar.gz does not exist" in result.stdout, (
      result.stdout + result.stderr)
  assert result.stderr == ""
