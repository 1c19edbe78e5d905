"""A tiny end-to-end run of every stage on synthetic data (< 1 minute, 2 CPUs).

    python main.py --config=configs/smoke.py

ResNet-8 with 8 stem channels, one epoch of 8 steps per stage and a large
alpha, so that the final host pass visibly lowers the precision. Nearly all
of the time is XLA compiling one train step per mode (float, bsq, finetune),
hence the fast-compile XLA level.
"""

from configs import cifar_resnet20


def get_config():
  c = cifar_resnet20.get_config()
  c.stages = "pretrain,convert,bsq,finetune,scratch"
  c.batch_size = 64
  c.eval_batch_size = 128
  c.xla_fast_compile = True
  c.model.depth = 8
  c.model.width = 8
  c.data.name = "synthetic"
  c.data.synthetic_train = 512
  c.data.synthetic_test = 256
  for stage in (c.pretrain, c.bsq, c.finetune):
    stage.epochs = 1
    stage.lr_milestones = ()
  c.bsq.requant_interval = 1
  c.bsq.alpha = 5.0
  return c
