"""Registries by name whose built-in entries load on first use: strategies and metrics.

A `Registry` knows the names of its built-in entries and where each lives
(``"module:attribute"``) without importing them, so that validating a
configuration or listing a CLI flag's choices imports no JAX. An entry is
imported when it is first looked up; `register` adds one of a user's own.
An entry of a user's own file needs no registering: `Registry.lookup` takes
its import path, ``"package.module:Name"`` or ``"path/to/file.py:Name"``.

    >>> STRATEGIES["lightcl"]                      # imports lightcl_jax.strategies.lightcl
    >>> "lightcl" in STRATEGIES                    # imports nothing
    >>> STRATEGIES.lookup("my_strategies.py:L2")   # imports that file
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator


def is_import_path(name) -> bool:
    """Whether ``name`` has the form of an import path (``module:Name`` or ``file.py:Name``)."""
    if not isinstance(name, str) or name.count(":") != 1:
        return False
    where, attribute = name.split(":")
    return bool(where) and attribute.isidentifier()


def load_path(path: str) -> Any:
    """The object at an import path: ``"package.module:Name"`` (importable from
    ``sys.path``) or ``"path/to/file.py:Name"`` (a file, loaded once per process).

    Raises:
      ValueError: a malformed path, a module or file that cannot be loaded (with the
        error it raised), or a module without that name.
    """
    if not is_import_path(path):
        raise ValueError(f"{path!r} is not an import path; write package.module:Name or "
                         "path/to/file.py:Name")
    where, attribute = path.split(":")
    try:
        module = _load_file(where) if where.endswith(".py") else importlib.import_module(where)
    except Exception as err:  # the user's module failed: say which, with its error
        raise ValueError(f"cannot import {where} for {path!r} ({type(err).__name__}: "
                         f"{err})") from err
    if not hasattr(module, attribute):
        raise ValueError(f"{where} has no attribute {attribute!r} (for {path!r})")
    return getattr(module, attribute)


def _load_file(filename: str):
    """The module of a ``.py`` file, registered in `sys.modules` under a name of its
    absolute path, so that loading it again gives the same classes."""
    full = os.path.abspath(filename)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"no file {filename}")
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"lightcl_user_{hashlib.blake2b(full.encode(), digest_size=6).hexdigest()}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: dataclasses and typing look it up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


class Registry(MutableMapping):
    """Name -> object, with built-in entries imported lazily.

    Args:
      kind: what the entries are, for messages ("strategy").
      builtin: name -> ``"module:attribute"`` of the built-in entries.
      make: applied to a built-in attribute once loaded.
      check: ``check(obj)`` -> an error message, or None when ``obj`` (loaded from an
        import path) is an entry of this registry's kind.
    """

    def __init__(self, kind: str, builtin: dict[str, str],
                 make: Callable[[Any], Any] = lambda attribute: attribute,
                 check: Callable[[Any], str | None] | None = None):
        self.kind = kind
        self._specs = dict(builtin)
        self._loaded: dict[str, Any] = {}
        self._make = make
        self._check = check

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

    def known(self, name) -> bool:
        """Whether ``name`` is registered or has the form of an import path (nothing is
        imported: `lookup` says whether the path holds an entry)."""
        return name in self or is_import_path(name)

    def unknown(self, name) -> str:
        """The message for an unknown ``name``: what was asked and what is known."""
        return (f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}, or the "
                "import path of your own (package.module:Name or path/to/file.py:Name)")

    def lookup(self, name: str):
        """The entry called ``name``, or the one at the import path ``name``.

        Raises:
          ValueError: unknown name (`unknown`'s message), an import path that cannot be
            loaded, or one whose object is not of this registry's kind.
        """
        if name in self:
            return self[name]
        if not is_import_path(name):
            raise ValueError(self.unknown(name))
        entry = load_path(name)
        problem = self._check(entry) if self._check is not None else None
        if problem:
            raise ValueError(f"{name} is not a {self.kind}: {problem}")
        return entry


def _strategy_class(obj) -> str | None:
    strategy = importlib.import_module("lightcl_jax.strategies.base").Strategy
    if isinstance(obj, type) and issubclass(obj, strategy):
        return None
    return f"it is {obj!r}, not a subclass of lightcl_jax.Strategy"


def _instance_of(module: str, cls: str) -> Callable[[Any], str | None]:
    def check(obj):
        expected = getattr(importlib.import_module(module), cls)
        return None if isinstance(obj, expected) else (
            f"it is {type(obj).__name__}, not a {module}.{cls}")
    return check


# Strategy classes: a run makes its instance from the config's strategy_args.
STRATEGIES = Registry("strategy", {
    "lightcl": "lightcl_jax.strategies.lightcl:LightCL",
    "finetune": "lightcl_jax.strategies.finetune:Finetune",
    "joint": "lightcl_jax.strategies.joint:Joint",
    "ewc": "lightcl_jax.strategies.regularization:OnlineEWC",
    "lwf": "lightcl_jax.strategies.regularization:LearningWithoutForgetting",
    "er": "lightcl_jax.strategies.replay:ExperienceReplay",
    "derpp": "lightcl_jax.strategies.replay:DERPlusPlus",
    "agem": "lightcl_jax.strategies.agem:AGEM",
}, check=_strategy_class)

SIMILARITIES = Registry("similarity", {
    "linear_cka": "lightcl_jax.metrics.similarity:LINEAR_CKA",
    "linear_cka_debiased": "lightcl_jax.metrics.similarity:LINEAR_CKA_DEBIASED",
    "cosine": "lightcl_jax.metrics.similarity:COSINE",
    "param_similarity": "lightcl_jax.metrics.similarity:PARAM_SIMILARITY",
}, check=_instance_of("lightcl_jax.metrics.similarity", "Similarity"))

# Run summaries: one number from an accuracy matrix (`lightcl_jax.metrics.continual`).
SUMMARIES = Registry("summary metric", {
    "avg": "lightcl_jax.metrics.continual:AVERAGE_ACCURACY",
    "forgetting": "lightcl_jax.metrics.continual:FORGETTING",
    "bwt": "lightcl_jax.metrics.continual:BACKWARD_TRANSFER",
    "avg_incremental": "lightcl_jax.metrics.continual:AVERAGE_INCREMENTAL_ACCURACY",
}, check=_instance_of("lightcl_jax.metrics.continual", "Summary"))

# Evaluation metrics: computed on each seen task's evaluation data after each task.
EVAL_METRICS = Registry("evaluation metric", {
    "loss": "lightcl_jax.metrics.continual:EVAL_LOSS",
}, check=_instance_of("lightcl_jax.metrics.continual", "EvalMetric"))
