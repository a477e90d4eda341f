"""``finetune``: plain SGD on all layers, task after task (the paper's "SGD" row)."""

from lightcl_jax.strategies.base import Strategy


class Finetune(Strategy):
    name = "finetune"
