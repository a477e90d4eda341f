"""Test settings: strict dtype promotion and no implicit rank promotion, as equinox does."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def digits_stream():
    from lightcl_jax.data.streams import make_stream
    return make_stream("digits")
