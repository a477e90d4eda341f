"""A strategy of your own, with a hyperparameter, in one file: an L2 anchor.

From task 1 on, the loss gains ``weight x sum((theta - theta*)^2)``, theta* the
weights at the end of the previous task (EWC with a Fisher of ones). Copy this
file and change what differs; `lightcl_jax.Strategy` lists every hook.

From the command line, by the file's path (no registering, no library edit)::

    python -m experiments.run --strategy docs/examples/l2_anchor.py:L2Anchor \\
        --strategy-arg weight=0.05
    python -m experiments.run --strategy docs/examples/l2_anchor.py:L2Anchor --help

From Python::

    import lightcl_jax as lcl
    from l2_anchor import L2Anchor

    lcl.register_strategy(L2Anchor)          # or name it "l2_anchor.py:L2Anchor"
    results = lcl.train_and_evaluate(
        lcl.Config(strategy="l2_anchor", strategy_args={"weight": 0.05}))
"""

import jax
import jax.numpy as jnp

import lightcl_jax as lcl


def squared_distance(params, anchor) -> jax.Array:
    """sum over every parameter of (params - anchor)^2 (pytrees of one structure)."""
    squares = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    return sum(jax.tree_util.tree_leaves(squares))


class L2Anchor(lcl.Strategy):
    """finetune, pulled toward the previous task's weights."""

    name = "l2_anchor"
    # A hyperparameter: a typed field with its default and what is allowed. A run records
    # it; --strategy-arg weight=... sets it; --help lists it.
    weight: float = lcl.hyperparameter(0.01, "weight of the pull", minimum=0)

    def uses_memory(self, task_index):
        return task_index >= 1                      # the memory enters the step from task 1

    def end_task(self, memory, *, params, **_):
        return jax.tree_util.tree_map(jnp.copy, params)   # the anchor: this task's weights

    def extra_loss(self, forward, eval_forward, params, memory, **_):
        penalty = squared_distance(params, memory)
        return self.weight * penalty, {"l2_anchor": penalty}
