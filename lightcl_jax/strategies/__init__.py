"""Continual-learning strategies by name; `register_strategy` adds one."""

from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.finetune import Finetune
from lightcl_jax.strategies.lightcl import LightCL

STRATEGIES: dict[str, Strategy] = {"lightcl": LightCL(), "finetune": Finetune()}


def register_strategy(strategy: Strategy) -> None:
    """Makes ``strategy`` available under ``strategy.name`` (to configs and the CLI)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"expected a Strategy instance, got {type(strategy).__name__}")
    STRATEGIES[strategy.name] = strategy


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Strategy", "Finetune", "LightCL", "register_strategy", "get_strategy"]
