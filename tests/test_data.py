"""bsq_jax.data: synthetic, Fashion-MNIST (IDX files) and CIFAR (tfds)."""

import gzip
import io
import os
import subprocess
import sys
import tarfile
import time

# tfds reads its registered checksums with importlib_resources (pinned): a
# missing one fails here, never skips the tfds tests.
import importlib_resources  # noqa: F401  pylint: disable=unused-import
import ml_collections
import numpy as np
import pytest

from bsq_jax import data
from bsq_jax.data import DataError, Dataset, load_dataset
from bsq_jax.data import synthetic
from fake_fmnist import idx_images, idx_labels, write_fmnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(excinfo, *parts):
  """The DataError message is one line and contains every part."""
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for part in parts:
    assert part in msg, (part, msg)
  return msg


# --------------------------------------------------------------- dispatcher


def test_unknown_name_names_field_and_choices():
  with pytest.raises(DataError) as e:
    load_dataset({"name": "mnist"})
  one_line_error(e, "data.name", "'mnist'", "cifar10", "cifar100",
                 "fashion_mnist", "synthetic")
  assert issubclass(DataError, ValueError)


def test_import_and_synthetic_load_do_not_pull_tensorflow():
  code = ("import sys; from bsq_jax.data import load_dataset; "
          "load_dataset({'name': 'synthetic', 'synthetic_train': 8, "
          "'synthetic_test': 4}); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 timeout=60)


def test_configdict_and_dict_give_the_same_dataset():
  fields = {"name": "synthetic", "synthetic_train": 40, "synthetic_test": 10,
            "num_classes": 4, "channels": 2, "train_subset": 0}
  a = load_dataset(fields)
  b = load_dataset(ml_collections.ConfigDict(fields))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_train_subset_takes_the_first_n_and_keeps_test():
  cfg = {"name": "synthetic", "synthetic_train": 100, "synthetic_test": 30}
  full = load_dataset(cfg)
  sub = load_dataset(dict(cfg, train_subset=17))
  np.testing.assert_array_equal(sub.train_images, full.train_images[:17])
  np.testing.assert_array_equal(sub.train_labels, full.train_labels[:17])
  np.testing.assert_array_equal(sub.test_images, full.test_images)
  assert sub.mean == full.mean and sub.std == full.std
  assert sub.train_images.base is None  # a copy, the full array can be freed


@pytest.mark.parametrize("value, expected", [
    (101, "expected at most 100"), (-1, "expected an integer >= 0"),
    (2.5, "expected an integer >= 0"), ("10", "expected an integer >= 0")])
def test_bad_train_subset(value, expected):
  with pytest.raises(DataError) as e:
    load_dataset({"name": "synthetic", "synthetic_train": 100,
                  "synthetic_test": 10, "train_subset": value})
  one_line_error(e, "data.train_subset", expected)


@pytest.mark.parametrize("field, value", [
    ("synthetic_train", 0), ("synthetic_test", -3), ("num_classes", 1),
    ("channels", "3"), ("synthetic_noise", 1.5)])
def test_bad_synthetic_fields(field, value):
  with pytest.raises(DataError) as e:
    load_dataset({"name": "synthetic", field: value})
  one_line_error(e, "data." + field, repr(value))


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_balance():
  ds = load_dataset({"name": "synthetic", "synthetic_train": 103,
                     "synthetic_test": 21, "num_classes": 5, "channels": 1})
  assert isinstance(ds, Dataset) and ds.name == "synthetic"
  assert ds.train_images.shape == (103, 32, 32, 1)
  assert ds.test_images.shape == (21, 32, 32, 1)
  assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  assert ds.num_classes == 5 and len(ds.mean) == len(ds.std) == 1
  counts = np.bincount(ds.train_labels, minlength=5)
  assert counts.sum() == 103 and counts.max() - counts.min() <= 1
  # Shuffled, not 0, 1, 2, ... in order.
  assert not np.array_equal(ds.train_labels, np.arange(103) % 5)


def test_synthetic_is_deterministic_and_seeded():
  a = synthetic.make(64, 16, seed=3)
  b = synthetic.make(64, 16, seed=3)
  c = synthetic.make(64, 16, seed=4)
  d = synthetic.make(64, 99, seed=3)  # other test size: same train set
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.train_images, c.train_images)
  np.testing.assert_array_equal(a.train_images, d.train_images)
  np.testing.assert_array_equal(a.train_labels, d.train_labels)


