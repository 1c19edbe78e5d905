"""Runs a BSQ pipeline from a config:

    python main.py --config=configs/cifar_resnet20.py [--workdir=DIR]
                   [--config.bsq.alpha=0.01]

Thin on purpose: flags, devices, then `bsq_jax.train.train_and_evaluate`.
"""

import os
import shlex
import sys
import threading
from typing import List, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from bsq_jax import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS,
                 argv: Optional[List[str]] = None) -> flags.FlagValues:
  """main.py's flags, on `flag_values`; `argv` (default sys.argv) names the
  --config.* overrides, which ml_collections defines from it (a fresh set
  with its own argv parses the documented commands in tests/test_docs.py)."""
  fv = flag_values
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True, flag_values=fv,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Run folder; default workdirs/<config "
                      "file name>, then -field=value for each --config "
                      "override that changes results.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "Several hosts: process "
                      "0's host:port, the same on every process.",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Several hosts: how many "
                       "processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Several hosts: this process's "
                       "index.", flag_values=fv)
  flags.DEFINE_bool("tcmalloc", True, "On CPU (Linux): start again under "
                    "tcmalloc when it is installed and not loaded (faster "
                    "steps); --notcmalloc or BSQ_JAX_TCMALLOC=0 to not.",
                    flag_values=fv)
  flags.DEFINE_integer("init_timeout", 300, "Several hosts: seconds to wait "
                       "for every process to reach the coordinator.",
                       flag_values=fv)
  flags.mark_flags_as_required(["config"], flag_values=fv)
  return fv


define_flags()


def parse_flags(argv):
  """Flag parsing with one-line errors (bsq_jax/cli.py)."""
  return cli.parse(FLAGS, argv)


def start_processes(jax) -> None:
  """jax.distributed over several processes; on CPU, gloo collectives."""
  missing = [f"--{n}" for n in ("num_processes", "process_id")
             if FLAGS[n].value is None]
  if missing:
    cli.fail(f"--coordinator_address needs {' and '.join(missing)}")
  n, i = FLAGS.num_processes, FLAGS.process_id
  if n < 1 or not 0 <= i < n:
    cli.fail(f"--process_id: expected 0 <= process_id < --num_processes ({n}), "
         f"got {i}")
  if FLAGS.init_timeout < 1:
    cli.fail(f"--init_timeout: expected seconds >= 1, got {FLAGS.init_timeout}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # XLA aborts the process (no Python exception) when the processes do not
  # all arrive, e.g. a --num_processes that disagrees between hosts. So a
  # timer ends it first, with one line, before anything is written.
  timer = threading.Timer(FLAGS.init_timeout, _exit_with, [
      f"--num_processes {n}: not every process reached "
      f"{FLAGS.coordinator_address} within --init_timeout {FLAGS.init_timeout}"
      f"s; check --num_processes and the address on every host"])
  timer.daemon = True
  timer.start()
  jax.distributed.initialize(FLAGS.coordinator_address, n, i,
                             initialization_timeout=FLAGS.init_timeout + 60)
  timer.cancel()


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def main(argv, no_restart: str = "called in-process"):
  """The run; `no_restart`: why `run_as_program` did not restart it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bsq_jax import allocator, config_check, errors  # pylint: disable=import-outside-toplevel
  with errors.one_line():  # validate first
    config_check.check(FLAGS.config)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if FLAGS.config.xla_fast_compile:  # must be set before JAX starts
    flags_now = os.environ.get("XLA_FLAGS", "")
    # Only what is missing: the same flags give the same compile-cache keys.
    os.environ["XLA_FLAGS"] = " ".join([flags_now] + [
        f for f in ("--xla_backend_optimization_level=0",
                    "--xla_llvm_disable_expensive_passes=true")
        if f.split("=")[0] not in flags_now]).strip()
  import jax  # pylint: disable=import-outside-toplevel
  from bsq_jax import report, train  # pylint: disable=import-outside-toplevel
  report.quiet_libraries()
  if FLAGS.coordinator_address:
    start_processes(jax)

  note = allocator.note(no_restart) if jax.default_backend() == "cpu" else None
  if note:
    (logging.warning if note[0] else logging.info)("%s", note[1])
  workdir = FLAGS.workdir or cli.default_workdir(
      config_flags.get_config_filename(FLAGS["config"]), FLAGS.config,
      cli.overrides(sys.argv))
  logging.info("process %d of %d; local devices: %s; %d devices in all",
               jax.process_index(), jax.process_count(), jax.local_devices(),
               jax.device_count())
  logging.info("workdir %s; the config is in its config.json", workdir)
  command = " ".join(shlex.quote(a) for a in sys.argv)
  with errors.one_line():
    table = train.train_and_evaluate(FLAGS.config, workdir, command)
  if jax.process_index() == 0:
    print(table)


def run_as_program(argv):
  """main() for `python main.py`: first, before JAX starts, maybe replace
  this process with itself under tcmalloc (not when a test calls main()).
  Quiet unless --verbosity asks: what a person reads is the run's progress
  (bsq_jax/report.py), the table and one line for any error."""
  from bsq_jax import allocator  # pylint: disable=import-outside-toplevel
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    main(argv, allocator.restart_under_tcmalloc(logging.info)
         if FLAGS.tcmalloc else "--notcmalloc")
  except KeyboardInterrupt as e:  # a stage's says what it saved
    cli.fail(str(e) or "interrupted; the epochs saved so far are kept, and "
             "the same command resumes from them", 130)


if __name__ == "__main__":
  app.run(run_as_program, flags_parser=parse_flags)
