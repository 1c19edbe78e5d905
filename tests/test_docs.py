"""The commands that README.md and docs/*.md show cannot drift from the code.

Every command in a code block or an inline code span is found and checked
against what it calls: a `main.py` command is parsed by main.py's own flags
(the config file, every override, a value of the wrong type) and its config
checked by `config_check`, as main.py does before it touches a workdir; a
script's or module's flags must be in its `--help`, a choice among its
choices; `pip` and `apt-get` lines must agree with requirements.txt and
.ci/run; the files they name must exist. The README's quick start (every
stage on synthetic data, export, inspect) is run as written, paths moved
into a temporary folder. Long runs (the paper's 350 epochs, ImageNet) are
checked, not run.
"""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from typing import List

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PROGRAMS = ("python", "python3", "pip", "pytest", "apt-get", "bash")
# pytest options whose next word is their value, not a test path.
PYTEST_VALUED = ("-n", "-k", "-m", "-p", "-o", "--dist", "--durations")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _code_lines(text: str) -> List[str]:
  """The lines of indented (4 spaces, after a blank line) and fenced code
  blocks, backslash continuations joined, and the inline code spans."""
  found, block, fence, prev_blank = [], [], False, True
  for line in text.splitlines() + [""]:
    if line.strip().startswith("```"):
      fence = not fence
    elif fence or (line.startswith("    ") and (prev_blank or block)):
      block.append(line[4:] if line.startswith("    ") else line)
    else:
      found += _join_continuations(block)
      block = []
      found += INLINE_CODE.findall(line)
    prev_blank = not line.strip()
  return found


def _join_continuations(lines: List[str]) -> List[str]:
  out = []
  for line in lines:
    if out and out[-1].endswith("\\"):
      out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
    else:
      out.append(line.strip())
  return out


def commands(text: str) -> List[List[str]]:
  """Every shown command as words: `a && b` is two, leading environment
  assignments and /usr/bin/time are dropped."""
  out = []
  for line in _code_lines(text):
    try:
      words = shlex.split(line, comments=True)
    except ValueError:  # program output or prose with a lone quote
      continue
    part: List[str] = []
    for w in words + ["&&"]:
      if w != "&&":
        part.append(w)
        continue
      while part and (ENV_ASSIGNMENT.match(part[0]) or part[0] == "/usr/bin/time"):
        part = part[1:]
      if part and part[0] in PROGRAMS and "..." not in part:
        out.append(part)
      part = []
  return out


def documented():
  """(doc, words) of every command, each once per document."""
  out = []
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for words in commands(f.read()):
        if (doc, words) not in out:
          out.append((doc, words))
  return out


DOCUMENTED = documented()


def test_the_commands_are_found():
  """The extraction itself: the README's two set-up commands and commands
  of every kind are among those found."""
  shown = [" ".join(w) for _, w in DOCUMENTED]
  for want in ("pip install -r requirements.txt", "pytest",
               "python main.py --config=configs/cifar_resnet20.py",
               "apt-get install -y dataset-fashion-mnist libtcmalloc-minimal4",
               "python main.py --config=configs/smoke.py --workdir=/tmp/smoke"):
    assert want in shown, want
  kinds = {w[1] if w[0] == "python" else w[0] for _, w in DOCUMENTED}
  assert {"main.py", "-m", "pip", "apt-get", "bash", "pytest"} <= kinds, kinds
  assert len(DOCUMENTED) >= 25


# -- one check per kind of command ---------------------------------------------

def check_main(args: List[str]) -> None:
  """main.py's own flags parse the command; config_check passes its config."""
  import main as main_py  # pylint: disable=import-outside-toplevel
  from bsq_jax import cli, config_check  # pylint: disable=import-outside-toplevel
  argv = ["main.py", *args]
  fv = main_py.define_flags(flags.FlagValues(), argv)
  cli.load(fv, argv)
  config_check.check(fv.config)


@functools.lru_cache(maxsize=None)
def help_text(*program: str) -> str:
  result = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-2000:]
  return " ".join(result.stdout.split())