def test_synthetic_mean_std_are_those_of_the_first_256_images():
  ds = synthetic.make(300, 8, channels=3, seed=1)
  x = ds.train_images[:256].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), atol=1e-9)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), atol=1e-9)


def test_synthetic_noise_extremes_stay_in_range():
  clean = synthetic.make(20, 4, noise=0.0)
  # Without noise every image is exactly its class template.
  for k in np.unique(clean.train_labels):
    imgs = clean.train_images[clean.train_labels == k]
    assert (imgs == imgs[0]).all()
  pure = synthetic.make(2000, 4, noise=1.0)
  assert pure.train_images.min() == 0 and pure.train_images.max() == 255


def test_synthetic_is_learnable_by_a_tiny_model():
  """Softmax regression, 30 full-batch steps: far better than chance."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ds = load_dataset({"name": "synthetic", "synthetic_train": 512,
                     "synthetic_test": 256, "num_classes": 10})

  def prep(images):
    x = images.astype(np.float32) / 255
    x = (x - np.asarray(ds.mean, np.float32)) / np.asarray(ds.std, np.float32)
    return jnp.asarray(x.reshape(len(x), -1))

  x, y = prep(ds.train_images), jnp.asarray(ds.train_labels)
  w = jnp.zeros((x.shape[1], ds.num_classes))

  @jax.jit
  def step(w):
    def loss(w):
      logp = jax.nn.log_softmax(x @ w)
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
    return w - 1e-3 * jax.grad(loss)(w)

  for _ in range(30):
    w = step(w)
  acc = float(jnp.mean(jnp.argmax(prep(ds.test_images) @ w, -1) ==
                       jnp.asarray(ds.test_labels)))
  assert acc > 0.5, acc  # chance is 0.1


# ------------------------------------------------------------ fashion-mnist


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_reads_gz_and_plain_and_pads(tmp_path, gz):
  contents = write_fmnist(str(tmp_path), gz=gz)
  ds = load_dataset({"name": "fashion_mnist",
                     "fashion_mnist_dir": str(tmp_path)})
  raw = np.frombuffer(contents["train-images-idx3-ubyte"], np.uint8,
                      offset=16).reshape(12, 28, 28)
  assert ds.train_images.shape == (12, 32, 32, 1)
  assert ds.test_images.shape == (5, 32, 32, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[:, 2:30, 2:30, 0], raw)
  border = ds.train_images.copy()
  border[:, 2:30, 2:30] = 0
  assert not border.any()  # 2 zero pixels on each side
  np.testing.assert_array_equal(ds.train_labels, np.arange(12) % 10)
  assert ds.num_classes == 10 and ds.name == "fashion_mnist"


def _pixels(n, dims=(28, 28)):
  return np.zeros((n,) + dims, np.uint8)


FM_ERRORS = {
    "bad image magic": (
        {"train-images-idx3-ubyte": idx_images(_pixels(12), magic=2049)},
        "train-images-idx3-ubyte.gz", "expected IDX magic number 2051"),
    "bad label magic": (
        {"t10k-labels-idx1-ubyte": idx_labels(np.zeros(5), magic=2051)},
        "t10k-labels-idx1-ubyte.gz", "expected IDX magic number 2049"),
    "truncated image data": (
        {"train-images-idx3-ubyte": idx_images(_pixels(12))[:-100]},
        "train-images-idx3-ubyte.gz",
        f"is truncated: expected {12 * 784} bytes of image data, got "
        f"{12 * 784 - 100}"),
    "count larger than data": (
        {"train-images-idx3-ubyte": idx_images(_pixels(12), count=60000)},
        "train-images-idx3-ubyte.gz",
        f"is truncated: expected {60000 * 784} bytes of image data, got "
        f"{12 * 784}"),
    "truncated header": (
        {"train-labels-idx1-ubyte": b"\x00\x00\x08"},
        "train-labels-idx1-ubyte.gz",
        "is truncated: expected a 8-byte IDX header, got 3 bytes"),
    "trailing bytes": (
        {"t10k-labels-idx1-ubyte": idx_labels(np.zeros(5)) + b"\x00\x01"},
        "t10k-labels-idx1-ubyte.gz", "has 2 bytes after the 5 bytes"),
    "wrong dims": (
        {"t10k-images-idx3-ubyte": idx_images(_pixels(5, (32, 32)))},
        "t10k-images-idx3-ubyte.gz", "expected 28x28 images, got 32x32"),
    "label out of range": (
        {"train-labels-idx1-ubyte": idx_labels([0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                9, 10, 0])},
        "train-labels-idx1-ubyte.gz",
        "expected labels in 0..9, got 10 at index 10"),
    "count mismatch": (
        {"t10k-labels-idx1-ubyte": idx_labels(np.zeros(4))},
        "t10k-labels-idx1-ubyte.gz",
        "holds 5 images but"),
}


@pytest.mark.parametrize("case", sorted(FM_ERRORS))
def test_fmnist_errors_name_file_and_expectation(tmp_path, case):
  overrides, file_name, expected = FM_ERRORS[case]
  write_fmnist(str(tmp_path), overrides=overrides)
  with pytest.raises(DataError) as e:
    load_dataset({"name": "fashion_mnist",
                  "fashion_mnist_dir": str(tmp_path)})
  one_line_error(e, "data.fashion_mnist_dir",
                 os.path.join(str(tmp_path), file_name), expected)


def test_fmnist_missing_file_and_missing_dir(tmp_path):
  write_fmnist(str(tmp_path))
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DataError) as e:
    load_dataset({"name": "fashion_mnist",
                  "fashion_mnist_dir": str(tmp_path)})
  one_line_error(e, "data.fashion_mnist_dir",
                 str(tmp_path / "t10k-labels-idx1-ubyte.gz"),
                 "does not exist", "dataset-fashion-mnist")
  with pytest.raises(DataError) as e:
    load_dataset({"name": "fashion_mnist",
                  "fashion_mnist_dir": str(tmp_path / "nope")})
  one_line_error(e, "data.fashion_mnist_dir", "nope",
                 "is not a directory")


def test_fmnist_corrupt_and_truncated_gzip(tmp_path):
  write_fmnist(str(tmp_path))
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(b"this is not gzip at all")
  with pytest.raises(DataError) as e:
    load_dataset({"name": "fashion_mnist",
                  "fashion_mnist_dir": str(tmp_path)})
  one_line_error(e, str(path), "is not a valid gzip file")
  path.write_bytes(gzip.compress(idx_labels(np.zeros(12)))[:-12])
  with pytest.raises(DataError) as e:
    load_dataset({"name": "fashion_mnist",
                  "fashion_mnist_dir": str(tmp_path)})
  one_line_error(e, str(path), "is truncated")


@pytest.fixture(scope="module")
def real_fmnist():
  folder = data.DEFAULT_FASHION_MNIST_DIR
  if not os.path.isfile(os.path.join(folder, "train-images-idx3-ubyte.gz")):
    pytest.skip(f"Debian package dataset-fashion-mnist is not installed "
                f"(no IDX files in {folder}); apt-get install "
                "dataset-fashion-mnist")
  return load_dataset({"name": "fashion_mnist"})  # the default folder


def test_fmnist_real_files(real_fmnist):
  ds = real_fmnist
  assert ds.train_images.shape == (60000, 32, 32, 1)
  assert ds.test_images.shape == (10000, 32, 32, 1)
  assert ds.train_labels.min() == 0 and ds.train_labels.max() == 9
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  assert not ds.train_images[:, :2].any() and not ds.train_images[:, 30:].any()
  assert ds.train_images.max() == 255


def test_fmnist_hardcoded_stats_match_the_padded_training_set(real_fmnist):
  hist = np.bincount(real_fmnist.train_images.ravel(), minlength=256)
  values = np.arange(256) / 255
  mean = hist @ values / hist.sum()
  std = np.sqrt(hist @ (values - mean) ** 2 / hist.sum())
  assert abs(real_fmnist.mean[0] - mean) < 1e-4, mean
  assert abs(real_fmnist.std[0] - std) < 1e-4, std


# -------------------------------------------------------------------- cifar


def cifar_records(n, label_bytes, seed):
  """(raw records, HWC images, label rows) in the real CIFAR binary layout."""
  rng = np.random.default_rng(seed)
  chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
  labels = np.stack([rng.permutation(np.arange(n) % (20 if j == 0 and
                                                     label_bytes == 2 else
                                                     100 if label_bytes == 2
                                                     else 10))
                     for j in range(label_bytes)], axis=1).astype(np.uint8)
  raw = b"".join(labels[i].tobytes() + chw[i].tobytes() for i in range(n))
  return raw, chw.transpose(0, 2, 3, 1), labels


def write_cifar_archive(path, name):
  """A tiny archive with the real layout of cifar-10/100-binary.tar.gz.

  Returns {split: (images HWC in file order, fine labels in file order)}.
  """
  members, expected = {}, {}
  if name == "cifar10":
    prefix = "cifar-10-batches-bin/"
    members["batches.meta.txt"] = "".join(f"class{i}\n" for i in range(10))
    sizes = [2, 1, 3, 1, 2]  # records per data_batch_{1..5}.bin
    raw, images, labels = cifar_records(sum(sizes), 1, seed=1)
    start = 0
    for b, size in enumerate(sizes, 1):
      members[f"data_batch_{b}.bin"] = raw[start * 3073:(start + size) * 3073]
      start += size
    expected["train"] = (images, labels[:, 0])
    raw, images, labels = cifar_records(4, 1, seed=2)
    members["test_batch.bin"] = raw
    expected["test"] = (images, labels[:, 0])
  else:
    prefix = "cifar-100-binary/"
    members["coarse_label_names.txt"] = "".join(f"c{i}\n" for i in range(20))
    members["fine_label_names.txt"] = "".join(f"f{i}\n" for i in range(100))
    for split, file, n, seed in (("train", "train.bin", 7, 3),
                                 ("test", "test.bin", 3, 4)):
      raw, images, labels = cifar_records(n, 2, seed)
      members[file] = raw
      expected[split] = (images, labels[:, 1])  # byte 0 coarse, byte 1 fine
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for member, content in members.items():
      content = content.encode() if isinstance(content, str) else content
      info = tarfile.TarInfo(prefix + member)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return expected


@pytest.fixture(scope="module")
def tfds_mod():
  from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
  _, tfds = cifar.import_tf()
  return tfds


@pytest.fixture
def tfds_checksums(tfds_mod):
  """tfds, which reads its registered checksums (url_infos) via etils.epath
  with importlib_resources (imported at the top of this file)."""
  return tfds_mod


@pytest.fixture
def no_network(monkeypatch, tfds_mod):
  """No test touches the net: every TCP connect (the download probe's) fails
  at once as if offline, and any tfds download or download_and_prepare
  without an archive raises. Returns the calls, {"connect": [(host, port)],
  "download": [url], "prepare": [manual_dir]}."""
  import socket  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=import-outside-toplevel
  calls = {"connect": [], "download": [], "prepare": []}

  def offline(address, *args, **kwargs):
    calls["connect"].append(tuple(address))
    raise OSError(101, "Network is unreachable (test)")

  def refuse(self, resource):
    calls["download"].append(resource.url)
    raise AssertionError(f"tfds tried to download {resource.url}")

  real_prepare = tfds_mod.core.DatasetBuilder.download_and_prepare

  def prepare(self, *args, download_config=None, **kwargs):
    manual = download_config.manual_dir if download_config else None
    calls["prepare"].append(manual)
    if manual is None:
      raise AssertionError("tfds download_and_prepare without an archive")
    return real_prepare(self, *args, download_config=download_config,
                        **kwargs)

  monkeypatch.setattr(socket, "create_connection", offline)
  monkeypatch.setattr(download_manager.DownloadManager, "_download", refuse)
  monkeypatch.setattr(tfds_mod.core.DatasetBuilder, "download_and_prepare",
                      prepare)
  return calls


def test_tfds_expects_the_url_basename_in_manual_dir(tfds_checksums):
  """What tfds registers: the manual_dir file name is the URL basename."""
  from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
  for name, filename, size in (("cifar10", "cifar-10-binary.tar.gz",
                                170052171),
                               ("cifar100", "cifar-100-binary.tar.gz",
                                168513733)):
    builder = tfds_checksums.builder(name, data_dir="/nonexistent-tfds")
    assert builder._cifar_info.url == cifar.SPECS[name].url  # pylint: disable=protected-access
    got, info = cifar.expected_archive(builder, cifar.SPECS[name].url)
    assert got == filename and cifar.SPECS[name].url.endswith("/" + got)
    assert int(info.size) == size


def test_cifar_missing_archive_fails_fast_with_the_file_to_fetch(
    tmp_path, no_network):
  """download=False (explicit now that the default is True): no probe, no
  tfds call, the error names the file, the folder and the URL."""
  t = time.perf_counter()
  with pytest.raises(DataError) as e:
    load_dataset({"name": "cifar10", "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": str(tmp_path / "manual"), "download": False})
  assert time.perf_counter() - t < 10
  one_line_error(e, "data.manual_dir", "CIFAR-10 is not prepared in",
                 str(tmp_path / "tfds"),
                 str(tmp_path / "manual" / "cifar-10-binary.tar.gz"),
                 "does not exist",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                 "set data.download=True")
  # Empty manual_dir: tfds's default <data_dir>/downloads/manual is named.
  with pytest.raises(DataError) as e:
    load_dataset({"name": "cifar100", "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": "", "download": False})
  one_line_error(e, str(tmp_path / "tfds" / "downloads" / "manual" /
                        "cifar-100-binary.tar.gz"), "cifar-100-binary.tar.gz")
  assert no_network == {"connect": [], "download": [], "prepare": []}
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("name, archive", [
    ("cifar10", "cifar-10-binary.tar.gz"),
    ("cifar100", "cifar-100-binary.tar.gz")])
def test_cifar_download_by_default_offline_fails_before_tfds(
    tmp_path, no_network, name, archive):
  """download defaults to True; offline, the probe's failed connect ends the
  load with the file to fetch, before tfds downloads (retrying for minutes)
  and before anything is written to the data dir."""
  with pytest.raises(DataError) as e:
    load_dataset({"name": name, "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": str(tmp_path / "manual")})
  url = data.cifar.SPECS[name].url
  msg = one_line_error(e, "data.manual_dir", "is not prepared in",
                       str(tmp_path / "tfds"),
                       str(tmp_path / "manual" / archive), "does not exist",
                       "data.download cannot reach the network",
                       "www.cs.toronto.edu:443", "Network is unreachable",
                       f"download {url} and put it there")
  assert "set data.download=True" not in msg
  assert no_network["connect"] == [("www.cs.toronto.edu", 443)]
  assert no_network["download"] == [] and no_network["prepare"] == []
  assert not (tmp_path / "tfds").exists()
  assert not (tmp_path / "manual").exists()


def test_cifar_archive_of_the_wrong_size(tmp_path, tfds_checksums,
                                         no_network):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_cifar_archive(str(manual / "cifar-10-binary.tar.gz"), "cifar10")
  with pytest.raises(DataError) as e:
    load_dataset({"name": "cifar10", "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": str(manual)})
  one_line_error(e, "data.manual_dir", str(manual / "cifar-10-binary.tar.gz"),
                 "expected 170052171")


def register_fake(monkeypatch, tfds_mod, name, path, checksum=None):
  """Registers the fake archive's size/sha256 in place of the real ones.

  tfds verifies a manually placed archive against the sha256 in its
  url_checksums/<name>.txt, and there is no DownloadConfig option to skip
  that for manual files (register_checksums=True would rewrite tfds's own
  checksums file). So the test swaps the registered UrlInfo, keeping tfds's
  file name: tfds itself still has to find `path` in manual_dir by that name.
  """
  from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core.download import checksums  # pylint: disable=import-outside-toplevel
  cls = type(tfds_mod.builder(name, data_dir="/nonexistent-tfds"))
  url = cifar.SPECS[name].url
  real = cls.url_infos[url]
  assert real.filename == os.path.basename(path)
  fake = checksums.compute_url_info(path)
  monkeypatch.setattr(cls, "url_infos", {url: checksums.UrlInfo(
      size=fake.size, checksum=checksum or fake.checksum,
      filename=real.filename)})


@pytest.mark.parametrize("name, archive", [
    ("cifar10", "cifar-10-binary.tar.gz"),
    ("cifar100", "cifar-100-binary.tar.gz")])
def test_cifar_prepared_from_a_manual_archive(tmp_path, monkeypatch,
                                              tfds_checksums, no_network,
                                              name, archive):
  manual = tmp_path / "manual"
  manual.mkdir()
  expected = write_cifar_archive(str(manual / archive), name)
  register_fake(monkeypatch, tfds_checksums, name, str(manual / archive))
  cfg = {"name": name, "data_dir": str(tmp_path / "tfds"),
         "manual_dir": str(manual)}
  ds = load_dataset(cfg)  # download left at its default, True
  assert (tmp_path / "tfds" / name / "3.0.2").is_dir()
  # An archive in manual_dir: no probe, no download, as before the default.
  assert no_network["connect"] == [] and no_network["download"] == []
  assert ds.name == name and ds.num_classes == (10 if name == "cifar10"
                                                else 100)
  for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                ("test", ds.test_images, ds.test_labels)):
    want_images, want_labels = expected[split]
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    # Same records, same (file) order, CHW bytes turned into HWC.
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  assert ds.mean == data.cifar.SPECS[name].mean
  # Prepared now: the archive is no longer needed, and train_subset applies.
  (manual / archive).unlink()
  sub = load_dataset(dict(cfg, train_subset=3))
  np.testing.assert_array_equal(sub.train_images, expected["train"][0][:3])
  np.testing.assert_array_equal(sub.train_labels, expected["train"][1][:3])


def test_cifar_archive_with_the_wrong_checksum(tmp_path, monkeypatch,
                                               tfds_checksums, no_network):
  manual = tmp_path / "manual"
  manual.mkdir()
  path = str(manual / "cifar-10-binary.tar.gz")
  write_cifar_archive(path, "cifar10")
  register_fake(monkeypatch, tfds_checksums, "cifar10", path,
                checksum="0" * 64)
  with pytest.raises(DataError) as e:
    load_dataset({"name": "cifar10", "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": str(manual)})
  one_line_error(e, "data.manual_dir", path, "wrong sha256 checksum",
                 "0" * 64)
  assert not (tmp_path / "tfds" / "cifar10" / "3.0.2").exists()


def test_tensorflow_is_kept_off_the_gpus(monkeypatch, tfds_mod):
  """import_tf hides every GPU from TensorFlow, and survives TF refusing.

  (tfds.testing.mock_data is not used: with tensorflow 2.21 and tfds 4.9.10
  its mocked as_dataset(batch_size=-1) aborts the process with
  std::length_error, even for mnist; the manual-archive tests above cover
  the real read path instead.)
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda devices, kind=None: calls.append((devices, kind)))
  assert cifar.import_tf() == (tf, tfds_mod)
  assert calls == [([], "GPU")]

  def refuse(devices, kind=None):
    raise RuntimeError("Visible devices cannot be modified after being "
                       "initialized")

  monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
  assert cifar.import_tf() == (tf, tfds_mod)


def test_cifar_archive_with_the_wrong_contents(tmp_path, monkeypatch,
                                               tfds_checksums, no_network):
  """Right name and (registered) checksum, but not the CIFAR layout inside:
  whatever tfds raises comes back as one line naming the archive."""
  manual = tmp_path / "manual"
  manual.mkdir()
  path = str(manual / "cifar-10-binary.tar.gz")
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("something-else/readme.txt")
    info.size = 5
    tar.addfile(info, io.BytesIO(b"hello"))
  register_fake(monkeypatch, tfds_checksums, "cifar10", path)
  with pytest.raises(DataError) as e:
    load_dataset({"name": "cifar10", "data_dir": str(tmp_path / "tfds"),
                  "manual_dir": str(manual)})
  one_line_error(e, "data.manual_dir", "preparing CIFAR-10 in", path,
                 "failed:", "batches.meta.txt")
  assert not (tmp_path / "tfds" / "cifar10" / "3.0.2").exists()
