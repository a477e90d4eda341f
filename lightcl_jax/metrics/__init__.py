"""lightcl_jax.metrics."""
