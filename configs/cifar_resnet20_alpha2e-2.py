"""The paper's pipeline at alpha 2e-2: fewer bits, lower accuracy.

    python main.py --config=configs/cifar_resnet20_alpha2e-2.py
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.bsq.alpha = 2e-2
  return c
