"""The paper's pipeline at alpha 1e-3: more bits, accuracy near float.

    python main.py --config=configs/cifar_resnet20_alpha1e-3.py
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.bsq.alpha = 1e-3
  return c
