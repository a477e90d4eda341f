"""How lightcl_jax compiles, and what XLA says a compiled program costs.

`jit` is `jax.jit` with the XLA options every program gets (`COMPILER_OPTIONS`;
``memory_scheduler=True`` adds `MEMORY_SCHEDULER`, which lowers a program's peak of
live buffers; the train steps choose it per phase,
`lightcl_jax.training.step.memory_scheduled`). The options name XLA:CPU's settings;
other backends ignore ``xla_cpu_*`` options, so the same code compiles everywhere.
JAX takes compiler options on top-level programs only: the train, eval, probe and
pre-training steps use `jit`; the small host-side functions called at task boundaries
(which may run inside another trace) keep `jax.jit`. Change `COMPILER_OPTIONS` before
the first compilation to try others (``{}``: XLA's defaults). docs/performance.md
gives the measurements behind each option.

`CompiledStep` compiles a jitted function ahead of time on its first call, keeps
`compiled_cost`'s figures (FLOPs and bytes) and counts its calls; `run_resources`
turns a run's steps into the ``resources`` entry of its results.

`use_compilation_cache` turns on JAX's persistent compilation cache, so that a
process compiles only what no earlier process compiled (the commands call it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax

from lightcl_jax.process import release_free_memory

COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}

MEMORY_SCHEDULER: dict[str, Any] = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


# For programs compiled only to be measured: LLVM's optimisations off. XLA's memory and
# cost analyses come from its HLO passes, before LLVM runs, so the figures are the same
# (`tests/test_accounting.py` compares them) and compiling takes about half the time.
MEASURE_ONLY: dict[str, Any] = {"xla_backend_optimization_level": 0}

# For programs that run once, where compiling is most of their cost (the model's random
# initialisation: a few hundred small random-bit fusions, no convolution): LLVM's first
# optimisation level: it compiles in a fraction of the time (docs/performance.md) and gives
# the same values bit for bit (`tests/test_model.py` compares them with XLA's default
# level; level 0 does not).
RUN_ONCE: dict[str, Any] = {"xla_backend_optimization_level": 1}


# The environment variable that names the compilation cache's folder ("off": no cache).
CACHE_ENV = "LIGHTCL_COMPILE_CACHE"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/lightcl_jax/jax``, ``~/.cache/lightcl_jax/jax`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightcl_jax", "jax")


def cache_folder(directory: str | None, environ: Mapping[str, str],
                 jax_folder: str | None) -> str | None:
    """The compilation cache's folder (None: off): ``directory`` if given, else
    ``environ``'s `CACHE_ENV`, else ``jax_folder`` (JAX's own setting), else
    `default_cache_dir`; ``"off"`` and ``""`` mean none."""
    for choice in (directory, environ.get(CACHE_ENV), jax_folder):
        if choice is not None:
            return None if choice in ("", "off") else choice
    return default_cache_dir()


def use_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``directory``, for every program
    compiled from now on in this process, however short its compile; returns the folder,
    or None when the cache is off.

    A program compiled once (same computation, shapes, options, JAX version and
    processor) is read back from the folder by every later process instead of being
    compiled again; what it computes is the same. Deleting the folder clears it.

    Args:
      directory: the folder, ``"off"`` (or ``""``) for none. None: ``$LIGHTCL_COMPILE_CACHE``,
        else the folder JAX was given (``JAX_COMPILATION_CACHE_DIR``), else
        `default_cache_dir`.

    Raises:
      OSError: the folder cannot be made.
    """
    directory = cache_folder(directory, os.environ, jax.config.jax_compilation_cache_dir)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{directory} is not writable")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def jit(fn: Callable | None = None, /, *, memory_scheduler: bool = False,
        measure_only: bool = False, run_once: bool = False, **kwargs):
    """`jax.jit` with `COMPILER_OPTIONS` (as it is when called), `MEMORY_SCHEDULER` when
    ``memory_scheduler``, `MEASURE_ONLY` when ``measure_only`` (never for a program
    that runs) and `RUN_ONCE` when ``run_once``; usable as a decorator."""
    if fn is None:
        return lambda f: jit(f, memory_scheduler=memory_scheduler, measure_only=measure_only,
                             run_once=run_once, **kwargs)
    options = {**COMPILER_OPTIONS, **(MEMORY_SCHEDULER if memory_scheduler else {}),
               **(RUN_ONCE if run_once else {}), **(MEASURE_ONLY if measure_only else {})}
    return jax.jit(fn, compiler_options=options, **kwargs)


