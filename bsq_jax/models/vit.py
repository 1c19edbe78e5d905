"""A small Vision Transformer in plain Flax, written the ordinary way.

Nothing here knows about BSQ: the "flax" model family (`any_flax`) wraps it
with rules like any user's model. Patch embedding (a strided convolution),
a class token and learned position embeddings, `depth` pre-norm encoder
blocks (multi-head self-attention and a GELU MLP, each with a residual),
a final LayerNorm and a linear head on the class token.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp1")(y))
    return x + nn.Dense(x.shape[-1], name="mlp2")(y)


class ViT(nn.Module):
  """ViT for small images: (N, H, W, C) -> (N, num_classes) logits."""
  num_classes: int = 10
  patch: int = 4
  dim: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (self.patch, self.patch),
                strides=(self.patch, self.patch), padding="VALID",
                name="patch_embed")(x)
    n, h, w, d = x.shape
    x = x.reshape((n, h * w, d))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02),
                       (1, h * w + 1, d))
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])
