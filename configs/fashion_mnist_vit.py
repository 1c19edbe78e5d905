"""A small Vision Transformer on Fashion-MNIST: BSQ on a model in plain Flax.

    apt-get install -y dataset-fashion-mnist
    python main.py --config=configs/fashion_mnist_vit.py

`bsq_jax/models/vit.py` is an ordinary Flax ViT (patch 4 on the 32x32
padded images, 4 pre-norm blocks of dim 64 with 4 heads, MLP 128) that knows
nothing of BSQ; the "flax" model family wraps it by import path, and the
rules below choose what is quantized: every kernel (patch embedding, query,
key, value and output projections, both MLP layers, the head); biases,
LayerNorms, the class token and the position embeddings stay float. No
activation is quantized. results/fashion_mnist_vit.md has a run.
"""

import ml_collections

from configs import fashion_mnist_resnet20


def vit_model(**kwargs):
  m = ml_collections.ConfigDict()
  m.name = "flax"                       # any Flax model (bsq_jax/models/any_flax.py)
  m.module = "bsq_jax.models.vit:ViT"   # import path : class
  m.kwargs = ml_collections.ConfigDict({**dict(
      num_classes=10, patch=4, dim=64, depth=4, heads=4, mlp_dim=128),
      **kwargs})                         # the class's fields
  m.nnx = False                         # a flax.linen Module
  m.input_shape = (32, 32, 1)           # padded Fashion-MNIST images
  m.num_classes = 10                    # must match the data set
  m.rules = ml_collections.ConfigDict(dict(
      weights=((r"(.*/)?kernel", True),),  # (regex over param paths, quantize)
      acts=(),                             # (regex over module paths, bits, clip)
      bias=False))                         # True: biases of quantized layers too
  m.scale_grad = "none"                 # scales trained as in the authors'
  # release, as results/fashion_mnist_vit.md was run; "lsq" (the default for
  # a "flax" model) scales their gradients for large layers
  return m


def get_config():
  c = fashion_mnist_resnet20.get_config()
  c.model = vit_model()
  c.pretrain.lr = 0.05
  c.bsq.lr = 0.05
  c.bsq.alpha = 0.3
  c.finetune.lr = 0.005
  return c
