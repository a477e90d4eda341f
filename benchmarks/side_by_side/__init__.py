"""Side-by-side runs of the authors' LightCL script and lightcl_jax (`benchmarks.vs_reference`)."""
