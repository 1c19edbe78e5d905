"""The bad-input catalogue: each case goes through main.py's own code path and
must end with one `error:` line that names the field, flag or file and what is
expected, a non-zero exit, no traceback, and the workdir as it was.

main.py runs in this process (its absl flags re-parsed per case), since a
fresh interpreter per case would cost ~5 s each; the one case that needs a
process of its own (a process count that never completes) starts one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import main as main_py
from bsq_jax.checkpoint import StageCheckpoints
from fake_fmnist import idx_images, idx_labels, write_fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
SMOKE_VIT = os.path.join(ROOT, "configs", "smoke_vit.py")


def snapshot(path):
  if not os.path.exists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    for name in files + dirs:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = (open(full, "rb").read()
                                          if os.path.isfile(full) else "dir")
  return out


def run_main(args, workdir, capsys, monkeypatch):
  """main.py's flag parsing and main(), here; returns (exit code, stderr).
  The config is smoke.py unless `args` name another (--config=...)."""
  config = next((a for a in args if a.startswith("--config=")),
                f"--config={SMOKE}")
  args = [a for a in args if not a.startswith("--config=")]
  argv = ["main.py", config, f"--workdir={workdir}", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides there
  # The --config.* override flags are registered while --config is parsed;
  # drop the last case's so this parse starts as a fresh process would.
  for name in [n for n in main_py.FLAGS if n.startswith("config.")]:
    delattr(main_py.FLAGS, name)
  main_py.FLAGS.unparse_flags()
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main_py.parse_flags(argv)
    main_py.main(argv[:1])
  return e.value.code, capsys.readouterr().err


# -- what some cases need on disk ---------------------------------------------

def fmnist_dir(tmp, **overrides):
  folder = str(tmp / "fmnist")
  write_fmnist(folder, n_train=128, n_test=20, overrides=overrides)
  return ["--config.data.name=fashion_mnist", "--config.model.channels=1",
          f"--config.data.fashion_mnist_dir={folder}"]


def state_dict_npz(tmp, change):
  """A state_dict of the smoke model's float layout, changed by `change`."""
  from bsq_jax import pretrained  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from bsq_jax.models.cifar_resnet import CifarResNet  # pylint: disable=import-outside-toplevel
  model = CifarResNet(depth=8, num_classes=10)  # plain: no PACT params
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros((1, 32, 32, 3))))
  sd = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    shape = leaf.shape
    shape = {4: lambda s: (s[3], s[2], s[0], s[1]),
             2: lambda s: s[::-1]}.get(len(shape), lambda s: s)(shape)
    sd[pretrained.cifar_torch_name(tuple(k.key for k in path[1:]))] = np.ones(
        shape, np.float32)
  change(sd)
  path = str(tmp / "model.npz")
  np.savez(path, **sd)
  return [f"--config.convert.init_from={path}", "--config.stages=convert",
          "--config.model.width=16"]


def workdir_with_checkpoint(tmp, meta_model):
  """A workdir of the smoke run whose convert checkpoint says `meta_model`."""
  workdir = tmp / "run"
  workdir.mkdir()
  from configs import smoke  # pylint: disable=import-outside-toplevel
  model = smoke.get_config().model.to_dict()
  (workdir / "run.json").write_text(json.dumps(
      {"model": model, "data": "synthetic", "seed": 0}))
  ck = StageCheckpoints(str(workdir), "convert")
  ck.save(0, {"x": np.zeros(2, np.float32)},
          {"mode": "bsq", "scheme": {}, "finished": True,
           "model_config": dict(model, **meta_model)})
  ck.close()
  return workdir


# -- the catalogue ---------------------------------------------------------------
# id: (args, or a function of tmp_path giving them; what the line must hold)

