"""Kill a run with SIGKILL, rerun it, and compare with a clean run: ``python -m benchmarks.check_resume``.

Runs ``python -m experiments.run ARGS`` three times in subprocesses: once
uninterrupted (workdir ``<out>/clean``), once killed with ``--signal``
(default SIGKILL) after the first mid-task checkpoint of task
``--kill-in-task`` appears (``<out>/killed``), then the same command again,
which resumes. With ``--signal TERM`` or ``INT`` (a preemption) the run must
stop by itself after checkpointing the step it is in, with exit code 143 or
130; its line saying where is printed. Prints where it resumed and
whether the two ``results.json`` agree on every entry but ``wall_time_s`` and
``resumed_at_steps``; exits 1 when they do not. Extra flags go to the run,
e.g. ``python -m benchmarks.check_resume -- --strategy derpp --epochs 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

RUN = [sys.executable, "-m", "experiments.run", "--no-progress"]
IGNORED = ("wall_time_s", "resumed_at_steps", "resources.peak_rss_mb")


def _differences(want: dict, got: dict) -> list[str]:
    """The entries that differ, but for `IGNORED` (the measured ones and the resume steps)."""
    from lightcl_jax.training.run import without_measurements
    want, got = without_measurements(want), without_measurements(got)
    return sorted(k for k in set(want) | set(got)
                  if k != "resumed_at_steps" and want.get(k) != got.get(k))


def _results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _checkpointed_in_task(workdir: str, task: int) -> bool:
    """Whether a mid-task checkpoint of ``task`` exists (read from its JSON part)."""
    steps = os.path.join(workdir, "checkpoints", "steps")
    if not os.path.isdir(steps):
        return False
    for name in os.listdir(steps):
        meta = os.path.join(steps, name, "meta", "metadata")
        if name.isdigit() and os.path.exists(meta):
            try:
                with open(meta) as f:
                    if json.load(f)["position"]["task"] >= task:
                        return True
            except (OSError, ValueError, KeyError):
                pass  # being written
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_resume",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the two workdirs go (default: a "
                                                    "new temporary directory)")
    parser.add_argument("--kill-in-task", type=int, default=1,
                        help="kill after a checkpoint inside this task (0-based; default 1)")
    parser.add_argument("--ckpt-every", type=int, default=7,
                        help="checkpoint interval of the runs (default 7 steps)")
    parser.add_argument("--signal", default="KILL", choices=("KILL", "TERM", "INT"),
                        help="the signal that stops the run (default KILL)")
    parser.add_argument("run_args", nargs="*", help="flags for experiments.run (after --)")
    args = parser.parse_args(argv)
    if args.ckpt_every < 1 or args.kill_in_task < 0:
        parser.error("--ckpt-every must be >= 1 and --kill-in-task >= 0")
    out = args.out or tempfile.mkdtemp(prefix="check-resume-")
    clean_dir, killed_dir = os.path.join(out, "clean"), os.path.join(out, "killed")
    command = [*RUN, *args.run_args, "--ckpt-every", str(args.ckpt_every)]

    start = time.perf_counter()
    clean = subprocess.run([*command, "--workdir", clean_dir], capture_output=True, text=True)
    if clean.returncode != 0:
        print(clean.stderr, file=sys.stderr)
        return clean.returncode
    print(f"clean run: {time.perf_counter() - start:.1f} s")

    proc = subprocess.Popen([*command, "--workdir", killed_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not _checkpointed_in_task(killed_dir, args.kill_in_task):
        time.sleep(0.01)
    if proc.poll() is not None:
        print("the run finished before it could be killed; pass a longer run or a smaller "
              "--ckpt-every", file=sys.stderr)
        return 1
    signum = signal.Signals["SIG" + args.signal]
    proc.send_signal(signum)
    err = proc.communicate()[1]
    if signum != signal.SIGKILL:
        print("\n".join(line for line in err.splitlines() if "stopped by" in line))
        if proc.returncode != 128 + signum:
            print(f"the run exited with {proc.returncode}, not {128 + signum}", file=sys.stderr)
            return 1
    print(f"stopped with {signum.name} (exit code {proc.returncode}); results.json written: "
          f"{os.path.exists(os.path.join(killed_dir, 'results.json'))}")

    resumed = subprocess.run([*command, "--workdir", killed_dir], capture_output=True, text=True)
    if resumed.returncode != 0:
        print(resumed.stderr, file=sys.stderr)
        return resumed.returncode
    for line in resumed.stderr.splitlines():
        if line.startswith("resuming from"):
            print(line)
    want, got = _results(clean_dir), _results(killed_dir)
    differing = _differences(want, got)
    print(f"avg TIL {want['avg_til']:.4f} / {got['avg_til']:.4f}, avg CIL {want['avg_cil']:.4f} "
          f"/ {got['avg_cil']:.4f} (clean / killed and resumed)")
    print(f"resumed_at_steps {got['resumed_at_steps']}; identical results.json but for "
          f"{', '.join(IGNORED)}: {not differing}" + (f" (differ: {differing})" if differing else ""))
    print(f"workdirs in {out}")
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