def check_flags(program: List[str], args: List[str]) -> None:
  """Each --flag of the command is in the program's --help; a value of a
  flag with choices is one of them. A command without flags has nothing to
  check, and a script without flags would run whole for its --help."""
  if not any(a.startswith("--") for a in args):
    return
  text = help_text(*program)
  for i, a in enumerate(args):
    if not a.startswith("--"):
      continue
    name, _, value = a.partition("=")
    assert re.search(re.escape(name) + r"\b", text), (program, name)
    choices = re.search(re.escape(name) + r" \{([^}]*)\}", text)
    if choices:
      value = value or args[i + 1]
      assert value in choices.group(1).split(","), (program, name, value)


def check_pip(args: List[str]) -> None:
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.M))
  for a in args[1:]:
    if a == "-r" or a.startswith("-"):
      continue
    if a.endswith(".txt"):
      assert os.path.exists(os.path.join(ROOT, a)), a
      continue
    name, _, version = a.partition("==")
    name = name.split("[")[0]
    if name in pins:  # an extra of a pinned package: the same version
      assert version == pins[name], (a, pins[name])


def check_apt(args: List[str]) -> None:
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  packages = [a for a in args if not a.startswith("-") and a != "install"]
  assert packages
  for p in packages:
    assert p in ci, f"{p}: shown in the docs, not installed by .ci/run"


def check_bash(args: List[str]) -> None:
  path = os.path.join(ROOT, args[0])
  with open(path) as f:
    script = f.read()
  for a in args[1:]:
    if a.startswith("--"):
      assert a.split("=")[0] in script, (args[0], a)


def check(words: List[str]) -> None:
  prog, args = words[0], words[1:]
  if prog in ("python", "python3"):
    if args[0] == "main.py":
      check_main(args[1:])
    elif args[0] == "-c":
      compile(args[1], "<docs>", "exec")
    elif args[0] == "-m":
      check_flags(["-m", args[1]], args[2:])
    else:
      assert os.path.exists(os.path.join(ROOT, args[0])), args[0]
      check_flags([args[0]], args[1:])
  elif prog == "pip":
    check_pip(args)
  elif prog == "apt-get":
    check_apt(args)
  elif prog == "pytest":
    for prev, a in zip([""] + args, args):
      if not a.startswith("-") and prev not in PYTEST_VALUED:
        assert os.path.exists(os.path.join(ROOT, a.split("::")[0])), a
  elif prog == "bash":
    check_bash(args)


@pytest.mark.parametrize("doc,words", DOCUMENTED,
                         ids=[f"{d}:{' '.join(w)[:60]}" for d, w in DOCUMENTED])
def test_documented_command(doc, words, monkeypatch):  # pylint: disable=unused-argument
  monkeypatch.chdir(ROOT)
  check(words)


def test_a_wrong_command_is_caught(monkeypatch):
  """The checks fail on what drifted: a config field, a script flag, a
  choice, an apt package, a pinned version."""
  monkeypatch.chdir(ROOT)
  for words in (
      ["python", "main.py", "--config=configs/smoke.py", "--config.bsq.alhpa=1"],
      ["python", "main.py", "--config=configs/nope.py"],
      ["python", "main.py", "--config=configs/smoke.py", "--config.bsq.alpha=-1"],
      ["python", "-m", "bsq_jax.inspect_model", "x.bsq", "--plot", "p"],
      ["python", "benchmarks/sweep.py", "--preset", "gpu"],
      ["apt-get", "install", "-y", "libjemalloc2"],
      ["pip", "install", "jax[cuda12]==0.9.0"],
      ["pytest", "-n", "0", "tests/test_nope.py"]):
    # The errors main.py's parse_flags turns into its one line, and ours.
    with pytest.raises((AssertionError, flags.Error, ValueError, TypeError,
                        AttributeError, KeyError, OSError)):
      check(words)


def test_the_readme_test_command_is_what_ci_runs():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    last = [l.strip() for l in f if l.strip() and not l.startswith("#")][-1]
  assert ["pip", "install", "-r", "requirements.txt"] in [w for _, w in DOCUMENTED]
  assert last == "pytest" and ["pytest"] in [w for _, w in DOCUMENTED]


