"""Benchmarks, probes and checks of lightcl_jax: ``python -m benchmarks.NAME``."""
