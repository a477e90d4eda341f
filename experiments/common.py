"""What the experiment scripts share: their argument parser, progress bars, atomic writes,
alternating timings.

Imports no JAX, so that every script can refuse a bad flag before JAX loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from lightcl_jax.training.progress import Progress


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
