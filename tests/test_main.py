"""main.py as a user runs it: bad input is one line, exit 1, and an
untouched workdir; a changed setting never reuses a run; Ctrl-C is one line
and the same command resumes; a normal run shows its progress and table,
little else."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from filelock import FileLock

from bsq_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The hint main.py gives, one line, where tcmalloc is not installed.
TCMALLOC_HINT = "faster under tcmalloc"


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


def stderr_lines(result):
  """stderr's lines, the tcmalloc hint aside (absent where it is installed)."""
  return [l for l in result.stderr.strip().splitlines()
          if l.strip() and TCMALLOC_HINT not in l]


def last_line(result):
  lines = stderr_lines(result)
  return lines[-1] if lines else ""


def one_line_error(result, expect):
  """Exit 1 and nothing on stderr but `error: ...` naming `expect`."""
  assert result.returncode == 1, result.stderr[-2000:]
  lines = stderr_lines(result)
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert expect in lines[0], lines[0]
  return lines[0]


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
    # A target and an alpha both given: how to unset the alpha.
    (["--config.bsq.alpha=0.5", "--config.bsq.target_bits=3"],
     "unset alpha with --config.bsq.alpha=None"),
    # None parses (the error is the next one: two targets).
    (["--config.bsq.alpha=None", "--config.bsq.target_bits=3",
      "--config.bsq.target_kbytes=2"], "set at most one of the two targets"),
])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, args, expect):
  workdir = str(tmp_path / "run")
  one_line_error(run_main(*args, workdir=workdir), expect)
  assert not os.path.exists(workdir)


