"""ResNet-20 on CIFAR-100 with the paper's CIFAR-10 schedule.

    python main.py --config=configs/cifar100_resnet20.py
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.data.name = "cifar100"
  c.model.num_classes = 100
  return c
