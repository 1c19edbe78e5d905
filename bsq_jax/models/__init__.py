"""Model families built from the quantized layers of `bsq_jax.layers`."""
