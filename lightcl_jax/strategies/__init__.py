"""Continual-learning strategies by name; `register_strategy` adds one."""

from lightcl_jax.strategies.base import Strategy, task_cross_entropy
from lightcl_jax.strategies.finetune import Finetune
from lightcl_jax.strategies.joint import Joint
from lightcl_jax.strategies.lightcl import LightCL
from lightcl_jax.strategies.regularization import LearningWithoutForgetting, OnlineEWC
from lightcl_jax.strategies.replay import DERPlusPlus, ExperienceReplay

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (LightCL(), Finetune(), Joint(), OnlineEWC(), LearningWithoutForgetting(),
                        ExperienceReplay(), DERPlusPlus())
}


def register_strategy(strategy: Strategy) -> None:
    """Makes ``strategy`` available under ``strategy.name`` (to configs and the CLI)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"expected a Strategy instance, got {type(strategy).__name__}")
    STRATEGIES[strategy.name] = strategy


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Strategy", "Finetune", "LightCL", "Joint", "OnlineEWC",
           "LearningWithoutForgetting", "ExperienceReplay", "DERPlusPlus", "register_strategy",
           "get_strategy", "task_cross_entropy"]
