"""benchmarks/gpu_check.sh: its CPU dry run end to end, and the parsing its
report rests on (test counts from a cut-short log, stage times from main.py's
log lines)."""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import gpu_check  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_the_whole_report(tmp_path):
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if k != "FASHION_DIR"}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  report = (out / "gpu.md").read_text()
  assert f"bash benchmarks/gpu_check.sh --dry-run --out {out}" in report
  assert "- devices (cpu): 0: cpu (cpu)" in report
  assert re.search(r"- jax \d+\.\d+\.\d+, jaxlib", report)
  # The tests ran and were counted.
  assert re.search(r"^(\d+) passed \(of \1 selected\)\.$", report, re.M), report
  # Step and epoch measured for bsq (the dry run's mode); float and
  # finetune are left to the real run (the ratio to float: test below).
  row = re.search(r"^\| bsq \| ([\d.]+) \| ([\d.]+) \| \d+ \| ([\d.]+) \| "
                  r"- \| ([\d.-]+), ([\d.-]+) \|", report, re.M)
  assert row, report
  assert float(row.group(1)) > 0 and float(row.group(2)) > 0
  assert "| bsq |" in report and re.search(r"\| bsq \|.*\| 0\.\d{3} \| n/a \|",
                                           report)
  assert "| float | not measured |" in report
  assert "| finetune | not measured |" in report
  # main.py ran every dry-run stage on made-up Fashion-MNIST files.
  assert "Exit status 0" in report
  for stage in ("startup", "pretrain", "convert", "bsq", "finetune"):
    assert re.search(rf"^\| {stage} \| [\d.]+ \|$", report, re.M), stage
  assert "--config.data.fashion_mnist_dir=" in report
  assert re.search(r"^\| finetune \| [\d.]+ \| [\d.]+ \| \d+\.\d+% \|$", report, re.M)
  for name in ("versions.json", "bench.json", "pipeline.json", "tests.log",
               "pipeline.log", "gpu_check.log"):
    assert (out / name).exists(), name
  assert not list(out.rglob("checkpoints"))  # the run's folder is elsewhere


def test_bench_table_gives_each_mode_its_ratios():
  """The real run's three modes: epoch over steps x step, epoch over the
  float epoch, compile times; a mode the budget skipped is not measured."""
  sizes = dict(depth=20, width=16, batch=128, epoch_steps=390, chunk=130,
               epochs=2, step_steps=30)
  mode = lambda epoch, step: {"epoch_s": [epoch + 0.5, epoch], "step_s": step,
                              "compile_s": 9.0, "step_compile_s": 4.0}
  bench = {"sizes": sizes, "device": "H200", "count": 1, "skipped": [],
           "modes": {"float": mode(1.0, 0.002), "bsq": mode(1.5, 0.003)}}
  lines = gpu_check.bench_lines(bench)
  assert "| float | 2.0 | 1.000 | 49920 | 1.282 | 1.000 | 9.0, 4.0 | - | n/a |" \
      in lines, lines
  assert "| bsq | 3.0 | 1.500 | 33280 | 1.282 | 1.500 | 9.0, 4.0 | - | n/a |" \
      in lines, lines
  assert "| finetune | not measured | | | | | | | |" in lines
  assert any("Goal: a BSQ epoch of 50,000 images under 2 s: met (1.500 s)"
             in l for l in lines)


def test_counts_read_a_log_cut_short():
  log = "\n".join([
      "============================= test session starts ==",
      "collected 9 items / 4 deselected / 5 selected",
      "tests/test_a.py::test_one PASSED                      [ 20%]",
      "tests/test_a.py::test_two[bsq] FAILED                 [ 40%]",
      "tests/test_b.py::test_three SKIPPED (no torch)        [ 60%]",
      "tests/test_b.py::test_four ERROR                      [ 80%]",
  ])  # killed here: no summary line
  got = gpu_check.test_counts(log)
  assert got == {"counts": {"PASSED": 1, "FAILED": 1, "SKIPPED": 1, "ERROR": 1},
                 "failed": ["tests/test_a.py::test_two[bsq]",
                            "tests/test_b.py::test_four"],
                 "collected": 5}
  xdist = "\n".join([
      "4 workers [7 items]",
      "[gw0] [ 14%] PASSED tests/test_a.py::test_one",
      "[gw1] [ 28%] FAILED tests/test_a.py::test_two",
      "FAILED tests/test_a.py::test_two - AssertionError",  # summary: not again
  ])
  got = gpu_check.test_counts(xdist)
  assert got["collected"] == 7 and got["counts"] == {"PASSED": 1, "FAILED": 1}
  assert got["failed"] == ["tests/test_a.py::test_two"]


def test_stage_times_from_main_log_lines():
  lines = [
      "I1202 10:00:00.000000 1 main.py:130] workdir /w",
      "I1202 10:00:05.500000 1 train.py:473] stage pretrain",
      "I1202 10:00:09.000000 1 train.py:346] pretrain epoch 1: train loss 2",
      "I1202 10:00:10.000000 1 train.py:346] pretrain epoch 2: train loss 1",
      "I1202 10:00:12.000000 1 train.py:473] stage convert",
      "I1202 10:00:12.500000 1 train.py:401] stage convert: finished; skipping",
      "not a log line",
  ]
  events = gpu_check.log_times(lines, 2026)
  assert len(events) == 6
  t0 = events[0][0] - 1.0  # the process started a second before its first line
  times = gpu_check.stage_times(events, t0, events[-1][0] + 2.5)
  assert times == {"startup": 6.5, "pretrain": 6.5, "convert": 3.0}
  epochs = gpu_check.epoch_lines(events)
  assert [e["s"] for e in epochs] == [3.5, 1.0]
  assert epochs[1]["line"].startswith("pretrain epoch 2:")
