"""Paper configurations for ``python -m experiments.run --config NAME``.

Each module here is one benchmark of the paper with its hyperparameters: a
docstring with the command and the paper's numbers it targets (SPEC section
3), and ``FLAGS``, a dict of `experiments.run` flag values (argparse names:
``batch_size`` for ``--batch-size``) and ``strategy_args``: strategy name ->
its hyperparameters in this setting (the chosen strategy's entry applies;
``experiments.compare`` applies each strategy's). Flags given on the command
line win over the config's (``--strategy-arg`` over ``strategy_args``). ``--config`` also takes the path of a ``.py`` file of the same
form, for configs of your own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

CONFIGS = ("split_cifar10", "split_tinyimagenet")


def load_config(name: str) -> ModuleType:
    """The config module ``name`` (one of `CONFIGS`) or the ``.py`` file at that path.

    Raises:
      ValueError: an unknown name, a missing file, or a module without a
        ``FLAGS`` dict.
    """
    if name in CONFIGS:
        module = importlib.import_module(f"experiments.configs.{name}")
    elif name.endswith(".py"):
        if not os.path.isfile(name):
            raise ValueError(f"config file {name} does not exist")
        spec = importlib.util.spec_from_file_location(
            "lightcl_user_config_" + os.path.basename(name)[:-3], name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"config file {name} failed to load ({type(err).__name__}: "
                             f"{err})") from err
    else:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}, or the path "
                         "of a .py file that defines FLAGS")
    if not isinstance(getattr(module, "FLAGS", None), dict):
        raise ValueError(f"config {name} defines no FLAGS dict of experiments.run flag values")
    return module
