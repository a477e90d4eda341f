"""How lightcl_jax compiles: `jit` is `jax.jit` with the XLA options every program gets.

XLA:CPU sends f32 NHWC convolutions of more than 16 channels to YNNPACK by
default; on the 2-core machine these figures come from, YNNPACK ran the
ResNet-18's 64-channel 32x32 convolutions on one core (1.0 core busy, 27 ms
a forward) where XLA's Eigen convolutions use both (2.0 cores, 15-24 ms).
With YNNPACK kept for dots only, LightCL's frozen-phase step ran 8% faster
and the full-network step as fast as with XLA's defaults
(`benchmarks.bench_vs_torch`, which times both; BUILD.md "Speed").
The option names XLA:CPU's settings; other backends ignore ``xla_cpu_*``
options, so the same code compiles everywhere. JAX takes compiler options
on top-level programs only: the train, eval, probe and pre-training steps
use `jit`; the small host-side functions called at task boundaries (which
may run inside another trace) keep `jax.jit`. Change `COMPILER_OPTIONS`
before the first compilation to try others (e.g. ``{}``: XLA's defaults).

``memory_scheduler=True`` adds `MEMORY_SCHEDULER`: XLA:CPU orders the
program's work to lower its peak of live buffers. Measured on LightCL's step
at the paper's CIFAR-10 setting: 127.6 -> 90.1 MB at the same step time; on
a full-network (finetune) step: 238.1 -> 270.8 MB at about the same time, so the
train steps choose it per phase (`lightcl_jax.training.steps.memory_scheduled`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

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
# optimisation level. ResNet-18's initialisation compiled in 2.8 s instead of 6.8 at nf 64
# and 2.6 s instead of 13.9 at nf 4, 8x8x1, and gave the same values bit for bit
# (`tests/test_model.py` compares them with XLA's default level; level 0 does not).
RUN_ONCE: dict[str, Any] = {"xla_backend_optimization_level": 1}


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
