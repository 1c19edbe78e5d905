"""ResNet-20 on Fashion-MNIST, read from Debian's dataset-fashion-mnist.

    apt-get install -y dataset-fashion-mnist
    python main.py --config=configs/fashion_mnist_resnet20.py

The 28x28 grayscale images are padded to 32x32 and go through the CIFAR
ResNet with one input channel. The schedule here is short (CPU-sized); the
paper's alphas assume ~137,000 BSQ steps, so a short schedule needs a larger
alpha to move the precision at all.
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.data.name = "fashion_mnist"
  c.model.channels = 1
  c.data.train_subset = 12000   # first 12,000 training images (CPU budget)
  c.pretrain.epochs = 6
  c.pretrain.lr_milestones = (4,)
  c.bsq.epochs = 6
  c.bsq.lr_milestones = (5,)
  c.bsq.requant_interval = 2
  c.bsq.alpha = 0.3
  c.finetune.epochs = 3
  c.finetune.lr_milestones = (2,)
  return c
