"""bsq_jax.allocator: finding tcmalloc / jemalloc and telling if one is loaded."""

import os
import subprocess
import sys

import pytest

from bsq_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_looks_in_the_library_dirs(tmp_path, monkeypatch):
  monkeypatch.setattr(allocator, "_DIRS", (str(tmp_path / "none"),
                                           str(tmp_path)))
  assert allocator.find("tcmalloc") is None
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert allocator.find("tcmalloc") == str(tmp_path / "libtcmalloc.so.4")
  (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # preferred
  assert allocator.find("tcmalloc").endswith("libtcmalloc_minimal.so.4")
  assert allocator.find("jemalloc") is None


def test_loaded_reads_the_process_maps(tmp_path):
  maps = tmp_path / "maps"
  maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
  assert not allocator.loaded("tcmalloc", str(maps))
  maps.write_text(maps.read_text() +
                  "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n")
  assert allocator.loaded("tcmalloc", str(maps))
  assert not allocator.loaded("tcmalloc", str(tmp_path / "missing"))


def test_hint_says_how_or_nothing(monkeypatch):
  monkeypatch.setattr(allocator, "loaded", lambda name: False)
  monkeypatch.setattr(allocator, "find", lambda name: None)
  assert "apt-get install libtcmalloc-minimal4" in allocator.hint()
  monkeypatch.setattr(allocator, "find", lambda name: "/x/libtcmalloc.so.4")
  assert "LD_PRELOAD=/x/libtcmalloc.so.4 python main.py" in allocator.hint()
  monkeypatch.setattr(allocator.sys, "platform", "darwin")
  assert allocator.hint() is None  # LD_PRELOAD and apt are Linux's
  monkeypatch.setattr(allocator.sys, "platform", "linux")
  monkeypatch.setattr(allocator, "loaded", lambda name: True)
  assert allocator.hint() is None


def _loaded_in_child(preload):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("LD_PRELOAD", None)
  if preload:
    env["LD_PRELOAD"] = preload
  code = "from bsq_jax import allocator; print(allocator.loaded('tcmalloc'))"
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  return out.strip() == "True"


@pytest.mark.skipif(allocator.find("tcmalloc") is None,
                    reason="tcmalloc not installed (.ci/run installs it)")
def test_a_preloaded_tcmalloc_is_seen():
  assert not _loaded_in_child(None)
  assert _loaded_in_child(allocator.find("tcmalloc"))


def _restart_ready(monkeypatch, loaded=False, path="/x/libtcmalloc_minimal.so.4",
                   on_cpu=True):
  monkeypatch.setattr(allocator.sys, "platform", "linux")
  monkeypatch.setattr(allocator, "loaded", lambda name: loaded)
  monkeypatch.setattr(allocator, "find", lambda name: path)
  monkeypatch.setattr(allocator, "jax_on_cpu", lambda environ: on_cpu)


def test_restart_env_preloads_tcmalloc_once(monkeypatch):
  _restart_ready(monkeypatch)
  env, why = allocator.restart_env({"PATH": "/bin", "LD_PRELOAD": "/y/a.so"})
  assert why == "LD_PRELOAD=/x/libtcmalloc_minimal.so.4"
  assert env == {"PATH": "/bin", allocator.RESTARTED: "1",
                 "LD_PRELOAD": "/x/libtcmalloc_minimal.so.4 /y/a.so"}
  # The restarted process never restarts again, even if the preload failed.
  env2, why = allocator.restart_env(env)
  assert env2 is None and why.startswith("restarted once under LD_PRELOAD=/x/")
  assert allocator.note(why) == (
      True, f"malloc: {why}; running on the default malloc")


@pytest.mark.parametrize("setting,env,why", [
    ({}, {allocator.OPT_OUT: "0"}, "BSQ_JAX_TCMALLOC=0"),
    ({}, {allocator.OPT_OUT: "off"}, "BSQ_JAX_TCMALLOC=off"),
    ({"loaded": True}, {}, "tcmalloc loaded"),
    ({"path": None}, {}, "tcmalloc not installed"),
    ({"on_cpu": False}, {}, "JAX runs on an accelerator"),
])
def test_restart_env_says_why_not(monkeypatch, setting, env, why):
  _restart_ready(monkeypatch, **setting)
  assert allocator.restart_env(env) == (None, why)


def test_restart_env_only_on_linux(monkeypatch):
  _restart_ready(monkeypatch)
  monkeypatch.setattr(allocator.sys, "platform", "darwin")
  assert allocator.restart_env({}) == (None, "not Linux")


def test_note_after_no_restart(monkeypatch):
  monkeypatch.setattr(allocator, "loaded", lambda name: True)
  assert allocator.note("tcmalloc loaded") == (False, "malloc: tcmalloc")
  monkeypatch.setattr(allocator, "loaded", lambda name: False)
  monkeypatch.setattr(allocator, "find", lambda name: None)
  assert allocator.note("BSQ_JAX_TCMALLOC=0") is None  # opted out: quiet
  assert allocator.note("--notcmalloc") is None
  warning, line = allocator.note("tcmalloc not installed")
  assert warning and "apt-get install libtcmalloc-minimal4" in line


@pytest.mark.parametrize("environ,plugins,on_cpu", [
    ({"JAX_PLATFORMS": "cpu"}, True, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False, False),
    ({"JAX_PLATFORMS": ""}, False, True),
    ({}, True, False),
])
def test_jax_on_cpu(monkeypatch, environ, plugins, on_cpu):
  monkeypatch.setattr(allocator, "_accelerator_installed", lambda: plugins)
  assert allocator.jax_on_cpu(environ) == on_cpu
