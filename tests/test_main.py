"""main.py refuses bad input with one line, exit 1, and an untouched workdir."""

import json
import os
import subprocess
import sys

import pytest

from bsq_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, workdir, env=None):
  env = dict(env or os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, "main.py", "--config=configs/smoke.py",
       f"--workdir={workdir}", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)


def snapshot(path):
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def last_line(result):
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


@pytest.mark.parametrize("args,expect", [
    (["--config.bsq.no_such_field=1"], "no_such_field"),
    (["--config.bsq.alpha=-0.5"], "config.bsq.alpha: expected >= 0"),
    (["--config.batch_size=100"], "config.batch_size: 100 does not split evenly"),
    (["--config.data.name=fashion_mnist",
      "--config.data.fashion_mnist_dir=/nonexistent/fmnist",
      "--config.model.channels=1"], "/nonexistent/fmnist"),
    (["--config.model.depth=21"], "config.model.depth"),
    (["--coordinator_address=127.0.0.1:1"],
     "--coordinator_address needs --num_processes and --process_id"),
])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, args, expect):
  workdir = str(tmp_path / "run")
  result = run_main(*args, workdir=workdir)
  assert result.returncode != 0
  assert expect in last_line(result), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)


def other_model_workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "run.json").write_text(json.dumps(
      {"model": {"name": "cifar_resnet", "depth": 56}, "data": "cifar10",
       "seed": 0}))
  (workdir / "metrics.jsonl").write_text('{"stage": "bsq", "epoch": 3}\n')
  return workdir


def _env(**changes):
  """os.environ without LD_PRELOAD and the allocator switches, then `changes`."""
  env = {k: v for k, v in os.environ.items() if k not in (
      "LD_PRELOAD", allocator.OPT_OUT, allocator.RESTARTED)}
  return {**env, **changes}


def test_workdir_of_another_model_is_kept(tmp_path):
  workdir = other_model_workdir(tmp_path)
  before = snapshot(str(workdir))
  result = run_main(workdir=str(workdir), env=_env())
  assert result.returncode == 1
  assert "holds a run of another model" in last_line(result)
  assert "Traceback" not in result.stderr
  assert snapshot(str(workdir)) == before
  if allocator.find("tcmalloc"):
    # On CPU main.py starts itself again under tcmalloc, once, and the
    # restarted process (which wrote the error above) has it loaded.
    assert result.stderr.count("restarting under tcmalloc") == 1
    assert "malloc: tcmalloc" in result.stderr
  else:  # it says how to run faster (one line)
    assert "faster under tcmalloc" in result.stderr


TCMALLOC = pytest.mark.skipif(allocator.find("tcmalloc") is None,
                              reason="tcmalloc not installed (.ci/run installs it)")


@TCMALLOC
def test_no_restart_under_tcmalloc(tmp_path):
  env = _env(LD_PRELOAD=allocator.find("tcmalloc"))
  result = run_main(workdir=str(other_model_workdir(tmp_path)), env=env)
  assert "holds a run of another model" in last_line(result)
  assert "restarting" not in result.stderr
  assert "malloc: tcmalloc" in result.stderr
  assert "faster under tcmalloc" not in result.stderr


@TCMALLOC
@pytest.mark.parametrize("args,env", [
    ([], {allocator.OPT_OUT: "0"}), (["--notcmalloc"], {})])
def test_opt_out_stays_on_the_default_malloc(tmp_path, args, env):
  result = run_main(*args, workdir=str(other_model_workdir(tmp_path)),
                    env=_env(**env))
  assert "holds a run of another model" in last_line(result)
  assert "restarting" not in result.stderr
  assert "malloc: tcmalloc" not in result.stderr
  assert "faster under tcmalloc" not in result.stderr  # asked for: no hint


@TCMALLOC
def test_a_restart_that_did_not_load_tcmalloc_is_not_repeated(tmp_path):
  """As if the preload had failed: the restarted process warns and goes on."""
  result = run_main(workdir=str(other_model_workdir(tmp_path)),
                    env=_env(**{allocator.RESTARTED: "1"}))
  assert "holds a run of another model" in last_line(result)
  assert "restarting" not in result.stderr
  assert "running on the default malloc" in result.stderr


def test_main_called_in_process_never_restarts(tmp_path, monkeypatch, capsys):
  """Only `python main.py` restarts under tcmalloc: a caller of main() (a
  test, a notebook) must not be replaced by a new process."""
  import main as main_py  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"execve{a[:2]}"))
  for name in (allocator.OPT_OUT, allocator.RESTARTED, "LD_PRELOAD"):
    monkeypatch.delenv(name, raising=False)
  argv = ["main.py", "--config=configs/smoke.py",
          f"--workdir={tmp_path / 'run'}", "--config.model.depth=21"]
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "argv", argv)
  for name in [n for n in main_py.FLAGS if n.startswith("config.")]:
    delattr(main_py.FLAGS, name)
  main_py.FLAGS.unparse_flags()
  with pytest.raises(SystemExit):
    main_py.parse_flags(argv)
    main_py.main(argv[:1])
  assert "config.model.depth" in capsys.readouterr().err
