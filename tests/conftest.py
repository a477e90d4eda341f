"""Test settings: strict dtype promotion and no implicit rank promotion, as equinox does.

Tests train tiny models, so XLA's compile time dominates their run time: they
compile with LLVM's cheaper optimisation level (set before the CPU backend
starts; runs and benchmarks keep XLA's defaults), and JAX's persistent
compilation cache, in a directory that lives for the test session (shared
by pytest-xdist's workers and the CLI subprocesses tests start), compiles a
program that several tests build only once.
"""

import atexit
import os
import shutil
import tempfile

# One LLVM module per program: splitting it for parallel code generation took longer on
# two cores that pytest-xdist's workers already share (a tiny train step compiled in
# 0.55-0.8 s against 0.65-1.07 s).
_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
          "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""),
    *(flag for flag in _FLAGS if flag not in os.environ.get("XLA_FLAGS", ""))]))

# Several test processes may share one GPU: none takes most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the one pytest-xdist's controller made
else:
    _CACHE = tempfile.mkdtemp(prefix="lightcl-jax-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Set here and in the environment, so that pytest-xdist's workers and the CLI
# subprocesses that tests start share it.
for _name, _value in (("jax_compilation_cache_dir", _CACHE),
                      ("jax_persistent_cache_min_compile_time_secs", 0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)

# LIGHTCL_COMPILE_REPORT=DIR: each test process (each pytest-xdist worker) writes to
# DIR/compile-<worker>.json the seconds JAX spent tracing, lowering and compiling, and
# restoring from the cache (its duration events, summed; CLI subprocesses not included).
if os.environ.get("LIGHTCL_COMPILE_REPORT"):
    import collections
    import json

    _SPENT = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: _SPENT.update({event: seconds})
        if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/")) else None)

    def _write_compile_report(directory=os.environ["LIGHTCL_COMPILE_REPORT"]):
        os.makedirs(directory, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(directory, f"compile-{worker}.json"), "w") as f:
            json.dump(dict(_SPENT), f, indent=1)
    atexit.register(_write_compile_report)


_CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def _keep_the_compilation_cache_settings():
    """A command run in a test's process sets JAX's cache settings
    (`lightcl_jax.compiler.use_compilation_cache`); the next test gets the session's."""
    before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
    yield
    for name, value in before.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)


@pytest.fixture(scope="session")
def digits_stream():
    from lightcl_jax.data.streams import make_stream
    return make_stream("digits")


# pytest-xdist (--dist loadfile) hands each worker whole files in collection order. Files
# that take longest (their serial seconds, measured with --durations=0) go first, so that
# no worker is left running a long file alone while the other has finished.
LONGEST_FIRST = ("test_checkpoint.py", "test_compare.py", "test_strategies.py",
                 "test_distributed.py", "test_accounting.py", "test_extending.py",
                 "test_seeds.py", "test_training.py", "test_export.py", "test_cli.py",
                 "test_power_loss.py", "test_parallel.py", "test_generalizability.py",
                 "test_sparsity.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
