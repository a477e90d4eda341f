"""Which LightCL settings fit a device's memory? The train step compiled for each, nothing run.

    python -m experiments.plan_memory --budget-mb 128 [--dataset cifar10] [--strategy lightcl]
        [--image-size 32] [--batch-sizes 8,16,32] [--buffer-sizes 15] [--sparse] [--json PATH]

For every freeze point (LightCL) x batch size x buffer size (x sparse or not,
with ``--sparse``; the sparse rows run compact, ``--sparse-execution compact``), compiles on abstract shapes -- no training, no data, no
download -- the train step of a task >= 1 from a pre-trained backbone, the
phase a device runs for most of a run, and prints the configurations whose
XLA step bytes (arguments + temporaries + outputs not aliased) fit the
budget, the deepest trainable first, with their FLOPs per step and
`theoretical_cost`'s memory beside them; then those that do not fit.
``--json PATH`` also writes every row there.
`lightcl_jax.accounting.compiled.memory_plan` is the library function.
The step bytes are what the compiled step holds; a process needs more
(the Python interpreter, JAX, compiled code: see a run's ``peak_rss_mb``).
"""

from __future__ import annotations

import sys

from experiments.cli.common import Parser, write_json_atomic
from lightcl_jax.config import Config
from lightcl_jax.data.streams import DATASET_SHAPES
from lightcl_jax.registry import STRATEGIES


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def build_parser():
    p = Parser(prog="python -m experiments.plan_memory", description=__doc__.splitlines()[0])
    p.add_argument("--budget-mb", type=float, required=True, help="MiB a train step may hold")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASET_SHAPES),
                   help="whose image shape and classes to plan for (its data is not read)")
    p.add_argument("--strategy", default="lightcl", choices=sorted(STRATEGIES))
    p.add_argument("--image-size", type=int, default=None,
                   help="another square image side than the dataset's")
    p.add_argument("--nf", type=int, default=64, help="ResNet-18 width (64 = the paper)")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="tasks the classes split into (default: the dataset's)")
    p.add_argument("--batch-sizes", default="8,16,32", help="comma-separated")
    p.add_argument("--buffer-sizes", default="15", help="comma-separated")
    p.add_argument("--sparse", action="store_true", help="also the sparse variant's rows")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        batch_sizes, buffer_sizes = _sizes(args.batch_sizes), _sizes(args.buffer_sizes)
        if not args.budget_mb > 0:
            raise ValueError(f"--budget-mb must be > 0; got {args.budget_mb}")
        shape, num_classes = DATASET_SHAPES[args.dataset]
        if args.image_size is not None:
            if args.image_size < 8:
                raise ValueError(f"--image-size must be >= 8; got {args.image_size}")
            shape = (args.image_size, args.image_size, shape[-1])
        num_tasks = args.num_tasks or (5 if num_classes == 10 else 10)
        if num_tasks < 1 or num_classes % num_tasks:
            raise ValueError(f"--num-tasks must divide the {num_classes} classes; "
                             f"got {num_tasks}")
        config = Config(strategy=args.strategy, dataset=args.dataset, nf=args.nf,
                        batch_size=max(batch_sizes), sparse_execution="compact")
        config.validate()
    except ValueError as err:
        parser.error(str(err))

    from lightcl_jax.accounting.compiled import memory_plan

    print(f"{args.strategy} on {args.dataset}-shaped input {shape}, {num_classes} classes in "
          f"{num_tasks} tasks, ResNet-18 nf={args.nf}: the step of a task >= 1 from a "
          f"pre-trained backbone, against {args.budget_mb:g} MB", file=sys.stderr)
    rows = memory_plan(config, shape, num_classes, num_classes // num_tasks,
                       budget_mb=args.budget_mb, batch_sizes=batch_sizes,
                       buffer_sizes=buffer_sizes, sparse=(False, True) if args.sparse else (False,),
                       report=lambda row: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    print(format_rows(rows, args.budget_mb))
    skipped = sorted({(b, f) for b in batch_sizes for f in buffer_sizes if f > b})
    if args.strategy == "lightcl" and skipped:
        print("not tried (LightCL takes its buffer from one batch, so a buffer larger than the "
              "batch is refused): " + ", ".join(f"batch {b} with buffer {f}" for b, f in skipped))
    if args.json:
        write_json_atomic(args.json, {"budget_mb": args.budget_mb, "dataset": args.dataset,
                                      "image_shape": list(shape), "strategy": args.strategy,
                                      "nf": args.nf, "rows": rows})
    return 0


def format_rows(rows: list[dict], budget_mb: float) -> str:
    fits = [r for r in rows if r["fits"]]
    lines = [f"{len(fits)} of {len(rows)} configurations fit {budget_mb:g} MB "
             "(deepest trainable first):",
             f"{'freeze':<14}{'batch':>6}{'buffer':>7}{'sparse':>7}{'step MB':>9}"
             f"{'GFLOP/step':>11}{'theory MB':>10}"]
    for index, row in enumerate(rows):
        if index == len(fits):
            lines.append("do not fit:")
        theory = "-" if row["theory_mb"] is None else f"{row['theory_mb']:.1f}"
        buffer = "-" if row["buffer_size"] is None else row["buffer_size"]
        lines.append(f"{row['freeze']:<14}{row['batch_size']:>6}{buffer:>7}"
                     f"{'yes' if row['sparse'] else 'no':>7}{row['step_mb']:>9.1f}"
                     f"{row['flops'] / 1e9:>11.2f}{theory:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
