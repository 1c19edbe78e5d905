"""The paper's CIFAR-10 ResNet-20 pipeline (docs/algorithm.md).

    python main.py --config=configs/cifar_resnet20.py

Float pretraining (350 epochs), 8-bit conversion, BSQ (350 epochs, alpha 5e-3,
re-quantization every 100 epochs, 4-bit activations), finetuning (300 epochs).
The paper reports 14.24x compression (2.25 average bits) at about 92% test
accuracy for this setting.
"""

from bsq_jax.defaults import pipeline_config as get_config  # pylint: disable=unused-import
from bsq_jax.defaults import schedule  # pylint: disable=unused-import
