"""main.py's command line, before JAX starts: flags parsed with one-line
errors, `--config.FIELD=None` to unset a field, a size target that wins
over a config's fixed alpha, and the default workdir, named after the
config file and the overrides that change results.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, List, Tuple

from absl import flags

PREFIX = "--config."
TARGETS = ("bsq.target_bits", "bsq.target_kbytes")


def fail(message: str, code: int = 1) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def overrides(argv: List[str]) -> List[str]:
  """The config fields the command line sets, in order ('bsq.alpha')."""
  return [a[len(PREFIX):].split("=")[0] for a in argv
          if a.startswith(PREFIX)]


def _without_nones(argv: List[str]) -> Tuple[List[str], List[str]]:
  """(argv without `--config.F=None` / `--config.F None`, those fields):
  ml_collections would parse 'None' as the field's type."""
  kept, nones, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith(PREFIX) and a.partition("=")[2] == "None":
      nones.append(a[len(PREFIX):].partition("=")[0])
    elif (a.startswith(PREFIX) and "=" not in a and i + 1 < len(argv)
          and argv[i + 1] == "None"):
      nones.append(a[len(PREFIX):])
      i += 1
    else:
      kept.append(a)
    i += 1
  return kept, nones


def _config_file_error(path: str, error: Exception) -> str:
  """One line for a --config file that does not load."""
  if not os.path.isfile(path.split(":")[0]):
    folder = os.path.dirname(path) or "."
    known = sorted(f for f in os.listdir(folder) if f.endswith(".py")
                   ) if os.path.isdir(folder) else []
    near = difflib.get_close_matches(os.path.basename(path), known, 1)
    hint = (f"; did you mean {os.path.join(folder, near[0])}?" if near else
            f"; the configs are in configs/ ({', '.join(known[:4])}, ...)"
            if known else "")
    return f"--config={path}: no such file{hint}"
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return f"--config={path}: does not load ({lines[-1] if lines else error})"


def _no_field(e: Exception, argv: List[str]) -> str:
  """ml_collections' KeyError for an override of a missing field, as
  '--config.bsq.alpah: the config has no field 'alpah'; did you mean ...'."""
  inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
  text = str(inner.args[0] if inner.args else inner)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  name = lines[0].strip("'\"") if lines else "?"
  flag = next((PREFIX + f for f in overrides(argv)
               if f == name or f.endswith("." + name)), PREFIX + name)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f"{flag}: the config has no field {name!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else ""))


def parse(flag_values: flags.FlagValues, argv: List[str]) -> List[str]:
  """Parses `argv` into `flag_values` (main.py's), loading the config file;
  every mistake ends the program with one line and exit status 1."""
  if not any(a.startswith("--config=") or a == "--config" for a in argv[1:]):
    if len(argv) == 1 or not any(a in ("--help", "-h", "--helpfull")
                                 for a in argv):
      fail("no --config given; for example: python main.py "
           "--config=configs/smoke.py (every config is in configs/)")
  try:
    rest = load(flag_values, argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # A config file whose get_config() raised: its traceback's last line.
    fail(lines[0] if "Traceback" not in str(e) else
         f"{lines[0]} {lines[-1].strip()}")
  except OSError as e:
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    fail(_config_file_error(config_flags.get_config_filename(
        flag_values["config"]), e))
  except (AttributeError, KeyError) as e:
    fail(_no_field(e, argv))
  except (TypeError, ValueError) as e:
    fail(f"{' '.join(PREFIX + f for f in overrides(argv))}: "
         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
  except Exception as e:  # pylint: disable=broad-except
    # The config file's own get_config() failed: its error, in one line.
    fail(f"--config: {type(e).__name__}: {str(e).splitlines()[0]}")
  return rest


def load(flag_values: flags.FlagValues, argv: List[str]) -> List[str]:
  """`parse` without its one-line errors: what they come from is raised."""
  kept, nones = _without_nones(argv)
  rest = flag_values(kept)
  config = flag_values.config
  config.keys()  # a file that did not load raises here
  for field in nones:
    _set(config, field, None)
  target_wins(config, overrides(argv))
  return rest


def _set(config, field: str, value: Any) -> None:
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  if last not in node:
    raise KeyError(f"'{last}'")
  node[last] = value


def target_wins(config, fields: List[str]) -> None:
  """A size target given on the command line replaces the config file's
  fixed alpha (budget mode sets alpha itself); an alpha given there too
  is an error that config_check names."""
  asked = [f for f in TARGETS if f in fields and config.bsq[f.split(".")[1]]]
  if asked and "bsq.alpha" not in fields:
    config.bsq.alpha = None


def default_workdir(config_path: str, config, fields: List[str]) -> str:
  """workdirs/<config file name>, then `-field=value` for each override
  that changes results: `--config.bsq.alpha=0.5` on configs/smoke.py
  gives workdirs/smoke-bsq.alpha=0.5. Overrides that change no result
  (`stages`, where the data is) or only extend the run
  (`finetune.epochs`) leave the name as it is, so that they go on in the
  same workdir."""
  from bsq_jax import settings  # pylint: disable=import-outside-toplevel
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  values = settings.flat(config)
  changed = {f: values.get(f) for f in dict.fromkeys(fields)
             if settings.changes_results(f)}
  return settings.workdir_name(os.path.join("workdirs", name), changed)