CASES = {
    # config: types and ranges
    "unknown field": (["--config.bsq.no_such_field=1"], ["no_such_field"]),
    "wrong type": (["--config.bsq.lr=fast"], ["--config.bsq.lr=fast"]),
    "alpha < 0": (["--config.bsq.alpha=-0.5"],
                  ["config.bsq.alpha", "expected >= 0"]),
    "bits > 16": (["--config.convert.bits=17"],
                  ["config.convert.bits", "expected <= 16"]),
    "bits < 1": (["--config.convert.bits=0"],
                 ["config.convert.bits", "expected >= 1"]),
    "max_bits > 16": (["--config.bsq.max_bits=20"],
                      ["config.bsq.max_bits", "expected <= 16"]),
    "act_bits": (["--config.model.act_bits=20"],
                 ["config.model.act_bits", "expected 1..16 or 32"]),
    "lr = 0": (["--config.finetune.lr=0"], ["config.finetune.lr", "expected > 0"]),
    "epochs < 0": (["--config.bsq.epochs=-1"], ["config.bsq.epochs", "expected >= 0"]),
    "requant_interval 0": (["--config.bsq.requant_interval=0"],
                           ["config.bsq.requant_interval", "expected >= 1"]),
    "eval_every 0": (["--config.eval_every=0"], ["config.eval_every", "expected >= 1"]),
    "unknown stage": (["--config.stages=pretrain,train"],
                      ["config.stages", "unknown stage", "'train'"]),
    "depth not 6k+2": (["--config.model.depth=21"],
                       ["config.model.depth", "expected 6k+2", "21"]),
    "alpha and target": (["--config.bsq.alpha=0.01", "--config.bsq.target_bits=3"],
                         ["bsq.alpha", "bsq.target_bits"]),
    "batch over devices": (["--config.batch_size=100"],
                           ["config.batch_size", "does not split evenly"]),
    # data
    "missing data dir": (["--config.data.name=fashion_mnist",
                          "--config.model.channels=1",
                          "--config.data.fashion_mnist_dir=/nonexistent/fm"],
                         ["/nonexistent/fm", "dataset-fashion-mnist"]),
    "truncated IDX": (lambda t: fmnist_dir(t, **{
        "train-images-idx3-ubyte": idx_images(np.zeros((128, 28, 28), np.uint8))[:-50]}),
        ["train-images-idx3-ubyte.gz", "is truncated"]),
    "label out of range": (lambda t: fmnist_dir(t, **{
        "t10k-labels-idx1-ubyte": idx_labels([3] * 19 + [12])}),
        ["t10k-labels-idx1-ubyte.gz", "expected labels in 0..9, got 12"]),
    "image shape vs model": (lambda t: [a for a in fmnist_dir(t)
                                        if "channels" not in a],
                             ["config.model.channels/image_size",
                              "(32, 32, 3)", "(32, 32, 1)"]),
    "classes vs data": (["--config.model.num_classes=100"],
                        ["config.model.num_classes", "100"]),
    "subset > data": (["--config.data.train_subset=5000"],
                      ["data.train_subset", "expected at most 512"]),
    # checkpoints
    "stage not run": (["--config.stages=bsq"],
                      ["config.stages", "'convert' has not finished"]),
    "checkpoint of another model": (
        lambda t: ["--config.stages=bsq", f"--workdir={workdir_with_checkpoint(t, {'depth': 20})}"],
        ["convert: checkpoint of epoch 0 is of another model", "model.depth"]),
    "corrupt checkpoint": (
        lambda t: ["--config.stages=bsq", f"--workdir={corrupt(workdir_with_checkpoint(t, {}))}"],
        ["'convert' has not finished", "is unreadable"]),
    "init_from missing": (["--config.convert.init_from=/nope/model.pth"],
                          ["config.convert.init_from", "/nope/model.pth",
                           "does not exist"]),
    # PyTorch imports (a state_dict saved as .npz needs no torch)
    "state_dict missing key": (
        lambda t: state_dict_npz(t, lambda sd: sd.pop("fc.weight")),
        ["config.convert.init_from", "missing key 'fc.weight'"]),
    "state_dict misshapen key": (
        lambda t: state_dict_npz(t, lambda sd: sd.update(
            {"conv1.weight": np.ones((16, 3, 5, 5), np.float32)})),
        ["config.convert.init_from", "'conv1.weight' has shape"]),
    "not a state_dict": (
        lambda t: [f"--config.convert.init_from={garbage(t)}",
                   "--config.stages=convert"],
        ["config.convert.init_from", "expected a .npz of arrays"]),
    # rules of a plain Flax model (the ViT of configs/smoke_vit.py)
    "rule matches nothing": (
        [f"--config={SMOKE_VIT}", '--config.model.rules.weights=(("nothing", True),)'],
        ["config.model.rules", "weight rule 'nothing' matches no parameter"]),
    "rule picks a norm scale": (
        [f"--config={SMOKE_VIT}",
         '--config.model.rules.weights=(("block0/ln1/scale", True),)'],
        ["config.model.rules", "block0/ln1/scale", "LayerNorm layer"]),
    "nothing to quantize": (
        [f"--config={SMOKE_VIT}",
         '--config.model.rules.weights=(("(.*/)?kernel", False),)'],
        ["config.model.rules", "no parameter is quantized"]),
    "model not importable": (
        [f"--config={SMOKE_VIT}", "--config.model.module=no_such.pkg:Net"],
        ["config.model.module", "cannot import 'no_such.pkg'"]),
    # several processes
    "coordinator alone": (["--coordinator_address=127.0.0.1:1"],
                          ["--coordinator_address needs --num_processes and "
                           "--process_id"]),
    "process id >= count": (["--coordinator_address=127.0.0.1:1",
                             "--num_processes=2", "--process_id=2"],
                            ["--process_id", "< --num_processes (2), got 2"]),
    "no processes": (["--coordinator_address=127.0.0.1:1",
                      "--num_processes=0", "--process_id=0"],
                     ["--process_id", "--num_processes (0)"]),
}


