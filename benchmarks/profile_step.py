"""Where a train step's time goes, op by op, from XLA's profiler.

    python -m benchmarks.profile_step [--task 0|1] [--nf 64] [--steps 5] [--single-core]
                                      [--top 30] [--json PATH]

Compiles LightCL's step of the given task as a run does (task 0: every layer
trains, as finetune and the baselines; task 1: stem + stages 1-3 frozen, the
buffer's regulation loss) on a fixed random batch of 32x32x3 images, batch 32,
times ``--steps`` steps, then traces as many under `jax.profiler.trace` and reads
the trace back (`jax.profiler.ProfileData`). It prints the step's median time,
the milliseconds a step of each kind of op (convolutions, transposes, the
other fusions, by the name XLA gives them up to its first dot) and the ``--top``
single ops, each convolution with its shapes and the layer it belongs to.

With several threads XLA hands a convolution to Eigen's thread pool and the
trace shows only its dispatch, so ``--single-core`` runs the step on one core
(Eigen single-threaded, the process pinned to one CPU): then every op's time
is its own and they add up to the step's. Use it to tell where the time goes,
not how long a step takes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from experiments.cli.common import Parser, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--task", type=int, choices=(0, 1), default=0,
                   help="0: the full-network step; 1: LightCL's frozen-phase step")
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--single-core", action="store_true",
                   help="one core, Eigen single-threaded: every op's own time")
    p.add_argument("--top", type=int, default=30, help="single ops to list")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    return p


def op_kind(name: str) -> str:
    """An op's kind: its XLA name up to the first dot (``transpose_copy_fusion.12`` ->
    ``transpose_copy_fusion``)."""
    return name.split(".")[0]


def describe(name: str, hlo: str) -> str:
    """``name``'s result shape in the compiled ``hlo`` and, for a convolution, its operands'
    shapes and the layer it comes from ("" where the text does not have it)."""
    m = re.search(r"%" + re.escape(name) + r" = (\S+) (\w[\w-]*)\(([^)]*)\)(.*)", hlo)
    if m is None:
        return ""
    text = m.group(1).split("{")[0]
    if m.group(2) == "convolution":
        operands = [re.search(re.escape(o.strip()) + r" = (\S+)", hlo)
                    for o in m.group(3).split(",")]
        text += " <- " + " x ".join(o.group(1).split("{")[0] for o in operands if o)
        layer = re.search(r'op_name="([^"]*)"', m.group(4))
        if layer:
            text += "  " + "/".join(layer.group(1).split("/")[-3:-1])
    return text


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
    """Milliseconds a step of each op in the trace written to ``trace_dir``."""
    import jax

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    times = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if "ThunkExecutor" not in event.name and not event.name.startswith("end:"):
                    times[event.name] += event.duration_ns / 1e6 / steps
    return dict(times)


def profile(task: int, nf: int, steps: int) -> dict:
    """The step's median milliseconds, each op's milliseconds a step, the compiled HLO."""
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_step import prepared_step
    from lightcl_jax.config import Config

    config = Config(strategy="lightcl", dataset="cifar10", nf=nf, batch_size=32)
    step, state, memory, x, y = prepared_step(config, (32, 32, 3), 10, 2, task)
    offset = jnp.asarray(2 * task, jnp.int32)
    hlo = next(iter(step.programs.values()))[0].as_text()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        state, memory, metrics = step(state, memory, x, y, offset)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                state, memory, metrics = step(state, memory, x, y, offset)
                jax.block_until_ready(metrics["loss"])
        ops = op_times(trace_dir, steps)
    return {"step_ms": 1e3 * statistics.median(times[1:]), "ops_ms": ops, "hlo": hlo}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.nf, args.steps, args.top) < 1:
        parser.error(f"--nf, --steps and --top must be >= 1; got {args.nf}, {args.steps} "
                     f"and {args.top}")
    if args.single_core:  # before JAX starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = profile(args.task, args.nf, args.steps)
    ops, hlo = result["ops_ms"], result["hlo"]
    kinds = collections.Counter()
    for name, ms in ops.items():
        kinds[op_kind(name)] += ms
    name = ("the full-network step (task 0)" if args.task == 0
            else "LightCL's frozen-phase step (task 1)")
    print(f"{name}, nf {args.nf}, batch 32, 32x32x3"
          f"{', one core' if args.single_core else ''}: {result['step_ms']:.1f} ms a step "
          f"(median of {args.steps}); the ops add up to {sum(ops.values()):.1f} ms")
    for kind, ms in kinds.most_common():
        if ms >= 0.05:
            print(f"  {ms:9.2f} ms  {kind}")
    print(f"the {args.top} largest ops:")
    for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:9.2f} ms  {op:32s} {describe(op, hlo)}")
    if args.json:
        write_json_atomic(args.json, {"task": args.task, "nf": args.nf,
                                      "single_core": args.single_core,
                                      "step_ms": result["step_ms"], "ops_ms": ops,
                                      "kinds_ms": dict(kinds)})
    return 0


if __name__ == "__main__":  # benchmarks/__init__.py has set up the process
    sys.exit(main())
