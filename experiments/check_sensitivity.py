"""How far does rounding move a run? The run against itself with its weights nudged.

    python -m experiments.check_sensitivity [--nudge 1e-7] [RUN FLAGS...]

Trains the run that ``python -m experiments.run RUN FLAGS`` trains twice, in
this process: as it is, and with every weight multiplied by 1 + nudge before
every train step (a perturbation the size of float32 rounding). Prints both
runs' average TIL and CIL and their differences: how much two runs that
differ only in the order of float sums (another device count, several seeds
vmapped together, another XLA version) may differ in the end. Nothing is
written: the run flags about workdirs and checkpoints have no effect.
"""

from __future__ import annotations

import sys

from experiments import run


def main(argv=None) -> int:
    parser = run.build_parser()
    parser.prog = "python -m experiments.check_sensitivity"
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--nudge", type=float, default=1e-7,
                        help="relative change of every weight before every step")
    args = parser.parse_args(argv)
    config = run.config_from_args(args)
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    if args.seeds != 1:
        parser.error("--seeds is not supported here: it compares one seed's run with itself")
    if not 0 < abs(args.nudge) < 1:
        parser.error(f"--nudge must lie in (-1, 1) and not be 0; got {args.nudge}")

    import jax

    from lightcl_jax.training.loop import train_and_evaluate

    def nudged(step):
        def nudged_step(state, memory, x, y, class_offset):
            params = jax.tree_util.tree_map(lambda p: p * (1 + args.nudge), state.params)
            return step(state.replace(params=params), memory, x, y, class_offset)
        return nudged_step

    try:
        plain = train_and_evaluate(config, devices=args.devices)
        moved = train_and_evaluate(config, devices=args.devices, step_wrapper=nudged)
    except ValueError as err:
        parser.error(str(err))
    print(f"{config.strategy} on {config.dataset}, seed {config.seed}: weights x (1 + "
          f"{args.nudge:g}) before every step")
    for key, label in (("avg_til", "avg TIL"), ("avg_cil", "avg CIL")):
        print(f"  {label}: {plain[key]:.2f} as is, {moved[key]:.2f} nudged "
              f"({moved[key] - plain[key]:+.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
