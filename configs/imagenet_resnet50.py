"""ResNet-50 on ImageNet under BSQ, from torchvision's pretrained weights.

    python main.py --config=configs/imagenet_resnet50.py \
        --config.convert.init_from=resnet50.npz \
        --config.data.manual_dir=/data/imagenet

The paper's setting: a pretrained float model converted to 8 bits, BSQ at
alpha 5e-3 with 4-bit activations (11.90x compression reported), batch 256
over all devices, SGD with momentum 0.9 and weight decay 1e-4. The paper
gives no ImageNet learning rates or epoch counts; the ones below are this
project's choice (a short finetune-style schedule from a trained model) and
are fields to change. The 1x1 downsample convolutions are quantized
(`model.quantize_shortcut`).
"""

import ml_collections

from configs import cifar_resnet20


def imagenet_data():
  """The data section shared by the ImageNet configs."""
  return ml_collections.ConfigDict(dict(
      name="imagenet2012",      # imagenet2012 | synthetic_stream (tests)
      data_dir="",              # where tfds keeps the prepared TFRecords
      manual_dir="",            # ILSVRC2012_img_{train,val}.tar, read once
      shuffle_buffer=10_000,    # examples in tf.data's shuffle buffer
      host_prefetch=2,          # decoded batches kept ready per process
      augment=True,             # (host-side for ImageNet: always on)
      num_classes=1000,         # synthetic_stream only
      synthetic_train=1024,     # synthetic_stream only: training images
      synthetic_test=256,       # synthetic_stream only: test images
  ))


def imagenet_schedules(c, alpha):
  """Batch, optimizer and stage schedules shared by the ImageNet configs."""
  c.stages = "convert,bsq,finetune"   # convert.init_from: the pretrained start
  c.batch_size = 256            # global, over all devices of all hosts
  c.eval_batch_size = 256       # 50,000 validation images: 196 batches
  c.chunk_steps = 100           # host-fed: steps between metric reads
  c.data = imagenet_data()
  for name, (epochs, lr, milestones) in {
      "pretrain": (90, 0.1, (30, 60, 80)),  # from scratch, torchvision's recipe
      "bsq": (30, 0.01, (20,)),             # from the pretrained 8-bit model
      "finetune": (20, 0.001, (10,))}.items():
    c[name].update(dict(epochs=epochs, lr=lr, lr_milestones=milestones))
  c.bsq.default_alpha = alpha   # the paper's; bsq.alpha or a target overrides
  c.bsq.requant_interval = 10
  return c


def get_config():
  c = cifar_resnet20.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name="resnet50",          # torchvision's layout, v1.5
      num_classes=1000,
      act_bits=4,               # the paper's 4-bit activations
      image_size=224,           # train crop and eval centre crop
      quantize_shortcut=True,   # quantize the 1x1 downsample convolutions
  ))
  return imagenet_schedules(c, 5e-3)
