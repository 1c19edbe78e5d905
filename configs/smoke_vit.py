"""Every stage on synthetic data with a tiny ViT (< 1 minute, 2 CPUs).

    python main.py --config=configs/smoke_vit.py

The plain-Flax ViT of configs/fashion_mnist_vit.py, one block of dim 16,
through pretrain, convert, bsq, finetune, scratch and uniform, one epoch
of 8 steps each, with a large alpha so the final host pass lowers the
precision.
"""

from configs import fashion_mnist_vit, smoke


def get_config():
  c = smoke.get_config()
  c.stages = "pretrain,convert,bsq,finetune,scratch,uniform"
  c.model = fashion_mnist_vit.vit_model(dim=16, depth=1, heads=2, mlp_dim=32)
  c.model.input_shape = (32, 32, 3)   # the synthetic images
  return c
