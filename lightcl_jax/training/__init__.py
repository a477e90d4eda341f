"""lightcl_jax.training."""
