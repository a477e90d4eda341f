"""Registries by name whose built-in entries load on first use: strategies and similarities.

A `Registry` knows the names of its built-in entries and where each lives
(``"module:attribute"``) without importing them, so that validating a
configuration or listing a CLI flag's choices imports no JAX. An entry is
imported when it is first looked up; `register` adds one of a user's own.

    >>> STRATEGIES["lightcl"]          # imports lightcl_jax.strategies.lightcl
    >>> "lightcl" in STRATEGIES        # imports nothing
"""

from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator


class Registry(MutableMapping):
    """Name -> object, with built-in entries imported lazily.

    Args:
      kind: what the entries are, for messages ("strategy").
      builtin: name -> ``"module:attribute"`` of the built-in entries.
      make: applied to a built-in attribute once loaded (e.g. a class -> an instance).
    """

    def __init__(self, kind: str, builtin: dict[str, str],
                 make: Callable[[Any], Any] = lambda attribute: attribute):
        self.kind = kind
        self._specs = dict(builtin)
        self._loaded: dict[str, Any] = {}
        self._make = make

    def __contains__(self, name) -> bool:
        return name in self._specs or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        yield from self._specs
        yield from (name for name in self._loaded if name not in self._specs)

    def __len__(self) -> int:
        return len(set(self._specs) | set(self._loaded))

    def __getitem__(self, name: str):
        if name not in self._loaded:
            if name not in self._specs:
                raise KeyError(name)
            module, attribute = self._specs[name].split(":")
            self._loaded[name] = self._make(getattr(importlib.import_module(module), attribute))
        return self._loaded[name]

    def __setitem__(self, name: str, value) -> None:
        self._specs.pop(name, None)
        self._loaded[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._specs.pop(name, None)
        self._loaded.pop(name, None)

    def unknown(self, name) -> str:
        """The message for an unknown ``name``: what was asked and what is known."""
        return f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}"

    def lookup(self, name: str):
        """The entry called ``name``.

        Raises:
          ValueError: unknown name (`unknown`'s message).
        """
        if name not in self:
            raise ValueError(self.unknown(name))
        return self[name]


def _instance(cls):
    return cls()


STRATEGIES = Registry("strategy", {
    "lightcl": "lightcl_jax.strategies.lightcl:LightCL",
    "finetune": "lightcl_jax.strategies.finetune:Finetune",
    "joint": "lightcl_jax.strategies.joint:Joint",
    "ewc": "lightcl_jax.strategies.regularization:OnlineEWC",
    "lwf": "lightcl_jax.strategies.regularization:LearningWithoutForgetting",
    "er": "lightcl_jax.strategies.replay:ExperienceReplay",
    "derpp": "lightcl_jax.strategies.replay:DERPlusPlus",
    "agem": "lightcl_jax.strategies.agem:AGEM",
}, make=_instance)

SIMILARITIES = Registry("similarity", {
    "linear_cka": "lightcl_jax.metrics.similarity:LINEAR_CKA",
    "linear_cka_debiased": "lightcl_jax.metrics.similarity:LINEAR_CKA_DEBIASED",
    "cosine": "lightcl_jax.metrics.similarity:COSINE",
    "param_similarity": "lightcl_jax.metrics.similarity:PARAM_SIMILARITY",
})
