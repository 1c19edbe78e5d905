"""The packed model file: its format (bsq_jax.packed_format), export,
the loader (bsq_jax.packed_loader) and the inspection report."""

import dataclasses
import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import export
from bsq_jax import inspect_model
from bsq_jax import packed_format
from bsq_jax import scheme as sch
from bsq_jax.layers import Quant
from bsq_jax.models import build_model, input_shape
from bsq_jax.packed_loader import load_model

CFG = {"name": "cifar_resnet", "depth": 8, "num_classes": 10, "act_bits": 4,
       "width": 4, "channels": 3}
PACT_CFG = dict(CFG, act_bits=3)  # PACT alphas are float parts too


def _names(cfg):
  model = build_model(cfg, Quant("float"))
  return sch.quantized_names(model, jnp.zeros((1,) + input_shape(cfg)))


def _scheme(cfg, seed):
  """A random scheme with every precision 0..8 present, one layer at 0."""
  names = _names(cfg)
  rng = np.random.default_rng(seed)
  bits = rng.permutation(np.arange(len(names)) % 9)
  scheme = {n: int(b) for n, b in zip(names, bits)}
  assert 0 in scheme.values() and 8 in scheme.values()
  return scheme


def _trained(cfg, mode, seed):
  """Random continuous planes (bsq) or random c (finetune), random floats.

  The variables are drawn with numpy on the shapes `model.init` would give
  (compiling init on CPU takes about a minute; its values are not needed).
  """
  scheme = _scheme(cfg, seed)
  model = build_model(cfg, Quant(mode, scheme))
  x = jnp.zeros((2,) + input_shape(cfg))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                             train=False))
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))

  def fill(path, v):
    if isinstance(v, bp.BitPlanes):  # continuous planes in [0, 2]
      u = lambda: f32(rng.uniform(0, 2, v.pos.shape))
      return bp.BitPlanes(u(), u(), f32(rng.uniform(0.05, 0.5)))
    if isinstance(v, bp.Levels):     # c beyond [-1, 1] too (the clip)
      c = rng.uniform(-1.3, 1.3, v.c.shape)
      c.flat[:3] = [-1e-4, 0.0, -0.0]  # Q_n gives -0.0, 0.0, -0.0
      return bp.Levels(f32(c), f32(rng.uniform(0.05, 0.5)))
    if path.endswith("var"):
      return f32(rng.uniform(0.5, 1.5, v.shape))
    if path.endswith("pact_alpha"):
      return f32(rng.uniform(2, 6, v.shape))
    scale = 0.3 if path.endswith("kernel") else 0.2
    base = 1.0 if path.endswith("bn1/scale") or path.endswith("bn2/scale") \
        else 0.0
    return f32(base + rng.normal(0, scale, v.shape))
  variables = {c: sch.map_nodes(fill, shapes[c]) for c in shapes}
  return model, scheme, variables


@dataclasses.dataclass
class Run:
  """A 'trained' model, its exported file and what the network computes."""
  cfg: dict
  mode: str
  model: object
  scheme: dict
  variables: dict
  path: str
  stats: export.ExportStats
  weights: dict          # name -> the weight the network uses
  logits: np.ndarray


def _forward(model, variables, scheme, x):
  """(used weights, logits), one compile per model."""
  fn = jax.jit(lambda v, x: (sch.used_weights(v["params"], scheme),
                             model.apply(v, x, train=False)))
  w, logits = fn(variables, x)
  return {k: np.asarray(a) for k, a in w.items()}, np.asarray(logits)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(4, 32, 32, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, images):
  """mode -> Run, built on first use: bsq (ReLU6) and finetune (PACT)."""
  cache = {}

  def get(mode):
    if mode not in cache:
      cfg, seed = {"bsq": (CFG, 1), "finetune": (PACT_CFG, 2)}[mode]
      model, scheme, variables = _trained(cfg, mode, seed)
      path = str(tmp_path_factory.mktemp(mode) / "model.bsq")
      stats = export.export_model(path, cfg, mode, scheme, variables)
      cache[mode] = Run(cfg, mode, model, scheme, variables, path, stats,
                        *_forward(model, variables, scheme, images))
    return cache[mode]
  return get


