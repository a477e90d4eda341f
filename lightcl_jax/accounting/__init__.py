"""What a train step costs, from the compiler; what a run costs, counted as the paper does."""

from lightcl_jax.accounting.compiled import compiled_eval_step_cost, compiled_train_step_cost
from lightcl_jax.accounting.theory import (LIGHTCL_MEM_GAP, PAPER_SETTINGS, PAPER_TABLE1,
                                           kept_channels, layer_table, lightcl_memory_gap,
                                           reproduction_table, theoretical_cost)

__all__ = ["compiled_train_step_cost", "compiled_eval_step_cost", "theoretical_cost",
           "layer_table", "kept_channels", "lightcl_memory_gap", "reproduction_table",
           "LIGHTCL_MEM_GAP", "PAPER_TABLE1", "PAPER_SETTINGS"]