def run_bare(*args, cwd=ROOT):
  """`python main.py ARGS` (no config or workdir added)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args],
                        cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=300)


def test_empty_command_line_says_what_to_give():
  one_line_error(run_bare(), "--config=configs/smoke.py")


def test_misspelled_config_path_is_one_line():
  one_line_error(run_bare("--config=configs/smok.py"),
                 "--config=configs/smok.py: no such file; did you mean "
                 "configs/smoke.py?")


def test_misspelled_field_suggests_the_right_one():
  line = one_line_error(run_bare("--config=configs/smoke.py",
                                 "--config.bsq.alpah=1"),
                        "the config has no field 'alpah'")
  assert line == ("error: --config.bsq.alpah: the config has no field "
                  "'alpah'; did you mean 'alpha'?")


# -- one smoke run, shared -----------------------------------------------------

SMOKE = ("--config=configs/smoke.py", "--config.bsq.target_bits=3",
         "--config.stages=pretrain,convert,bsq,finetune")
SMOKE_DIR = os.path.join("workdirs", "smoke-bsq.target_bits=3.0")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """`python main.py SMOKE` with no --workdir, from a fresh folder: the
  README's target_bits on a config that sets alpha. Run once per session,
  pytest-xdist's workers share it (it is never changed: tests that add to it
  work on a copy). Returns (folder it ran in, its result)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  folder = base / "smoke_run"
  with FileLock(str(base / "smoke_run.lock")):
    if not (folder / "result.json").exists():
      folder.mkdir(exist_ok=True)
      r = run_bare(*(a.replace("=", f"={ROOT}/", 1)
                     if a.startswith("--config=") else a for a in SMOKE),
                   cwd=folder)
      r = {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
      (folder / "result.json").write_text(json.dumps(r))
  return folder, json.loads((folder / "result.json").read_text())


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_target_bits_wins_over_the_configs_alpha(smoke_run):
  """configs/smoke.py sets alpha 5; a target on the command line takes
  its place, in a workdir named after the override."""
  folder, result = smoke_run
  assert result["returncode"] == 0, result["stderr"][-3000:]
  workdir = folder / SMOKE_DIR
  config = json.loads((workdir / "config.json").read_text())
  assert config["bsq.alpha"] is None and config["bsq.target_bits"] == 3.0
  bsq = [r for r in records(workdir) if r["stage"] == "bsq"]
  assert bsq[-1]["budget_report"]["target"] == 3.0
  assert "| finetune |" in result["stdout"]


def test_a_normal_run_shows_progress_and_the_table(smoke_run):
  """stderr: a line naming the stages and the workdir, one per epoch
  (stage k of n, test accuracy, bits, an ETA for the run), one per host
  pass with the precisions, the budget's verdict and its warnings; no
  config dump, no library chatter. stdout: the table, in percent."""
  _, result = smoke_run
  lines = [l for l in result["stderr"].splitlines() if TCMALLOC_HINT not in l]
  assert len(lines) <= 12, result["stderr"]
  assert lines[0].startswith("4 stages (pretrain, convert, bsq, finetune) in "
                             f"{SMOKE_DIR}"), lines[0]
  assert all(l.startswith(("[", "warning: ")) for l in lines[1:]), lines
  assert "run eta" in lines[1]
  assert [l for l in lines if l.startswith("[3/4] bsq host pass after epoch "
                                           "1: ") and "conv1=" in l], lines
  for noise in ("tcmalloc", "libtpu", "batch_size", "read only", "orbax",
                "Traceback"):
    assert noise not in result["stderr"], noise
  table = result["stdout"].strip().splitlines()
  assert table[0] == "| stage | average bits | compression | test accuracy |"
  assert len(table) == 6 and all(row.endswith("% |") for row in table[2:])


def test_a_changed_setting_never_reuses_the_run(smoke_run, tmp_path):
  """The same workdir under another target: one line naming the field,
  and the workdir as it was."""
  folder, _ = smoke_run
  workdir = str(folder / SMOKE_DIR)
  before = snapshot(workdir)
  result = run_main("--config.bsq.target_bits=4", workdir=workdir)
  one_line_error(result, f"--workdir {workdir} holds a run of other "
                 "settings: bsq.target_bits (3.0 there, 4.0 here); use a new "
                 "--workdir")
  assert snapshot(workdir) == before


def test_more_finetune_epochs_continue_the_run(smoke_run, tmp_path):
  """finetune.epochs may grow (bsq_jax/settings.py EXTENDS): the finished
  stages are kept, finetune goes on from its epoch 1 to 2. Fewer epochs
  than the workdir holds are another run."""
  folder, _ = smoke_run
  workdir = str(tmp_path / "run")
  shutil.copytree(folder / SMOKE_DIR, workdir)
  before = records(workdir)
  result = run_main(*SMOKE[1:], "--config.finetune.epochs=2", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = stderr_lines(result)
  assert [l for l in lines if "finished earlier" in l][0].startswith(
      "[1/4] pretrain: finished earlier")
  assert "[4/4] finetune: resuming after epoch 1 of 2" in lines
  after = records(workdir)
  assert after[:len(before)] == before  # nothing redone
  assert [(r["stage"], r["epoch"]) for r in after[len(before):]] == [
      ("finetune", 2)]
  one_line_error(run_main(*SMOKE[1:], workdir=workdir),
                 "finetune.epochs (2 there, 1 here)")


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path):
  """SIGINT after the first epoch's line: one line saying what is saved
  and that the same command resumes; then it does, and every epoch is
  recorded once."""
  args = [sys.executable, "main.py", "--config=configs/smoke.py",
          f"--workdir={tmp_path / 'run'}", "--config.stages=pretrain",
          "--config.pretrain.epochs=3"]
  # A compile cache of its own: JAX writes cache files in place, and one cut
  # short by the interrupt must not reach the other tests' processes.
  env = dict(os.environ, PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if line.startswith("[1/1] pretrain epoch 1/3"):
      proc.send_signal(signal.SIGINT)
      break
  out, err = proc.communicate(timeout=300)
  lines = [l for l in seen + err.splitlines(True)
           if l.strip() and TCMALLOC_HINT not in l]
  assert proc.returncode == 130, "".join(lines)
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], lines
  assert errors[0].startswith("error: interrupted in stage pretrain: epoch ")
  assert "the same command resumes from there" in errors[0]
  assert "Traceback" not in "".join(lines) and out == ""
  resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[1/1] pretrain: resuming after epoch " in resumed.stderr
  assert [r["epoch"] for r in records(tmp_path / "run")] == [1, 2, 3]


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
  """A run.json of an earlier version (model, data and seed only) is still
  checked; --verbosity=0 shows the allocator's lines, quiet by default."""
  workdir = other_model_workdir(tmp_path)
  before = snapshot(str(workdir))
  result = run_main("--verbosity=0", workdir=str(workdir), env=_env())
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
  result = run_main("--verbosity=0", workdir=str(other_model_workdir(tmp_path)),
                    env=env)
  assert "holds a run of another model" in last_line(result)
  assert "restarting" not in result.stderr
  assert "malloc: tcmalloc" in result.stderr
  assert "faster under tcmalloc" not in result.stderr


@TCMALLOC
@pytest.mark.parametrize("args,env", [
    ([], {allocator.OPT_OUT: "0"}), (["--notcmalloc"], {})])
def test_opt_out_stays_on_the_default_malloc(tmp_path, args, env):
  result = run_main(*args, "--verbosity=0",
                    workdir=str(other_model_workdir(tmp_path)), env=_env(**env))
  assert "holds a run of another model" in last_line(result)
  assert "restarting" not in result.stderr
  assert "malloc: tcmalloc" not in result.stderr
  assert "faster under tcmalloc" not in result.stderr  # asked for: no hint


@TCMALLOC
def test_a_restart_that_did_not_load_tcmalloc_is_not_repeated(tmp_path):
  """As if the preload had failed: the restarted process warns and goes on."""
  result = run_main("--verbosity=0", workdir=str(other_model_workdir(tmp_path)),
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
