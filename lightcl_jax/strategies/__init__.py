"""Continual-learning strategies by name; `register_strategy` adds one.

`STRATEGIES` (`lightcl_jax.registry`) lists the built-in ones without
importing them; looking one up imports its module.
"""

from lightcl_jax.registry import STRATEGIES
from lightcl_jax.strategies.agem import AGEM
from lightcl_jax.strategies.base import Strategy, task_cross_entropy
from lightcl_jax.strategies.finetune import Finetune
from lightcl_jax.strategies.joint import Joint
from lightcl_jax.strategies.lightcl import LightCL
from lightcl_jax.strategies.regularization import LearningWithoutForgetting, OnlineEWC
from lightcl_jax.strategies.replay import DERPlusPlus, ExperienceReplay


def register_strategy(strategy: Strategy) -> None:
    """Makes ``strategy`` available under ``strategy.name`` (to configs and the CLI)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"expected a Strategy instance, got {type(strategy).__name__}")
    STRATEGIES[strategy.name] = strategy


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``; ValueError naming the known ones otherwise."""
    return STRATEGIES.lookup(name)


__all__ = ["STRATEGIES", "Strategy", "Finetune", "LightCL", "Joint", "OnlineEWC",
           "LearningWithoutForgetting", "ExperienceReplay", "DERPlusPlus", "AGEM", "register_strategy",
           "get_strategy", "task_cross_entropy"]
