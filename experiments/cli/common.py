"""What the experiment scripts share: their argument parser, strategy arguments and metric
names from flags, progress bars, atomic writes, alternating timings.

Imports no JAX, so that every script can refuse a bad flag before JAX loads (a
strategy's hyperparameters are read with its class, which imports it then).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from lightcl_jax.training.progress import Progress
from lightcl_jax.training.workdir import write_json_atomic  # noqa: F401  (the commands write with it)


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every flag's default (``default: off`` for a switch), unless its
    help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or "default" in text):
            return text
        default = action.default
        shown = ("off" if default is False else "on" if default is True else
                 "none" if default is None else "%(default)s")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2, and whose
    help shows every default (`HelpFormatter`). ``more_help(namespace)``, when given,
    returns text printed after the flags by ``--help`` (e.g. the strategies'
    hyperparameters): it runs only then, so listing them costs nothing otherwise."""

    def __init__(self, *args, more_help=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, add_help=False, **kwargs)
        self.more_help = more_help
        self.add_argument("-h", "--help", action=_Help, nargs=0, default=argparse.SUPPRESS,
                          help="show this message and exit")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        if getattr(parser, "more_help", None) is not None:
            print("\n" + parser.more_help(namespace))
        parser.exit()


STRATEGY_ARG_HELP = ("a hyperparameter of the strategy, NAME=VALUE (e.g. lam=100), repeatable; "
                     "STRATEGY.NAME=VALUE names the strategy it is for. The strategies' "
                     "hyperparameters and defaults are listed at the end")


def split_strategy_arg(text: str) -> tuple[str | None, str, str]:
    """``"[STRATEGY.]NAME=VALUE"`` -> (the strategy or None, NAME, VALUE as text).

    Raises:
      ValueError: not of that form.
    """
    key, sep, value = text.partition("=")
    qualifier, _, name = key.rpartition(".")
    if not sep or not name.isidentifier():
        raise ValueError(f"--strategy-arg {text!r}: write NAME=VALUE (e.g. lam=100), or "
                         "STRATEGY.NAME=VALUE (e.g. ewc.lam=100)")
    return qualifier or None, name, value


def strategy_arguments(strategies: dict[str, type], given: list[str],
                       from_config: dict | None = None, config_name: str | None = None
                       ) -> dict[str, dict]:
    """Each strategy's ``strategy_args``, from ``--strategy-arg`` flags and a config file's.

    Args:
      strategies: the run's strategies, as given (a name or an import path) -> class.
      given: the ``--strategy-arg`` values: ``NAME=VALUE`` sets NAME of every strategy
        that has it, ``STRATEGY.NAME=VALUE`` (STRATEGY as given, or its class's name)
        that strategy's only; each must set at least one.
      from_config: a config's ``strategy_args``: strategy -> {NAME: value}; entries of
        strategies not run here are left alone. Flags win over it.
      config_name: the config, for messages.

    Raises:
      ValueError: a config's strategy_args that is not a dict, a malformed flag, one that
        sets nothing (a strategy not run here, or a hyperparameter no strategy here has), a
        bad value (each strategy is made from its arguments here, so each value is checked
        against its declaration); one line naming what is allowed.
    """
    from lightcl_jax.strategies.hyperparameters import check_names, fields, parse_value

    if from_config is not None and not isinstance(from_config, dict):
        raise ValueError(f"config {config_name}: strategy_args must be a dict of strategy "
                         f"names to dicts of hyperparameters; got {from_config!r}")
    args = {key: {} for key in strategies}
    for key, cls in strategies.items():
        for owner in {key, cls.name}:
            entry = (from_config or {}).get(owner, {})
            if not isinstance(entry, dict):
                raise ValueError(f"config {config_name}: strategy_args[{owner!r}] must be a dict "
                                 f"of hyperparameter values; got {entry!r}")
            try:
                check_names(cls, entry)
            except ValueError as err:
                raise ValueError(f"config {config_name}: {err}") from None
            args[key].update(entry)
    for text in given:
        qualifier, name, value = split_strategy_arg(text)
        targets = [key for key, cls in strategies.items()
                   if qualifier in (None, key, cls.name) and
                   (qualifier is not None or name in {f.name for f in fields(cls)})]
        if qualifier is not None and not targets:
            raise ValueError(f"--strategy-arg {text}: {qualifier} is not a strategy of this run "
                             f"({', '.join(strategies)})")
        if not targets:
            (key, cls), *others = strategies.items()
            if not others:  # one strategy: say what it has
                parse_value(cls, name, value)
            raise ValueError(f"--strategy-arg {text}: none of the strategies here "
                             f"({', '.join(strategies)}) has a hyperparameter {name!r}")
        for key in targets:
            args[key][name] = parse_value(strategies[key], name, value)
    for key, cls in strategies.items():
        cls.from_args(args[key])
    return args