def compiled_cost(compiled) -> dict:
    """XLA's figures for a compiled function: FLOPs and bytes.

    ``step_bytes`` is what the step holds at once: arguments + temporaries +
    outputs not aliased to donated arguments.
    """
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures = {
        "flops": float(cost.get("flops", 0.0)),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    figures["step_bytes"] = (figures["argument_bytes"] + figures["temp_bytes"]
                             + figures["output_bytes"] - figures["alias_bytes"])
    return figures


class CompiledStep:
    """A jitted function compiled ahead of time, once for each shape of its arguments.

    A step sees one shape, or two where a run keeps the smaller last batch of
    an epoch (``Config.last_batch``): each is lowered and compiled on its
    first call. Keeps XLA's figures (`compiled_cost`) of the first shape it
    compiled (a run's full batch), counts calls, and adds up the FLOPs each
    call's program reports (``run_flops``), so a run can report per-step and
    whole-run costs.
    """

    def __init__(self, jitted, *, calls: int = 0, cost: dict | None = None,
                 run_flops: float | None = None):
        # ``calls``, ``cost`` and ``run_flops`` carry a resumed run's counts and figures
        # over; ``jitted`` may then be None until the phase trains again.
        self.jitted, self.cost, self.calls = jitted, cost, calls
        if run_flops is None:  # a checkpoint written before run_flops was kept
            run_flops = calls * cost["flops"] if cost else 0.0
        self.run_flops = run_flops
        self.programs: dict[tuple, tuple[Any, float]] = {}  # shapes -> (compiled, its FLOPs)

    def __call__(self, *args):
        program = self.prepare(*args)
        self.calls += 1
        self.run_flops += program[1]
        return program[0](*args)

    def prepare(self, *args):
        """(the program for ``args``' shapes, its FLOPs), compiled now if it is not yet;
        ``args`` may be `jax.ShapeDtypeStruct`-s (with their shardings)."""
        shapes = tuple(getattr(a, "shape", None) for a in args)
        program = self.programs.get(shapes)
        if program is None:
            compiled = self.jitted.lower(*args).compile()
            cost = compiled_cost(compiled)
            if self.cost is None:  # the first shape (a resumed run's came with it)
                self.cost = cost
            program = self.programs[shapes] = (compiled, cost["flops"])
            release_free_memory()  # what the compiler freed, before the step's buffers
        return program


def run_resources(train_steps: Mapping[Any, CompiledStep], phase_tasks: Mapping[Any, list[int]],
                  eval_step: CompiledStep, eval_batch_size: int) -> dict:
    """The ``resources`` entry of the results: XLA's per-step figures x step counts.

    Args:
      train_steps: phase -> its compiled train step; a phase has ``frozen``
        (layer groups) and ``uses_memory``.
      phase_tasks: phase -> the tasks it trained.
      eval_step: the compiled eval step.
      eval_batch_size: its batch size.
    """
    device = jax.devices()[0]
    steps = []
    for phase, step in train_steps.items():
        if step.cost is None:
            continue
        steps.append({"tasks": phase_tasks[phase], "frozen": list(phase.frozen),
                      "memory": phase.uses_memory, "steps": step.calls, **step.cost,
                      "run_flops": step.run_flops})
    evals = {"batch_size": eval_batch_size, "steps": eval_step.calls, **(eval_step.cost or {})}
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "train_steps": steps,
        "eval_step": evals,
        "train_flops": sum(s["run_flops"] for s in steps),
        "eval_flops": eval_step.run_flops,
        "peak_train_step_bytes": max((s["step_bytes"] for s in steps), default=0),
        "note": ("XLA cost and memory analysis of the compiled train and eval steps on the "
                 "run's shapes; whole-run FLOPs = the sum over steps of each step's program's "
                 "FLOPs (per-step FLOPs x steps, with a smaller last batch its own). Work at task "
                 "boundaries (buffers, Fisher, vital channels, probes) is not counted."),
    }
