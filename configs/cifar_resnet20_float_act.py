"""ResNet-20 on CIFAR-10 with float activations (plain ReLU, act_bits 32).

    python main.py --config=configs/cifar_resnet20_float_act.py
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.model.act_bits = 32
  return c