def corrupt(workdir):
  for root, _, files in os.walk(workdir / "convert"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  return workdir


def garbage(tmp):
  path = tmp / "model.npz"
  path.write_bytes(b"not a zip file")
  return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, capsys, monkeypatch):
  args, parts = CASES[case]
  if callable(args):
    args = args(tmp_path)
  default = str(tmp_path / "fresh")
  workdir = next((a.split("=", 1)[1] for a in args
                  if a.startswith("--workdir=")), default)
  args = [a for a in args if not a.startswith("--workdir=")]
  before = snapshot(workdir)
  code, err = run_main(args, workdir, capsys, monkeypatch)
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert code not in (0, None), err[-2000:]
  assert len(lines) == 1, err[-2000:]
  assert "Traceback" not in err
  for part in parts:
    assert part in lines[0], (part, lines[0])
  assert snapshot(workdir) == before  # nothing created, nothing changed


CIFAR = os.path.join(ROOT, "configs", "cifar_resnet20.py")


@pytest.fixture
def offline(monkeypatch):
  """As if offline: every TCP connect fails at once; tfds's
  download_and_prepare must not be called. Returns the calls made."""
  import socket  # pylint: disable=import-outside-toplevel
  from bsq_jax.data import cifar  # pylint: disable=import-outside-toplevel
  _, tfds = cifar.import_tf()
  calls = {"connect": [], "prepare": []}

  def unreachable(address, *args, **kwargs):
    calls["connect"].append(tuple(address))
    raise OSError(101, "Network is unreachable (test)")

  def prepare(self, *args, **kwargs):
    calls["prepare"].append(self.name)
    raise AssertionError("tfds download_and_prepare was called")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      prepare)
  return calls


@pytest.mark.parametrize("download", [None, "False"])
def test_cifar_missing_offline(download, tmp_path, capsys, monkeypatch,
                               offline):
  """The paper's config, CIFAR-10 neither prepared nor in manual_dir, no
  network. data.download (default True): the probe fails, and the error
  names the archive, the folder and the URL before tfds is asked to
  download. --config.data.download=False: the same error as before the
  default changed, without even the probe. Nothing written anywhere."""
  tfds_dir, manual = tmp_path / "tfds", tmp_path / "manual"
  args = [f"--config={CIFAR}", f"--config.data.data_dir={tfds_dir}",
          f"--config.data.manual_dir={manual}"]
  if download:
    args.append(f"--config.data.download={download}")
  workdir = str(tmp_path / "run")
  code, err = run_main(args, workdir, capsys, monkeypatch)
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 1 and len(lines) == 1, err[-2000:]
  assert "Traceback" not in err
  for part in ("data.manual_dir", f"not prepared in {tfds_dir}",
               f"{manual / 'cifar-10-binary.tar.gz'} does not exist",
               "download https://www.cs.toronto.edu/~kriz/"
               "cifar-10-binary.tar.gz and put it there"):
    assert part in lines[0], (part, lines[0])
  if download is None:
    assert "data.download cannot reach the network (www.cs.toronto.edu:443" \
        in lines[0], lines[0]
    assert offline["connect"] == [("www.cs.toronto.edu", 443)]
  else:
    assert "or set data.download=True" in lines[0], lines[0]
    assert offline["connect"] == []
  assert offline["prepare"] == []
  assert not os.path.exists(workdir)
  assert not tfds_dir.exists() and not manual.exists()


def test_process_count_that_never_completes(tmp_path):
  """--num_processes 2 with only one process: XLA would abort the process at
  its own timeout, so main.py ends it first with one line."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "main.py", f"--config={SMOKE}", f"--workdir={workdir}",
       "--coordinator_address=127.0.0.1:23461", "--num_processes=2",
       "--process_id=0", "--init_timeout=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --num_processes 2: not every process reached "
                         "127.0.0.1:23461 within --init_timeout 2s"), last
  assert not os.path.exists(workdir)
