"""Train-step cost of each strategy, from the compiler and the clock.

    python -m benchmarks.bench_step                       # paper's CIFAR-10 setting
    python -m benchmarks.bench_step --nf 16 --image-size 8 --channels 1   # digits-sized

For each strategy it compiles the train step of a task >= 1 (where LightCL
freezes stem + stages 1-3 and adds its regulation loss) on the given shapes,
prints XLA's FLOPs and bytes (arguments + temporaries + outputs not aliased to
donated inputs) and the median wall time of ``--steps`` steps after one
warm-up step on random data, then the lightcl / finetune ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax import compiler
from lightcl_jax.accounting import compiled_train_step_cost
from lightcl_jax.compiler import CompiledStep
from lightcl_jax.config import XLA_SCHEDULERS, Config
from lightcl_jax.strategies import strategy_of
from lightcl_jax.training.step import BatchStatsChain, jitted_eval_forward, jitted_forward
from lightcl_jax.training.state import create_lane_states, run_model
from lightcl_jax.training.step import memory_at_task_start, memory_scheduled, phase_step


def prepared_step(config: Config, image_shape, num_classes: int, classes_per_task: int,
                  task_index: int = 1, pretrained: bool = False):
    """``(step, state, memory, x, y)``: the given task's compiled train step (a
    `CompiledStep`, compiled by its first call, which this makes), its state and memory,
    and a fixed random batch of the task's classes.

    ``config.sparse`` prunes the weights and masks the updates as a run does.
    """
    config = config.resolved()
    strategy = strategy_of(config)
    model = run_model(config, num_classes, image_shape, config.seed)
    (state,), (masks,) = create_lane_states(model, image_shape, [config.seed],
                                            sparse=config.sparse)
    phase, tx, step = phase_step(model, strategy, config, state.params, task_index, pretrained,
                                 classes_per_task, masks)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(config.batch_size, *image_shape)).astype(np.float32))
    lo = task_index * classes_per_task
    y = jnp.asarray(rng.integers(lo, lo + classes_per_task,
                                 size=config.batch_size).astype(np.int32))
    memory = None
    if phase.uses_memory:
        chain = BatchStatsChain(state.batch_stats)
        memory = memory_at_task_start(strategy, config, task_index, (x, y),
                                      jitted_forward(model, chain, phase.fixed_bn),
                                      jitted_eval_forward(model), state.params,
                                      state.batch_stats, classes_per_task)
        state = state.replace(batch_stats=chain.latest)
    step = CompiledStep(compiler.jit(step, donate_argnums=(0, 1),
                                     memory_scheduler=memory_scheduled(config)))
    offset = jnp.asarray(lo, jnp.int32)
    state, memory, metrics = step(state, memory, x, y, offset)
    jax.block_until_ready(metrics)
    return step, state, memory, x, y


def time_steps(config: Config, image_shape, num_classes: int, classes_per_task: int,
               steps: int, task_index: int = 1, warmup: int = 1,
               pretrained: bool = False) -> list[float]:
    """Seconds per train step of the given task's phase, after ``warmup`` untimed steps
    (the first of which compiles; `prepared_step`)."""
    step, state, memory, x, y = prepared_step(config, image_shape, num_classes,
                                              classes_per_task, task_index, pretrained)
    offset = jnp.asarray(task_index * classes_per_task, jnp.int32)
    times = []
    for i in range(warmup - 1 + steps):
        start = time.perf_counter()
        state, memory, metrics = step(state, memory, x, y, offset)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup - 1:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="finetune,lightcl")
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--classes-per-task", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--freeze", default="stage3",
                   help="LightCL's freeze point (none, stem, stage1, stage2, stage3, all-but-head)")
    p.add_argument("--xla-scheduler", default="auto", choices=XLA_SCHEDULERS,
                   help="XLA:CPU's scheduler of the steps (Config.xla_scheduler)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    image_shape = (args.image_size, args.image_size, args.channels)
    if args.freeze == "auto":
        p.error("--freeze auto is decided during a run; give the point it chose "
                "(results.json: freeze_auto.chosen)")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"input {image_shape}, nf {args.nf}, batch {args.batch_size}, "
          f"{args.num_classes} classes, lightcl freeze {args.freeze}, "
          f"XLA scheduler {args.xla_scheduler}")
    rows = {}
    for name in args.strategies.split(","):
        try:
            config = Config(strategy=name, dataset="cifar10", nf=args.nf, freeze=args.freeze,
                            batch_size=args.batch_size, xla_scheduler=args.xla_scheduler
                            ).resolved()
        except ValueError as err:
            p.error(str(err))
        cost = compiled_train_step_cost(config, image_shape, args.num_classes,
                                        args.classes_per_task)
        times = time_steps(config, image_shape, args.num_classes, args.classes_per_task,
                           args.steps)
        rows[name] = {"xla_train_bytes": cost["train_bytes"], "temp_bytes": cost["temp_bytes"],
                      "train_step_flops": cost["flops"],
                      "step_time_s": statistics.median(times), "phase": cost["phase"]}
    print(f"{'strategy':<10}{'XLA MB':>10}{'temp MB':>10}{'GFLOP':>10}{'step s':>10}")
    for name, r in rows.items():
        print(f"{name:<10}{r['xla_train_bytes'] / 2**20:10.1f}{r['temp_bytes'] / 2**20:10.1f}"
              f"{r['train_step_flops'] / 1e9:10.2f}{r['step_time_s']:10.3f}")
    if "lightcl" in rows and "finetune" in rows:
        a, b = rows["lightcl"], rows["finetune"]
        print("lightcl / finetune: "
              f"bytes {a['xla_train_bytes'] / b['xla_train_bytes']:.2f}x, "
              f"FLOPs {a['train_step_flops'] / b['train_step_flops']:.2f}x, "
              f"step time {a['step_time_s'] / b['step_time_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":  # benchmarks/__init__.py has set up the process
    sys.exit(main())
