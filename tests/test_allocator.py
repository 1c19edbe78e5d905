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