def parse_metrics(text: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``--metrics``: comma-separated metric names or import paths; a leading ``+`` adds
    them to ``default``. Raises ValueError on an empty list."""
    extra = text.startswith("+")
    names = tuple(n.strip() for n in text.lstrip("+").split(",") if n.strip())
    if not names:
        raise ValueError(f"--metrics {text!r}: name at least one metric (e.g. "
                         f"{','.join(default)}), or +NAME to add one to those")
    return default + tuple(n for n in names if n not in default) if extra else names


def strategies_help(selected: list[str]) -> str:
    """The strategies ``selected`` (names or import paths) with their hyperparameters and
    defaults, for ``--help``. Imports them."""
    from lightcl_jax.strategies import strategy_class
    from lightcl_jax.strategies.hyperparameters import describe

    lines = ["strategies and their hyperparameters (--strategy NAME --strategy-arg NAME=VALUE):"]
    for name in selected:
        try:
            cls = strategy_class(name)
        except ValueError as err:
            lines.append(f"  {name}: {err}")
            continue
        lines.append(f"  {name}")
        lines += [f"      {line}" for line in describe(cls)] or ["      (none)"]
    return "\n".join(lines)


def metrics_help() -> str:
    """The built-in summaries and evaluation metrics, one line each, for ``--help``."""
    from lightcl_jax.metrics.continual import get_metric
    from lightcl_jax.registry import EVAL_METRICS, SUMMARIES

    lines = ["metrics (--metrics NAME,... or +NAME; a file of your own: path/to/file.py:NAME):"]
    for kind, registry in (("summary of the accuracy matrices", SUMMARIES),
                           ("evaluation metric", EVAL_METRICS)):
        for name in registry:
            lines.append(f"  {name:16} {kind}: {get_metric(name).description}")
    return "\n".join(lines)


def parse_bool(text: str) -> bool:
    """``on``/``true``/``1``/``yes`` or ``off``/``false``/``0``/``no`` (an argparse type)."""
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


class Bars(Progress):
    """Progress (`lightcl_jax.training.progress.Progress`) as a tqdm bar per task or
    epoch on stderr; ``enabled=False`` shows nothing but where a run resumed from."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def resumed(self, checkpoint: str, where: str, global_step: int | None = None) -> None:
        print(f"resuming from {checkpoint}: {where}", file=sys.stderr)

    def start(self, name: str, total: int, done: int = 0) -> None:
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=name, unit="step", file=sys.stderr,
                            leave=True)

    def advance(self, steps: int, metrics: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if metrics:
                self.bar.set_postfix(_shown(metrics))

    def end(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(_shown(summary))
            self.bar.close()
            self.bar = None


def _shown(values: dict) -> dict:
    return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}


def check_ckpt_every(parser, value: int) -> None:
    """Refuses (exit 2, one line) a negative ``--ckpt-every``."""
    if value < 0:
        parser.error(f"--ckpt-every must be >= 0 (0: checkpoint only after each task); "
                     f"got {value}")


def add_compile_cache_flag(parser) -> None:
    """``--compile-cache DIR``: where JAX's compilation cache lives (`use_compile_cache`)."""
    parser.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="JAX's compilation cache: a later run reads the programs an earlier one compiled "
             "instead of compiling them again (default: $LIGHTCL_COMPILE_CACHE, else "
             "~/.cache/lightcl_jax/jax; 'off': none; delete the folder to clear it)")


def use_compile_cache(parser, args) -> None:
    """Turns on the compilation cache ``--compile-cache`` names
    (`lightcl_jax.compiler.use_compilation_cache`); a folder that cannot be made or written
    is refused in one line (exit 2)."""
    from lightcl_jax.compiler import CACHE_ENV, use_compilation_cache
    try:
        use_compilation_cache(args.compile_cache)
    except OSError as err:
        given = ("--compile-cache" if args.compile_cache is not None
                 else CACHE_ENV if CACHE_ENV in os.environ else "the default compilation cache")
        parser.error(f"{given}: the folder cannot be used ({err}); give another with "
                     f"--compile-cache DIR, or --compile-cache off")


def median_ms(fns: dict, rounds: int, pause_s: float = 0.0) -> dict:
    """Median milliseconds of each zero-argument callable (called once first, untimed),
    the callables alternating over ``rounds`` rounds so that a change in the machine's
    speed touches every figure; ``pause_s`` between callables lets one framework's
    spinning worker threads go idle before the next is timed."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if pause_s:
                time.sleep(pause_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
