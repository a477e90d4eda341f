"""Runs lightcl_jax on an exported stream, as `run_reference` runs the authors' script.

    python -m experiments.side_by_side.run_ours --stream S.npz --config '{"seed": 0, ...}' \
        --out RESULT.json

The run is `train_and_evaluate` on the stream's arrays with the given config,
and nothing the authors' script does not do: no checkpoints, no results
file but ``--out`` (the results dict).
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.side_by_side.run_ours",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--stream", required=True)
    parser.add_argument("--config", required=True, help="Config fields as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from experiments.vs_reference import load_stream
    from lightcl_jax.config import Config
    from lightcl_jax.training.loop import train_and_evaluate

    results = train_and_evaluate(Config(**json.loads(args.config)), load_stream(args.stream))
    with open(args.out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
