"""Train steps with and without glibc's malloc asking for huge pages, in alternating processes.

    python -m benchmarks.bench_huge_pages [--pairs 6] [--steps 10] [--nf 64] [--no-torch]
                                          [--json PATH]

The experiment scripts run themselves again with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (`lightcl_jax.process.
run_with_huge_pages`), a setting glibc reads only when a process starts. So
this compares processes: ``--pairs`` pairs, each a process without the tunable
then one with it, each timing ``--steps`` steps (after three untimed ones) of
the full-network step (task 0, as finetune and the baselines) and LightCL's
frozen-phase step (task 1) on a fixed random batch of 32x32x3 images, batch 32,
and the same two PyTorch steps (`benchmarks.torch_reference`) where PyTorch is
installed. Each process caps malloc's arenas as the experiment scripts do
(`limit_malloc_arenas`) and keeps any other tunable the user set. Per step it
prints wall milliseconds, user and system CPU
milliseconds and minor page faults (``getrusage``); then, per kind of step, the
ratio with / without the tunable of each pair and their median. Alternating
pairs is what makes the comparison hold on a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from experiments.cli.common import Parser, write_json_atomic
from lightcl_jax.process import (HUGE_PAGES_SWITCH, HUGE_PAGES_TUNABLE,
                                            limit_malloc_arenas)

KINDS = ("jax full", "jax lightcl", "torch full", "torch lightcl")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.bench_huge_pages", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6, help="alternating pairs of processes")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind a process")
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--no-torch", action="store_true", help="time only the JAX steps")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def _measure(step, steps: int) -> dict:
    """Per-step wall and CPU milliseconds and minor faults of ``steps`` calls of ``step``."""
    for _ in range(2):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_ms": 1e3 * wall / steps,
            "user_ms": 1e3 * (after.ru_utime - before.ru_utime) / steps,
            "sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
            "minor_faults": (after.ru_minflt - before.ru_minflt) / steps}


def child(steps: int, nf: int, torch: bool) -> dict:
    """The figures of one process: each kind of step, timed in this process."""
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_step import prepared_step
    from lightcl_jax.config import Config

    out = {}
    for kind, task in (("jax full", 0), ("jax lightcl", 1)):
        config = Config(strategy="lightcl", dataset="cifar10", nf=nf, batch_size=32)
        prepared = list(prepared_step(config, (32, 32, 3), 10, 2, task))
        offset = jnp.asarray(2 * task, jnp.int32)

        def step(prepared=prepared, offset=offset):
            fn, state, memory, x, y = prepared
            state, memory, metrics = fn(state, memory, x, y, offset)
            jax.block_until_ready(metrics["loss"])
            prepared[1:3] = state, memory
        out[kind] = _measure(step, steps)
    if torch:
        import torch as th

        from benchmarks.torch_reference import build_full_step, build_lightcl_step
        th.set_num_threads(os.cpu_count())
        for kind, build in (("torch full", build_full_step), ("torch lightcl", build_lightcl_step)):
            step, x, y = build(nf=nf)
            out[kind] = _measure(lambda: step(x, y), steps)
    return out


def summarize(pairs: list[dict]) -> dict:
    """Per kind of step: each pair's wall-time ratio with / without the tunable, and the
    median ratio. ``pairs``: ``[{"off": figures, "on": figures}, ...]``."""
    out = {}
    for kind in KINDS:
        ratios = [p["on"][kind]["wall_ms"] / p["off"][kind]["wall_ms"]
                  for p in pairs if kind in p["on"] and kind in p["off"]]
        if ratios:
            out[kind] = {"ratios": ratios, "median": statistics.median(ratios)}
    return out


def child_environment(environ, with_tunable: bool) -> dict:
    """``environ`` with the huge-pages tunable removed, then added back ``with_tunable``;
    the user's other tunables kept, our scripts' switch and marker dropped."""
    env = {k: v for k, v in environ.items() if not k.startswith(HUGE_PAGES_SWITCH)}
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb=")]
    if with_tunable:
        tunables.append(HUGE_PAGES_TUNABLE)
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def _run_child(args, with_tunable: bool) -> dict:
    env = child_environment(os.environ, with_tunable)
    command = [sys.executable, "-m", "benchmarks.bench_huge_pages", "--child",
               "--steps", str(args.steps), "--nf", str(args.nf)] + (
                   ["--no-torch"] if args.no_torch else [])
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_huge_pages: a measuring process failed:\n{proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.pairs, args.steps, args.nf) < 1:
        parser.error(f"--pairs, --steps and --nf must be >= 1; got {args.pairs}, {args.steps} "
                     f"and {args.nf}")
    torch = not args.no_torch
    if torch:
        import importlib.util
        torch = importlib.util.find_spec("torch") is not None
    if args.child:
        limit_malloc_arenas()  # as the experiment scripts, before JAX starts its threads
        print(json.dumps(child(args.steps, args.nf, torch)))
        return 0
    pairs = []
    for index in range(args.pairs):
        pair = {}
        for name, with_tunable in (("off", False), ("on", True)):
            pair[name] = _run_child(args, with_tunable)
            cells = "  ".join(f"{kind} {f['wall_ms']:.0f} ms (user {f['user_ms']:.0f}, sys "
                              f"{f['sys_ms']:.0f}, {f['minor_faults']:.0f} faults)"
                              for kind, f in pair[name].items())
            print(f"pair {index + 1}, tunable {name}: {cells}", flush=True)
        pairs.append(pair)
    summary = summarize(pairs)
    for kind, s in summary.items():
        print(f"{kind}: with / without {HUGE_PAGES_TUNABLE}, median {s['median']:.3f} "
              f"(pairs: {', '.join(f'{r:.3f}' for r in s['ratios'])})")
    if args.json:
        write_json_atomic(args.json, {"pairs": pairs, "summary": summary, "steps": args.steps,
                                      "nf": args.nf, "tunable": HUGE_PAGES_TUNABLE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
