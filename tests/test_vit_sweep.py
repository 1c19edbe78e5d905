"""benchmarks/vit_sweep.py end to end on a tiny ViT and made-up Fashion-MNIST
files: the runs, the per-tensor precision table and the plot."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))

import vit_sweep  # pylint: disable=wrong-import-position
from bsq_jax import config_check  # pylint: disable=wrong-import-position
from fake_fmnist import write_fmnist  # pylint: disable=wrong-import-position


def test_every_preset_config_passes_the_checks():
  for preset in vit_sweep.PRESETS.values():
    for stages, alpha in [("pretrain,convert", 0.0)] + [
        ("bsq,finetune", a) for a in preset.alphas]:
      config_check.check(vit_sweep.config_for(preset, stages, alpha))


def test_tiny_sweep_reports_every_tensor(tmp_path):
  folder = str(tmp_path / "fmnist")
  write_fmnist(folder, n_train=256, n_test=64)
  p = vit_sweep.PRESETS["tiny"]
  changes = {"data.fashion_mnist_dir": folder, "batch_size": 64,
             "eval_batch_size": 64, "xla_fast_compile": True,
             "model.kwargs.dim": 8, "model.kwargs.depth": 2,
             "model.kwargs.heads": 2, "model.kwargs.mlp_dim": 32}
  workdir = str(tmp_path / "runs")
  times = vit_sweep.run_all(p, workdir, **changes)
  assert set(times) == {"base", "alpha_5", "alpha_50"}
  data = vit_sweep.collect(p, workdir)
  layers = data["alphas"][-1]["layers"]
  order = vit_sweep.layer_order(layers)
  assert order[0] == "patch_embed/kernel" and order[-1] == "head/kernel"
  assert order[1:7] == [f"block0/{path}/kernel" for _, path in vit_sweep.KINDS]
  assert len(order) == 2 + 2 * 6
  # The larger alpha ends with no more bits than the smaller one, here
  # where alpha 50 is enough to crush every layer in one epoch.
  assert data["alphas"][1]["bits"] <= data["alphas"][0]["bits"]
  text = vit_sweep.report_text(p, data, "python benchmarks/vit_sweep.py",
                               times, "plot.png")
  assert "| block | query | key | value | out | mlp1 | mlp2 |" in text
  rows = [l for l in text.splitlines() if l.startswith("| 1 | ")]
  assert len(rows) == 2 and all(l.count("|") == 8 for l in rows)  # block 1
  plot = str(tmp_path / "layers.png")
  vit_sweep.plot_layers(data, plot)
  assert os.path.getsize(plot) > 1000
