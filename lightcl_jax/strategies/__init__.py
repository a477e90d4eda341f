"""Continual-learning strategies by name; `register_strategy` adds one.

`STRATEGIES` (`lightcl_jax.registry`) maps each name to its class and lists the
built-in ones without importing them; looking one up imports its module. A
class of a user's own file needs no registering: ``"path/to/file.py:Name"``
(or ``"package.module:Name"``) names it wherever a strategy name goes.
"""

from lightcl_jax.config import Config
from lightcl_jax.metrics.continual import task_cross_entropy
from lightcl_jax.registry import STRATEGIES
from lightcl_jax.strategies.agem import AGEM
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.finetune import Finetune
from lightcl_jax.strategies.hyperparameters import hyperparameter
from lightcl_jax.strategies.joint import Joint
from lightcl_jax.strategies.lightcl import LightCL
from lightcl_jax.strategies.regularization import LearningWithoutForgetting, OnlineEWC
from lightcl_jax.strategies.replay import DERPlusPlus, ExperienceReplay


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Makes the strategy class ``cls`` available under ``cls.name`` (to configs and the
    CLI); returns it, so it also serves as a class decorator."""
    if isinstance(cls, Strategy):
        raise TypeError(f"register the class, not an instance: register_strategy("
                        f"{type(cls).__name__}); a run makes its instance from the config's "
                        "strategy_args")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"expected a subclass of lightcl_jax.Strategy, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name or cls.name == "base":
        raise ValueError(f"{cls.__name__} needs a name of its own (a class attribute: "
                         f"name = \"mine\"); got {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class called ``name``, or at the import path ``name``.

    Raises:
      ValueError: an unknown name (the message lists the known ones), or a path that
        cannot be loaded or holds no strategy class.
    """
    return STRATEGIES.lookup(name)


def get_strategy(name: str, **args) -> Strategy:
    """The strategy called ``name`` (or at that import path) with hyperparameters ``args``
    (the others at their defaults): ``get_strategy("ewc", lam=100.0)``.

    Raises:
      ValueError: an unknown strategy or hyperparameter, or a bad value.
    """
    return strategy_class(name).from_args(args)


def strategy_of(config: Config) -> Strategy:
    """The strategy ``config`` names, with its ``strategy_args``, checked against the
    run's settings (`Strategy.validate_run`).

    Raises:
      ValueError: as `get_strategy`, or a strategy that cannot run with ``config``.
    """
    strategy = get_strategy(config.strategy, **config.strategy_args)
    strategy.validate_run(config)
    return strategy


__all__ = ["STRATEGIES", "Strategy", "Finetune", "LightCL", "Joint", "OnlineEWC",
           "LearningWithoutForgetting", "ExperienceReplay", "DERPlusPlus", "AGEM", "register_strategy",
           "get_strategy", "strategy_class", "strategy_of", "hyperparameter", "task_cross_entropy"]
