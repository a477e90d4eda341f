"""What a train step costs, from the compiler."""

from lightcl_jax.accounting.compiled import compiled_train_step_cost

__all__ = ["compiled_train_step_cost"]