def _bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("mode", ["bsq", "finetune"])
def test_export_load_reproduces_weights_and_logits(runs, images, mode):
  run = runs(mode)
  want_w, want_logits = run.weights, run.logits
  assert run.stats.file_bytes == os.path.getsize(run.path)
  assert np.all(np.isfinite(want_logits)) and np.ptp(want_logits) > 0

  # Default: Levels, c = q / K: every weight bit for bit, signed zeros too.
  loaded, lvars = load_model(run.path)
  got_w, got_logits = _forward(loaded, lvars, run.scheme, images)
  assert set(got_w) == set(want_w)
  for name in want_w:
    np.testing.assert_array_equal(_bits(got_w[name]), _bits(want_w[name]),
                                  err_msg=name)
  zero = [n for n, b in run.scheme.items() if b == 0]
  assert zero and all(not np.any(got_w[n]) for n in zero)
  assert any(np.any(np.signbit(w) & (w == 0)) for w in want_w.values())
  np.testing.assert_array_equal(got_logits, want_logits)
  np.testing.assert_array_equal(_bits(got_logits), _bits(want_logits))
  # Float parts come back as they were.
  for c in ("params", "batch_stats"):
    loaded_floats = dict(sch.walk(lvars[c]))
    for p, v in sch.walk(run.variables[c]):
      if not isinstance(v, sch.QUANT_NODES):
        np.testing.assert_array_equal(_bits(loaded_floats[p]), _bits(v),
                                      err_msg=p)

  # BitPlanes: binary planes of q, the same weights as values, same logits.
  loaded_b, bvars = load_model(run.path, mode="bsq")
  assert sch.scheme_of(bvars["params"]) == run.scheme
  got_b, logits_b = _forward(loaded_b, bvars, None, images)
  for name in want_w:
    np.testing.assert_array_equal(got_b[name], want_w[name], err_msg=name)
    planes = dict(sch.quantized(bvars["params"]))[name]
    assert set(np.unique(planes.pos)) <= {0.0, 1.0}
  np.testing.assert_array_equal(logits_b, want_logits)

  # The numpy-only reader: integer levels and a numpy weight within an ulp.
  packed = packed_format.read_packed(run.path)
  assert packed.scheme == run.scheme and packed.model_config == run.cfg
  assert packed.header["mode"] == mode
  for name, t in packed.quantized.items():
    k = max(bp.steps(t.bits), 1)
    assert t.q.dtype == np.int32 and np.abs(t.q).max(initial=0) <= k
    np.testing.assert_allclose(t.weight(), want_w[name], rtol=2e-7, atol=0)
    if t.bits:
      np.testing.assert_array_equal(t.q, np.rint(want_w[name] / t.scale * k))


