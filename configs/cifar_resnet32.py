"""ResNet-32 on CIFAR-10 with the paper's schedule and alpha 5e-3.

    python main.py --config=configs/cifar_resnet32.py
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.model.depth = 32
  return c
