"""bsq-jax: BSQ mixed-precision quantization (ICLR 2021) in JAX/Flax."""
