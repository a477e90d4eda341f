"""lightcl_jax.data."""
