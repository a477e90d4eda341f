"""N seeds in one compiled program against N sequential runs, by wall time.

    python -m benchmarks.bench_seeds [--seeds 5] [--seed 0] [-- RUN FLAGS...]

Runs ``python -m experiments.run --seeds N`` once, then ``python -m
experiments.run --seed S`` for each of the N seeds one after the other, each
as its own process in a fresh temporary workdir (as a user would run them:
each process imports, compiles and trains). Prints the wall times, their
ratio, and each seed's average TIL and CIL both ways.
Flags after ``--`` go to every run (e.g. ``-- --epochs 2 --nf 8``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CONTROLLED = ("--seed", "--seeds", "--workdir", "--overwrite")


def _run(flags: list[str], workdir: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "experiments.run", *flags, "--workdir", workdir, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_seeds: `{' '.join(cmd)}` failed with exit code "
                         f"{proc.returncode}:\n{proc.stderr.strip()}")
    with open(os.path.join(workdir, "results.json")) as f:
        return elapsed, json.load(f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, run_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_seeds",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(own)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 to compare; got {args.seeds}")
    for flag in run_flags:
        if flag.split("=")[0] in _CONTROLLED:
            parser.error(f"{flag} is set by the benchmark; pass --seeds/--seed before --")
    seeds = list(range(args.seed, args.seed + args.seeds))
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp:
        together_s, together = _run([*run_flags, "--seed", str(args.seed),
                                     "--seeds", str(args.seeds)], os.path.join(tmp, "together"))
        print(f"{args.seeds} seeds in one program: {together_s:.1f} s", flush=True)
        sequential = []
        for seed in seeds:
            elapsed, results = _run([*run_flags, "--seed", str(seed)],
                                    os.path.join(tmp, f"seed{seed}"))
            sequential.append((elapsed, results))
            print(f"  seed {seed} alone: {elapsed:.1f} s", flush=True)
    sequential_s = sum(elapsed for elapsed, _ in sequential)
    print(f"{args.seeds} sequential runs: {sequential_s:.1f} s")
    print(f"ratio (one program / sequential): {together_s / sequential_s:.2f}")
    print(f"{'seed':<6}{'TIL together':>14}{'TIL alone':>11}{'CIL together':>14}{'CIL alone':>11}")
    for entry, (_, alone) in zip(together["seeds"], sequential):
        print(f"{entry['seed']:<6}{entry['avg_til']:14.2f}{alone['avg_til']:11.2f}"
              f"{entry['avg_cil']:14.2f}{alone['avg_cil']:11.2f}")
    til = [alone["avg_til"] for _, alone in sequential]
    cil = [alone["avg_cil"] for _, alone in sequential]
    print(f"{'mean':<6}{together['avg_til_mean']:14.2f}{sum(til) / len(til):11.2f}"
          f"{together['avg_cil_mean']:14.2f}{sum(cil) / len(cil):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
