"""lightcl_jax.model."""
