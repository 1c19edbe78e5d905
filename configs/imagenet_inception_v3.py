"""Inception-V3 on ImageNet under BSQ, from torchvision's pretrained weights.

    python main.py --config=configs/imagenet_inception_v3.py \
        --config.convert.init_from=inception_v3.npz \
        --config.data.manual_dir=/data/imagenet

The paper's setting: alpha 2e-2 with 4-bit activations (12.89x compression
at 75.90% top-1 reported), 299x299 inputs, the auxiliary classifier used in
training only (loss weight 0.4). Batch, optimizer and schedules as in
`imagenet_resnet50.py` (the schedules are this project's choice).
"""

import ml_collections

from configs import cifar_resnet20, imagenet_resnet50


def get_config():
  c = cifar_resnet20.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name="inception_v3",      # torchvision's layout
      num_classes=1000,
      act_bits=4,               # the paper's 4-bit activations
      image_size=299,           # the auxiliary head needs 299
      aux_logits=True,          # auxiliary classifier, training only
      transform_input=True,     # as torchvision's pretrained weights expect
      dropout=0.5,              # before fc, in training
  ))
  return imagenet_resnet50.imagenet_schedules(c, 2e-2)
