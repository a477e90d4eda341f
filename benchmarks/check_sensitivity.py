"""How far does rounding move a run? The run against itself with its weights nudged.

    python -m benchmarks.check_sensitivity [--nudge 1e-7] [RUN FLAGS...]

Trains the run that ``python -m experiments.run RUN FLAGS`` trains twice, in
this process: as it is, and with every weight multiplied by 1 + nudge before
every train step (a perturbation the size of float32 rounding). Prints both
runs' average TIL and CIL and their differences: how much two runs that
differ only in the order of float sums (another device count, several seeds
vmapped together, another XLA version) may differ in the end. Nothing is
written, so the run flags about workdirs and checkpoints (``--workdir``,
``--ckpt-every``, ``--overwrite``) and ``--seeds`` are refused;
``--init-from`` starts both runs from the backbone.
Exit codes: 0 done, 2 bad flag value or data, 1 a run diverged.
"""

from __future__ import annotations

import argparse
import sys

from experiments import run

# Flags of experiments.run that make no sense here: nothing is written, one seed is compared.
REFUSED = ("workdir", "ckpt_every", "overwrite", "seeds", "coordinator", "num_processes",
           "process_id", "distributed")


def main(argv=None) -> int:
    parser = run.build_parser()
    parser.prog = "python -m benchmarks.check_sensitivity"
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--nudge", type=float, default=1e-7,
                        help="relative change of every weight before every step")
    for action in parser._actions:  # refused flags stay out of the namespace unless given
        if action.dest in REFUSED:
            action.default = argparse.SUPPRESS
    _, args = run.parse_args(argv, parser)
    given = [name for name in REFUSED if hasattr(args, name)]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} is not supported here: this check "
                     "writes nothing and compares one seed's run with itself")
    args.seeds = 1
    config = run.config_from_args(args)
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    if not 0 < abs(args.nudge) < 1:
        parser.error(f"--nudge must lie in (-1, 1) and not be 0; got {args.nudge}")

    import jax

    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training.loop import Hooks, train, train_and_evaluate

    def nudged(step):
        def nudged_step(state, memory, x, y, class_offset):
            params = jax.tree_util.tree_map(lambda p: p * (1 + args.nudge), state.params)
            return step(state.replace(params=params), memory, x, y, class_offset)
        return nudged_step

    try:
        setup = run.prepare_run(config, args)
        if args.note:
            print(args.note, file=sys.stderr)
        plain = train_and_evaluate(setup)
        moved = train(setup, hooks=Hooks(step_wrapper=nudged))
    except ValueError as err:
        parser.error(str(err))
    except DivergenceError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"{config.strategy} on {config.dataset}, seed {config.seed}: weights x (1 + "
          f"{args.nudge:g}) before every step")
    for key, label in (("avg_til", "avg TIL"), ("avg_cil", "avg CIL")):
        print(f"  {label}: {plain[key]:.2f} as is, {moved[key]:.2f} nudged "
              f"({moved[key] - plain[key]:+.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
