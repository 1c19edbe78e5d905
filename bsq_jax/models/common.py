"""Pieces the built-in models share, in plain Flax."""

from __future__ import annotations

import flax.linen as nn

from bsq_jax.rules import ActRule, Rules, WeightRule


def batch_norm(train: bool, name: str) -> nn.Module:
  # PyTorch's defaults: momentum 0.1 (Flax counts 1 - 0.1), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, name=name)


def conv(features: int, k: int, strides: int = 1, padding=None,
         kernel_init=nn.initializers.kaiming_normal(), name=None) -> nn.Conv:
  """A k x k convolution without bias, padded as PyTorch pads (k // 2)."""
  return nn.Conv(features, (k, k), strides=(strides, strides),
                 padding=padding or [(k // 2, k // 2)] * 2, use_bias=False,
                 kernel_init=kernel_init, name=name)


def resnet_rules(acts: str, act_bits: int, quantize_shortcut: bool) -> Rules:
  """Every conv kernel (the 1x1 shortcuts if `quantize_shortcut`), every
  dense layer's kernel and bias, and the activations that `acts` matches."""
  return Rules(
      weights=(WeightRule(r".*downsample_conv/kernel", quantize_shortcut),
               WeightRule(r"(.*/)?kernel")),
      acts=(ActRule(acts, act_bits),), bias=True)
