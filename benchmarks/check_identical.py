"""Does a change keep every result? Runs of this checkout against runs of another.

    git worktree add /tmp/old <commit>
    python -m benchmarks.check_identical --old /tmp/old [--runs lightcl,seeds2] [-- RUN FLAGS]

Runs ``python -m experiments.run`` for every strategy on the default digits
stream and for LightCL with ``--seeds 2``, ``--freeze auto``,
``--layer-metrics``, ``--sparse`` and ``--devices 4`` (4 simulated CPU devices
unless 4 are visible), each once with the code of ``--old`` and once with
this checkout's, one process after another, and compares the two
``results.json`` of each on every entry of the old one but ``wall_time_s`` and
the peak resident memory (one level into dicts: ``resources.eval_flops``),
and lists the entries only the new one has. Prints one line per run; exits 1
when an old entry differs or is gone. A refactor should leave every line
"identical: True". ``--ignore config,identity`` leaves out entries whose
recording changed on purpose (e.g. how the settings are written);
``--new-flags "..."`` gives this checkout's runs flags the old code does not
have (e.g. ``--metrics avg,forgetting,bwt``, the metrics it computed). Flags
after ``--`` go to every run (e.g. ``-- --epochs 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY_RUNS = {name: ["--strategy", name]
                 for name in ("lightcl", "finetune", "joint", "ewc", "lwf", "er", "derpp", "agem")}
RUNS = {**STRATEGY_RUNS, "seeds2": ["--seeds", "2"], "auto": ["--freeze", "auto"],
        "layer_metrics": ["--layer-metrics"], "sparse": ["--sparse"],
        "devices4": ["--devices", "4"]}


def run_once(code: str, flags: list[str], workdir: str) -> tuple[float, dict]:
    """(wall seconds, results) of ``experiments.run`` with the code in ``code``, in the
    environment this checkout's scripts run in (glibc's huge pages where they run
    themselves again with them: an older checkout's run does not), so that the times
    compare the code."""
    from lightcl_jax.process import huge_pages_here
    env = dict(huge_pages_here() or os.environ, PYTHONPATH=code)
    if "--devices" in flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=4").strip()
    command = [sys.executable, "-m", "experiments.run", *flags, "--workdir", workdir,
               "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"check_identical: `{' '.join(command)}` in {code} failed "
                         f"({proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        return time.perf_counter() - start, json.load(f)


def differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The entries of the old results dict that the new one lacks or holds another value
    of (``resources`` entry by entry), but for what was measured
    (`lightcl_jax.training.run.without_measurements`: wall time, peak RSS) and the
    top-level entries ``ignore`` names."""
    from lightcl_jax.training.run import without_measurements
    old, new = without_measurements(old), without_measurements(new)
    out = []
    for key in sorted(set(old) - set(ignore)):
        if key == "resources" and isinstance(new.get(key), dict):
            out += [f"resources.{k}" for k in sorted(old[key])
                    if old[key][k] != new[key].get(k, "absent")]
        elif key not in new or old[key] != new[key]:
            out.append(key)
    return out


def added(old: dict, new: dict) -> list[str]:
    """The top-level entries only the new results dict holds."""
    return sorted(set(new) - set(old))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, run_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_identical",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True,
                        help="a checkout of the code to compare with (git worktree add DIR REV)")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="comma-separated, of: " + ", ".join(RUNS))
    parser.add_argument("--out", default=None, help="where the workdirs go (default: a temporary "
                                                    "directory, removed afterwards)")
    parser.add_argument("--ignore", default="", metavar="KEYS",
                        help="comma-separated top-level entries left out of the comparison "
                             "(e.g. config,identity where only how settings are recorded "
                             "changed)")
    parser.add_argument("--new-flags", default="", metavar="FLAGS",
                        help="flags for this checkout's runs only, one string (settings the "
                             "old code does not have)")
    args = parser.parse_args(own)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    old_code = os.path.abspath(args.old)
    if not os.path.isfile(os.path.join(old_code, "experiments", "run.py")):
        parser.error(f"--old {args.old} is not a lightcl_jax checkout (no experiments/run.py)")
    for flag in run_flags:
        if flag.split("=")[0] in ("--workdir", "--overwrite"):
            parser.error(f"{flag} is set by the check; leave it out")
    with tempfile.TemporaryDirectory(prefix="check-identical-") as tmp:
        out = args.out or tmp
        same = True
        for name in names:
            flags = [*RUNS[name], *run_flags]
            old_s, old = run_once(old_code, flags, os.path.join(out, "old", name))
            new_s, new = run_once(ROOT, [*flags, *shlex.split(args.new_flags)],
                                  os.path.join(out, "new", name))
            differ = differences(old, new, tuple(filter(None, args.ignore.split(","))))
            same &= not differ
            til = "avg_til_mean" if "seeds" in new else "avg_til"
            print(f"{name:14} {len(set(old) - {'wall_time_s'})} old entries, identical: "
                  f"{not differ}{f' (differ: {differ})' if differ else ''}; new entries: "
                  f"{added(old, new) or 'none'}; {til} {old[til]:.4f} / {new[til]:.4f}; "
                  f"{old_s:.0f} s / {new_s:.0f} s", flush=True)
    print("every old entry identical but for wall_time_s" + (f" and {args.ignore}" if args.ignore
                                                               else "")
          if same else "DIFFERENCES FOUND")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
