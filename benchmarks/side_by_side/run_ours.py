"""Runs lightcl_jax on an exported stream, as `run_reference` runs the authors' script.

    python -m benchmarks.side_by_side.run_ours --stream S.npz --config '{"seed": 0, ...}' \
        --out RESULT.json

The run is `train_and_evaluate` on the stream's arrays with the given config,
and nothing the authors' script does not do: no checkpoints, no results
file but ``--out``: the results dict, with ``timeline``, the seconds since
this process started at which each task and each of its epochs began and
ended (`Timeline`), from which `benchmarks.vs_reference` tells where the
time went.
"""

import argparse
import json
import sys
import time

from lightcl_jax.training.progress import Progress

START = time.perf_counter()


class Timeline(Progress):
    """Progress that notes when each task starts and ends, and each epoch ends."""

    def __init__(self):
        self.tasks = []

    def start(self, name, total, done=0):
        self.tasks.append({"name": name, "steps": total, "start_s": time.perf_counter() - START,
                           "epoch_ends_s": []})

    def advance(self, steps, metrics=None):
        if metrics:  # an epoch ended
            self.tasks[-1]["epoch_ends_s"].append(time.perf_counter() - START)

    def end(self, summary):
        self.tasks[-1]["end_s"] = time.perf_counter() - START


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side.run_ours",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--stream", required=True)
    parser.add_argument("--config", required=True, help="Config fields as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from benchmarks.vs_reference import load_stream
    from lightcl_jax.config import Config
    from lightcl_jax.training.loop import train_and_evaluate

    timeline = Timeline()
    results = train_and_evaluate(Config(**json.loads(args.config)),
                                 stream=load_stream(args.stream), progress=timeline)
    results["timeline"] = {"tasks": timeline.tasks, "end_s": time.perf_counter() - START}
    with open(args.out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":  # benchmarks/__init__.py has set up the process
    sys.exit(main())
