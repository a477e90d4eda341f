"""What a train step costs, from the compiler; what a run costs, counted as the paper does.

Modules:
  * `lightcl_jax.accounting.theory` -- the paper's Table 1 counts, plain Python.
  * `lightcl_jax.accounting.compiled` -- a strategy's step compiled without a run.

XLA's figures for a compiled step (`CompiledStep`, `compiled_cost`, `run_resources`)
live in `lightcl_jax.compiler` and the process's memory figures in
`lightcl_jax.process`, below both this package and the training package, which
use them; they are re-exported here. The names below load their module on first use.
"""

from lightcl_jax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lightcl_jax.accounting.compiled": ("compiled_train_step_cost", "compiled_eval_step_cost",
                                        "lowered_train_step", "memory_plan"),
    "lightcl_jax.process": ("peak_rss_mb",),
    "lightcl_jax.accounting.theory": ("LIGHTCL_MEM_GAP", "PAPER_SETTINGS", "PAPER_TABLE1",
                                      "kept_channels", "layer_table", "lightcl_memory_gap",
                                      "reproduction_table", "theoretical_cost"),
    "lightcl_jax.compiler": ("CompiledStep", "compiled_cost", "run_resources"),
})