def test_file_size_matches_formula(runs):
  run = runs("finetune")
  scheme, variables, stats, path = run.scheme, run.variables, run.stats, \
      run.path
  acc = sch.account(variables["params"], scheme)
  quantized = {p for p, _ in sch.quantized(variables["params"])}
  floats = sum(int(np.size(v)) for c in variables
               for p, v in sch.walk(variables[c])
               if not (c == "params" and p in quantized))
  formula = packed_format.formula_bytes(acc.bits, acc.sizes, floats)
  json_bytes = stats.header_bytes - packed_format.PREFIX_BYTES
  assert 0 < json_bytes < 8192
  assert os.path.getsize(path) == formula + json_bytes
  # n + 1 bits per weight, padded to a byte per tensor.
  assert stats.packed_weight_bytes == sum(
      -(-acc.sizes[k] * (acc.bits[k] + 1) // 8) if acc.bits[k] else 0
      for k in acc.sizes)
  nonzero = sum(m for k, m in acc.sizes.items() if acc.bits[k])
  assert 0 <= stats.packed_weight_bytes - (acc.total_bits + nonzero) / 8 < len(
      acc.sizes)
  assert stats.scale_bytes == 4 * len(acc.sizes)
  assert stats.float_bytes == 4 * floats
  assert stats.float32_bytes == 4 * (acc.total_params + floats)
  assert stats.file_bytes == (stats.header_bytes + stats.packed_weight_bytes +
                              stats.scale_bytes + stats.float_bytes)
  assert stats.total_params == acc.total_params
  assert stats.total_bits == acc.total_bits
  assert stats.paper_compression == pytest.approx(acc.compression)
  assert stats.real_ratio == pytest.approx(stats.float32_bytes /
                                           stats.file_bytes)
  text = stats.summary()
  assert f"{acc.compression:.2f}x" in text
  assert f"{stats.real_ratio:.2f}x" in text


@pytest.fixture(scope="module")
def good_file(runs):
  with open(runs("bsq").path, "rb") as f:
    return f.read()


def _refused(tmp_path, data, *expect):
  path = str(tmp_path / "bad.bsq")
  with open(path, "wb") as f:
    f.write(data)
  with pytest.raises(packed_format.ExportError) as e:
    packed_format.read_packed(path)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(path), msg
  for word in expect:
    assert word in msg, msg
  with pytest.raises(ValueError):  # load_model refuses it the same way
    load_model(path)
  return msg


def test_truncated_files_are_refused(good_file, tmp_path):
  head = struct.unpack_from("<I", good_file, 12)[0]
  for cut in (len(good_file) - 1, len(good_file) // 2, 20 + head, 30):
    _refused(tmp_path, good_file[:cut], "truncated")
  _refused(tmp_path, good_file[:10], "truncated")
  _refused(tmp_path, good_file + b"\0", "trailing bytes")


def test_corrupt_files_are_refused(good_file, tmp_path):
  data = bytearray(good_file)
  data[len(data) - 5] ^= 0x10  # a payload byte
  _refused(tmp_path, bytes(data), "corrupt payload", "SHA-256")
  data = bytearray(good_file)
  data[40] ^= 0x01             # a header byte
  _refused(tmp_path, bytes(data), "corrupt header", "CRC-32")


def test_wrong_version_and_magic_are_refused(good_file, tmp_path):
  data = bytearray(good_file)
  struct.pack_into("<I", data, 8, 2)
  _refused(tmp_path, bytes(data), "unsupported format version 2",
           "version 1")
  # A consistent version-2 header is refused as well.
  head_len = struct.unpack_from("<I", good_file, 12)[0]
  header = json.loads(good_file[20:20 + head_len])
  header["format_version"] = 2
  head = json.dumps(header).encode()
  data = (struct.pack("<8sIII", packed_format.MAGIC, 2, len(head),
                     zlib.crc32(head))
          + head + good_file[20 + head_len:])
  _refused(tmp_path, data, "unsupported format version 2")
  _refused(tmp_path, b"PK\x03\x04" + good_file[4:], "not a BSQ packed model",
           "magic")


def test_missing_file_is_refused(tmp_path):
  path = str(tmp_path / "nope.bsq")
  with pytest.raises(packed_format.ExportError, match="no such file") as e:
    packed_format.read_packed(path)
  assert str(e.value).startswith(path) and "\n" not in str(e.value)
  assert inspect_model.main([path]) == 1


@pytest.mark.parametrize("mode", ["bsq", "finetune"])
def test_inspect_run_and_file_agree_with_accounting(runs, mode, tmp_path,
                                                    capsys):
  r = runs(mode)
  cfg, scheme, variables, path, stats = r.cfg, r.scheme, r.variables, \
      r.path, r.stats
  acc = sch.account(variables["params"], None if mode == "bsq" else scheme)
  run = inspect_model.inspect_variables(cfg, mode, scheme, variables)
  packed = inspect_model.inspect_file(path)
  for report in (run, packed):
    assert report.total_params == acc.total_params
    assert report.total_bits == acc.total_bits
    assert report.average_bits == pytest.approx(acc.average_bits)
    assert report.compression == pytest.approx(acc.compression)
    paths = [r.path for r in report.rows]  # network order
    assert paths[0] == "conv1/kernel" and paths[-2:] == ["fc/kernel",
                                                         "fc/bias"]
    assert paths.index("layer1_0/conv2/kernel") < paths.index(
        "layer2_0/conv1/kernel")
    assert {r.path: r.bits for r in report.rows} == scheme
    assert report.float32_bytes == stats.float32_bytes
  assert run.rows == packed.rows  # the same table from both sources
  assert packed.file_bytes == stats.file_bytes and run.file_bytes is None
  for r in run.rows:
    assert len(r.density) == r.bits
    assert all(0.0 <= d <= 1.0 for d in r.density)
  if mode == "bsq":  # binary planes: the density is bit_density's
    planes = load_model(path, mode="bsq")[1]["params"]
    dens = sch.bit_density(planes)
    for r in run.rows:
      np.testing.assert_allclose(r.density, dens[r.path], err_msg=r.path)
  table = packed.table()
  assert f"{acc.compression:.2f}x" in table and str(stats.file_bytes) in table

  # CLI on the file, with plots.
  outdir = str(tmp_path / "plots")
  assert inspect_model.main([path, "--plots", outdir]) == 0
  out = capsys.readouterr().out
  assert "compression" in out and "layer1_0/conv1/kernel" in out
  for name in (inspect_model.PRECISION_PNG, inspect_model.DENSITY_PNG):
    png = os.path.join(outdir, name)
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000


def test_export_refuses_inconsistent_input(runs, tmp_path):
  run = runs("finetune")
  cfg, scheme, variables = run.cfg, run.scheme, run.variables
  path = str(tmp_path / "x.bsq")
  with pytest.raises(packed_format.ExportError, match="needs the scheme"):
    export.export_model(path, cfg, "finetune", None, variables)
  with pytest.raises(packed_format.ExportError, match="disagree"):
    export.export_model(path, cfg, "finetune", dict(list(scheme.items())[1:]),
                        variables)
  with pytest.raises(packed_format.ExportError, match="mode"):
    export.export_model(path, cfg, "float", scheme, variables)
  with pytest.raises(packed_format.ExportError, match="expected Levels"):
    export.export_model(path, cfg, "finetune", scheme,
                        runs("bsq").variables)
  with pytest.raises(packed_format.ExportError,
                     match="do not match the model"):
    export.export_model(path, dict(cfg, width=8), "finetune", scheme,
                        variables)
  with pytest.raises(packed_format.ExportError, match="cannot build the model"):
    export.export_model(path, dict(cfg, depth=9), "finetune", scheme,
                        variables)
  assert not os.path.exists(path)


def test_file_written_before_the_rules_change_loads_with_its_logits():
  """A file exported by commit e05e4db (QConv layers, before the built-in
  models became plain Flax with rules) loads and gives the logits that
  version gave. Written there by: main.py --config=configs/smoke.py with
  model.width=4, batch_size=64, eval_batch_size=64, synthetic_train=256,
  synthetic_test=64, bsq.alpha=20.0; then python -m bsq_jax.export; the
  logits are its load_model(...).apply(v, x, train=False) for x below.
  Equal on the machine that wrote them; XLA's CPU code differs between
  processors in the last bits (1.5e-8 seen on an AMD EPYC), while a wrong
  weight, scale or layer moves them by far more than the 1e-6 allowed."""
  data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
  model, variables = load_model(os.path.join(data, "smoke_e05e4db.bsq"))
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
      model.apply(variables, x, train=False),
      np.load(os.path.join(data, "smoke_e05e4db_logits.npy")), rtol=0,
      atol=1e-6)
