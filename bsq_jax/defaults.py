"""Every field of a pipeline run, at the paper's CIFAR-10 ResNet-20 values
(`bsq_jax.pipeline_config()`): the base that configs/ and a user's own run
change a few fields of. What each stage does: docs/configs.md.
"""

import ml_collections
from ml_collections import config_dict


def schedule(epochs, lr, milestones):
  return ml_collections.ConfigDict(dict(
      epochs=epochs,            # epochs of this stage
      lr=lr,                    # initial learning rate
      lr_milestones=milestones, # epochs at which lr is multiplied by 0.1
      momentum=0.9,             # SGD momentum (no dampening, no Nesterov)
      weight_decay=1e-4,        # coupled decay, g + wd * p, on every param
  ))


def pipeline_config():
  c = ml_collections.ConfigDict()
  c.seed = 0                    # init, data order and augmentation
  c.stages = "pretrain,convert,bsq,finetune"  # comma-separated, in order
  c.batch_size = 128            # global batch over all devices
  c.eval_batch_size = 1000      # global test batch (10,000 images: 10 steps)
  c.eval_every = 1              # epochs between test-set evaluations (and the last)
  c.chunk_steps = 100           # train steps per dispatch on GPU/TPU (rolled scan)
  c.cpu_chunk_steps = 1         # on CPU: unrolled, as XLA CPU runs loops ~10x slower
  c.xla_fast_compile = False    # XLA CPU opt level 0: ~20% quicker compiles, 1.6x slower steps

  c.model = ml_collections.ConfigDict()
  c.model.name = "cifar_resnet" # model family (bsq_jax/models)
  c.model.depth = 20            # 6k+2: 20, 32, 44, 56, 110
  c.model.num_classes = 10      # must match the dataset
  c.model.act_bits = 4          # activation bits; 32 = float ReLU
  c.model.width = 16            # stem channels (stages: 16, 32, 64)
  c.model.channels = 3          # input channels
  c.model.image_size = 32       # input height and width
  c.model.quantize_shortcut = False  # paper: 1x1 shortcuts stay float

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"       # cifar10 | cifar100 | fashion_mnist | synthetic
  c.data.data_dir = ""          # tensorflow-datasets data dir ("" = default)
  c.data.manual_dir = ""        # folder with cifar-10-binary.tar.gz (offline)
  c.data.download = True        # let tfds download CIFAR if it is missing
  c.data.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"  # IDX files
  c.data.image_size = 32        # images fed to the model (Fashion-MNIST: 28 unpadded)
  c.data.train_subset = 0       # 0 = all training images, else the first N
  c.data.augment = True         # random crop (4-pixel pad) and flip
  c.data.synthetic_train = 2048 # synthetic data only: training images
  c.data.synthetic_test = 512   # synthetic data only: test images

  c.pretrain = schedule(350, 0.1, (150, 250, 325))  # float training

  c.convert = ml_collections.ConfigDict()
  c.convert.bits = 8            # precision of every layer after conversion
  c.convert.init_from = ""      # a PyTorch .pth to start from instead

  c.bsq = schedule(350, 0.1, (250,))
  c.bsq.alpha = config_dict.placeholder(float)  # fixed alpha; None: default_alpha
  c.bsq.default_alpha = 5e-3    # alpha when neither alpha nor a target is set
  c.bsq.requant_interval = 100  # epochs between host passes (section 6)
  c.bsq.max_bits = 8            # precision never grows past this
  c.bsq.target_bits = 0.0       # budget mode: average bits to reach (0 = off)
  c.bsq.target_kbytes = 0.0     # budget mode: packed kB to reach (0 = off)
  c.bsq.budget_alpha_min = 1e-4 # budget mode: alpha stays in [min, max]
  c.bsq.budget_alpha_max = 0.1  # (short schedules need larger alphas)

  c.finetune = schedule(300, 0.01, (150, 250))  # also the scratch, uniform and hawq schedule

  c.hawq = ml_collections.ConfigDict()  # the HAWQ-V2-style baseline (bsq_jax/hawq.py)
  c.hawq.probes = 8             # Rademacher probes per batch (Hutchinson trace)
  c.hawq.batches = 4            # training batches of batch_size for the traces
  return c

