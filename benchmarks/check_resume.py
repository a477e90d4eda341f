"""Kill a run with SIGKILL, rerun it, and compare with a clean run: ``python -m benchmarks.check_resume``.

``--kills N [--kill-seed S] [--command run|compare|pretrain]``: power lost N times. The
command is killed with SIGKILL inside a checkpoint write, during an evaluation and at a
task boundary (where the next task's hooks, or ``--freeze auto``'s probe, run), each after
a step drawn in the run's first third, then at steps drawn with S over the rest of it,
restarted after each, and must end with the outputs of a clean run; after every kill
each run's newest checkpoint must be readable and no older than before (`power_loss`).
``experiments.pretrain`` has no tasks: its moments are a checkpoint write and an epoch's
end (the checkpoint written after the epoch's evaluation); without ``--dataset`` in its
flags it pre-trains on scikit-learn's digits written as a TFDS dataset in ``<out>/data``
(`benchmarks.digits_tfds`).

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
    parser.add_argument("--kills", type=int, default=0, metavar="N",
                        help="power loss: SIGKILL the run at N moments and restart it after "
                             "each (see power_loss); default 0: one kill as above")
    parser.add_argument("--kill-seed", type=int, default=0,
                        help="with --kills: the seed the moments are drawn with")
    parser.add_argument("--command", default="run", choices=("run", "compare", "pretrain"),
                        help="with --kills: experiments.run, experiments.compare or "
                             "experiments.pretrain")
    parser.add_argument("run_args", nargs="*", help="flags for the command (after --)")
    args = parser.parse_args(argv)
    if args.kills:
        return power_loss(parser, args)
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


# The moments a kill is forced into, each once, before the drawn ones: inside a checkpoint
# write (orbax's temporary directory exists), at a task boundary (a task's line was just
# logged: its checkpoint is written, the next task's hooks or --freeze auto's probe run),
# and during evaluation (the task's last epoch was just logged). Pre-training has no tasks
# and logs no epochs: its "epoch end" is the checkpoint written after an epoch's evaluation.
FORCED = {"run": ("checkpoint", "boundary", "evaluation"),
          "compare": ("checkpoint", "boundary", "evaluation"),
          "pretrain": ("checkpoint", "epoch end")}


def _metrics_lines(workdir: str) -> list[dict]:
    """Every line of every metrics.jsonl under ``workdir`` (a comparison has one a run)."""
    lines = []
    for root, _, files in os.walk(workdir):
        if "metrics.jsonl" in files:
            try:
                with open(os.path.join(root, "metrics.jsonl")) as f:
                    lines += [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError):
                pass  # being written
    return lines


def _checkpoint_writes(workdir: str) -> dict[str, float]:
    """orbax's temporary directories under ``workdir`` (checkpoints being written) and
    their modification times."""
    found = {}
    for root, dirs, _ in os.walk(workdir):
        for name in dirs:
            if "orbax-checkpoint-tmp" in name:
                try:
                    found[os.path.join(root, name)] = os.path.getmtime(os.path.join(root, name))
                except OSError:
                    pass  # renamed: the write ended
    return found


def _latest_checkpoints(workdir: str) -> dict[str, int]:
    """Each run's newest complete checkpoint under ``workdir``: its directory -> step; a
    checkpoint that cannot be read raises (a kill must never leave one as the newest)."""
    import logging
    # orbax's notes on a checkpoint being written, or deleted once a task's is written
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    from lightcl_jax.training.checkpoint import RunCheckpoints
    found = {}
    for root, dirs, _ in os.walk(workdir):
        if os.path.basename(root) == "checkpoints":
            checkpoints = RunCheckpoints(root)
            latest = checkpoints.latest()
            if latest is not None:
                checkpoints.read_meta(*latest)
                found[root] = latest[1]
            checkpoints.close()
            dirs.clear()
    return found


def _listed_checkpoints(workdir: str) -> dict[str, int]:
    """Each run's newest checkpoint under ``workdir`` by the names of its directories
    (orbax names a checkpoint by its step once it is complete): its ``checkpoints``
    directory -> step. What the watcher polls: a listing costs far less than reading
    the checkpoints (`_latest_checkpoints`, once after each kill)."""
    found = {}
    for root, dirs, _ in os.walk(workdir):
        if os.path.basename(root) == "checkpoints":
            steps = [int(name) for kind in ("tasks", "steps")
                     for name in _names(os.path.join(root, kind)) if name.isdigit()]
            if steps:
                found[root] = max(steps)
            dirs.clear()
    return found


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:  # not made yet, or being replaced
        return []


def _observe(workdir: str, epochs: int, steps_per_epoch: int | None) -> dict:
    """What a moment is read from: the checkpoint writes under way, and how many task lines
    and last-epoch lines the logs hold (pre-training, ``steps_per_epoch`` given: which
    checkpoint writes at an epoch's end are under way)."""
    writes = _checkpoint_writes(workdir)
    if steps_per_epoch:
        ends = {path for path in writes if _write_step(path) % steps_per_epoch == 0}
        return {"writes": writes, "epoch_ends": ends}
    lines = _metrics_lines(workdir)
    return {"writes": writes,
            "tasks": sum(line["kind"] == "task" for line in lines),
            "last_epochs": sum(line["kind"] == "epoch" and line["epoch"] == epochs
                               for line in lines)}


def _write_step(path: str) -> int:
    """The step of orbax's temporary checkpoint directory ``path`` (``<step>.orbax-...``)."""
    head = os.path.basename(path).split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def _steps_done(workdir: str) -> int:
    """Train steps the runs under ``workdir`` have checkpointed (their newest checkpoints'
    steps, added up over the runs of a comparison)."""
    return sum(_listed_checkpoints(workdir).values())


def _moment_reached(moment, workdir: str, baseline: dict, epochs: int,
                    steps_per_epoch: int | None = None) -> bool:
    """Whether ``moment`` = (kind, step, seconds) came since the process started: once the
    run has checkpointed ``step``, ``seconds`` later (kind "step"), or the next checkpoint
    write, task boundary or evaluation after that (`FORCED`; ``baseline`` holds what
    `_observe` saw when the step was reached)."""
    kind, step, delay = moment
    if "reached" not in baseline:
        if _steps_done(workdir) < step:
            return False
        baseline.update(reached=time.perf_counter(),
                        **_observe(workdir, epochs, steps_per_epoch))
    if kind == "step":
        return time.perf_counter() - baseline["reached"] >= delay
    now = _observe(workdir, epochs, steps_per_epoch)
    if kind == "checkpoint":
        return any(baseline["writes"].get(path) != mtime for path, mtime in now["writes"].items())
    if kind == "epoch end":  # pre-training: a new write at an epoch's end
        return bool(now["epoch_ends"] - baseline["epoch_ends"])
    key = "tasks" if kind == "boundary" else "last_epochs"
    return now[key] > baseline[key]


def _schedule(kills: int, seed: int, total_steps: int, forced: tuple = FORCED["run"]) -> list:
    """The moments (kind, step, seconds), drawn with ``seed``. First `FORCED` (as many as
    ``kills`` allows), each at the first such moment after its step, drawn in the run's
    first third in order; then "step" kills, that many seconds after the run checkpointed
    their step, drawn over the rest of the run (up to 95% of ``total_steps``), in order.
    The forced ones come early so that every moment comes before the run ends."""
    import random
    rng = random.Random(seed)
    forced = list(forced[:kills])
    early = sorted(rng.randrange(1, max(2, total_steps // 3)) for _ in forced)
    late = sorted(rng.randrange(max(early, default=1), max(early[-1] + 2 if early else 2,
                                                             int(0.95 * total_steps)))
                  for _ in range(kills - len(forced)))
    return ([(kind, step, 0.0) for kind, step in zip(forced, early)]
            + [("step", step, round(rng.uniform(0.0, 2.0), 2)) for step in late])


def _outputs(command: str, workdir: str) -> dict:
    """What two runs of the same computation must agree on: results.json (a comparison:
    table.json's rows and each seed's results) less what the clock and the system measure."""
    from lightcl_jax.training.run import without_measurements

    def clean(results):
        return {k: v for k, v in without_measurements(results).items()
                if k != "resumed_at_steps"}
    if command == "run":
        return clean(_results(workdir))
    if command == "pretrain":
        with open(os.path.join(workdir, "pretrain.json")) as f:
            history = json.load(f)
        return {"epochs": [{k: v for k, v in e.items() if k != "wall_time_s"}
                           for e in history["epochs"]],
                "backbone digest": history["backbone"]["digest"],
                **{k: v for k, v in history.items()
                   if k not in ("epochs", "backbone", "wall_time_s", "peak_rss_mb",
                                "resumed_at_steps")}}
    out = {}
    for name in sorted(os.listdir(workdir)):
        if name.endswith(".json") and "-seed" in name:
            with open(os.path.join(workdir, name)) as f:
                out[name] = clean(json.load(f))
    with open(os.path.join(workdir, "table.json")) as f:
        out["table"] = [{k: v for k, v in row.items() if k != "wall_time_s"}
                        for row in json.load(f)["rows"]]
    return out


def _describe(moment) -> str:
    kind, step, delay = moment
    return f"step {step} + {delay} s" if kind == "step" else f"{kind} after step {step}"


def power_loss(parser, args) -> int:
    """Power lost at ``--kills`` moments: the command runs in ``<out>/clean`` once, then in
    ``<out>/killed`` it is killed with SIGKILL at each moment of `_schedule` (the forced
    ones when they come, the drawn ones after that many seconds) and started again after
    each; the last start runs to the end. After every kill each run's newest checkpoint
    must be readable and no older than before it; the end must equal the clean run's
    outputs (`_outputs`). Prints one line per kill and the verdict; exits 1 on any
    difference."""
    out = args.out or tempfile.mkdtemp(prefix="check-power-loss-")
    clean_dir, killed_dir = os.path.join(out, "clean"), os.path.join(out, "killed")
    module = f"experiments.{args.command}"
    run_args = list(args.run_args)
    if args.command == "pretrain" and "--dataset" not in run_args:
        from benchmarks.digits_tfds import prepare
        data_dir = os.path.join(out, "data")
        run_args += ["--dataset", prepare(data_dir), "--data-dir", data_dir]
    command = [sys.executable, "-m", module, "--no-progress", *run_args,
               "--ckpt-every", str(args.ckpt_every)]
    epochs = int(args.run_args[args.run_args.index("--epochs") + 1]) \
        if "--epochs" in args.run_args else 10
    start = time.perf_counter()
    clean = subprocess.run([*command, "--workdir", clean_dir], capture_output=True, text=True)
    if clean.returncode != 0:
        print(clean.stderr[-2000:], file=sys.stderr)
        return clean.returncode
    clean_s, total_steps = time.perf_counter() - start, _steps_done(clean_dir)
    steps_per_epoch = None
    if args.command == "pretrain":
        with open(os.path.join(clean_dir, "pretrain.json")) as f:
            history = json.load(f)
        steps_per_epoch = history["steps"] // len(history["epochs"])
    schedule = _schedule(args.kills, args.kill_seed, total_steps, FORCED[args.command])
    print(f"clean: {clean_s:.1f} s, {total_steps} train steps; kills at: "
          + ", ".join(_describe(m) for m in schedule))
    problems = []
    for number, moment in enumerate(schedule, 1):
        existing = _steps_done(killed_dir)  # what this start can resume from
        proc = subprocess.Popen([*command, "--workdir", killed_dir], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        before, baseline = {}, {}
        while proc.poll() is None and not _moment_reached(moment, killed_dir, baseline, epochs,
                                                          steps_per_epoch):
            before = _listed_checkpoints(killed_dir) or before
            time.sleep(0.005 if "reached" in baseline else 0.05)
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate()[1]
        resumed = [line for line in err.splitlines() if line.startswith("resuming from")]
        try:
            after = _latest_checkpoints(killed_dir)
        except Exception as error:  # noqa: BLE001
            problems.append(f"kill {number}: the newest checkpoint is unreadable: {error}")
            after = {}
        lost = [f"{path} {step} -> {after.get(path)}" for path, step in before.items()
                if after.get(path, -1) < step]
        if lost:
            problems.append(f"kill {number}: checkpoints went back: {lost}")
        where = _describe(moment)
        state = "finished before it" if proc.returncode == 0 else f"killed ({proc.returncode})"
        # No "resuming from" line: it had not yet read its checkpoint, or there was none.
        how = resumed[-1] if resumed else "before it resumed" if existing else "started afresh"
        print(f"kill {number:2} {where:>16}: {state}; {how}; newest checkpoints "
              f"{sorted(after.values()) or 'none'}")
    last = subprocess.run([*command, "--workdir", killed_dir], capture_output=True, text=True)
    if last.returncode != 0:
        print(last.stderr[-2000:], file=sys.stderr)
        return last.returncode
    want, got = _outputs(args.command, clean_dir), _outputs(args.command, killed_dir)
    differing = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    print(f"after {args.kills} kills: identical to the clean run's {', '.join(sorted(want))[:80]}"
          f": {not differing and not problems}"
          + (f" (differ: {differing})" if differing else "")
          + "".join(f"\n  {p}" for p in problems))
    print(f"workdirs in {out}")
    return 0 if not differing and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