def test_quick_start_runs_as_written(tmp_path):
  """The README's quick start on synthetic data, then export and inspect,
  each command as the README shows it, /tmp moved to a temporary folder.
  (Its smoke_vit command is run by test_any_model.py.)"""
  smoke = re.compile(r"(^|=)/tmp/smoke(\.bsq|_plots)?$")
  with open(os.path.join(ROOT, "README.md")) as f:
    shown = [w for w in commands(f.read())
             if w[0] == "python" and any(smoke.search(a) for a in w)]
  assert [w[1:3] for w in shown] == [
      ["main.py", "--config=configs/smoke.py"],
      ["-m", "bsq_jax.export"], ["-m", "bsq_jax.inspect_model"]]
  for words in shown:
    argv = [a.replace("/tmp/", f"{tmp_path}/") for a in words[1:]]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, (argv, result.stderr[-3000:])
  summary = open(tmp_path / "smoke" / "summary.md").read()
  assert "| finetune |" in summary
  assert os.path.getsize(tmp_path / "smoke.bsq") > 0
  assert os.listdir(tmp_path / "smoke_plots")
  check_quoted_smoke_table(summary)


def table_rows(text: str):
  """{stage: [cells]} of the markdown table rows whose first cell is a stage."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] in ("pretrain", "convert", "bsq",
                                              "finetune", "scratch"):
      rows[cells[0]] = cells[1:]
  return rows


def check_quoted_smoke_table(summary: str) -> None:
  """docs/configs.md quotes the smoke run's table: the same stages, bits
  and compression, and the accuracies within 5 of the 256 test images. The
  smoke model trains 8 steps a stage and sits near chance, so the last bits
  of XLA's CPU code (processor, device count) move a few images."""
  with open(os.path.join(ROOT, "docs", "configs.md")) as f:
    quoted = table_rows(f.read())
  ran = table_rows(summary)
  assert list(quoted) == list(ran), (quoted, ran)
  for stage, cells in ran.items():
    assert quoted[stage][:2] == cells[:2], (stage, quoted[stage], cells)
    assert abs(float(quoted[stage][2].rstrip("%")) -
               float(cells[2].rstrip("%"))) <= 5 * 100 / 256 + 1e-6, stage


def test_the_suite_size_the_docs_quote(request):
  """docs/testing.md quotes the suite's last full run ("N passed, M
  skipped"): N + M is the number of tests there are. Only a run that
  collected every test file can know that number."""
  files = {os.path.basename(str(i.fspath)) for i in request.session.items}
  every = {os.path.basename(p)
           for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
  if files != every:
    pytest.skip("a partial run does not know the suite's size")
  with open(os.path.join(ROOT, "docs", "testing.md")) as f:
    quoted = re.search(r"The whole suite now: (\d+) passed, (\d+) skipped",
                       " ".join(f.read().split()))
  assert quoted, "docs/testing.md: no 'The whole suite now: N passed, M skipped'"
  assert int(quoted.group(1)) + int(quoted.group(2)) == len(
      request.session.items)


def test_the_bad_input_count_the_docs_quote():
  """docs/testing.md and docs/reliability.md quote the bad-input
  catalogue's size: the catalogue's."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import test_bad_input  # pylint: disable=import-outside-toplevel
  cases = len(test_bad_input.CASES)
  with open(os.path.join(ROOT, "docs", "testing.md")) as f:
    assert f"the {cases}-case bad-input catalogue" in " ".join(f.read().split())
  with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
    assert f"the catalogue, {cases} cases" in " ".join(f.read().split())


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_relative_links_resolve():
  """Every relative link of README.md and docs/*.md names a file that
  exists, so moving a page or a result cannot leave a dead link."""
  dead, checked = [], 0
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for target, _ in LINK.findall(f.read()):
        if "://" in target:
          continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
        checked += 1
        if not os.path.exists(path):
          dead.append(f"{doc}: {target}")
  assert not dead, dead
  assert checked >= 20  # the README's results and docs links among them
