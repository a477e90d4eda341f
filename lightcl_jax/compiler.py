"""How lightcl_jax compiles: `jit` is `jax.jit` with the XLA options every program gets.

XLA:CPU sends f32 NHWC convolutions of more than 16 channels to YNNPACK by
default; on the 2-core machine these figures come from, YNNPACK ran the
ResNet-18's 64-channel 32x32 convolutions on one core (1.0 core busy, 27 ms
a forward) where XLA's Eigen convolutions use both (2.0 cores, 15-24 ms).
With YNNPACK kept for dots only, LightCL's frozen-phase step ran 8% faster
and the full-network step as fast as with XLA's defaults
(`experiments.bench_vs_torch`, which times both; BUILD.md "Speed").
The option names XLA:CPU's settings; other backends ignore ``xla_cpu_*``
options, so the same code compiles everywhere. JAX takes compiler options
on top-level programs only: the train, eval, probe and pre-training steps
use `jit`; the small host-side functions called at task boundaries (which
may run inside another trace) keep `jax.jit`. Change `COMPILER_OPTIONS`
before the first compilation to try others (e.g. ``{}``: XLA's defaults).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def jit(fn: Callable | None = None, /, **kwargs):
    """`jax.jit` with `COMPILER_OPTIONS` (as it is when called); usable as a decorator."""
    if fn is None:
        return lambda f: jit(f, **kwargs)
    return jax.jit(fn, compiler_options=dict(COMPILER_OPTIONS), **kwargs)
