"""Test settings: strict dtype promotion and no implicit rank promotion, as equinox does.

Tests train tiny models, so XLA's compile time dominates their run time: they
compile with LLVM's cheaper optimisation level (set before the CPU backend
starts; runs and benchmarks keep XLA's defaults), and JAX's persistent
compilation cache, in a directory that lives for the test session, compiles a
program that several tests build only once.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE = tempfile.mkdtemp(prefix="lightcl-jax-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def digits_stream():
    from lightcl_jax.data.streams import make_stream
    return make_stream("digits")
