"""lightcl_jax.memory."""
