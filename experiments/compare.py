"""Strategies x seeds on one stream, tabulated like Table 1 of the LightCL paper.

    python -m experiments.compare --dataset digits --seeds 3
    python -m experiments.compare --dataset cifar10 --data-dir DIR --seeds 5   # needs the data

Runs every strategy (default: all registered) for seeds --seed .. --seed+N-1
on the same stream, model and settings, and writes into the workdir:
  * ``table.md`` and ``table.csv``: one row per strategy (named as --strategy
    names it): CIL and TIL final average accuracy as mean +/- std over seeds,
    CIL and TIL forgetting (mean), whole-run training FLOPs, the largest
    train step's bytes and those of the step of tasks >= 1 (all from XLA's
    analysis of the compiled steps: arguments + temporaries + outputs not
    aliased), and the mean wall time of a run. The cost columns count train
    steps only, not the work at task boundaries (EWC's Fisher pass, LightCL's
    reference and vital-channel forwards, LwF's copy);
  * ``<strategy>-seed<k>.json``: each run's full results;
  * ``accuracy_curve.png`` and ``cost_vs_accuracy.png`` (`experiments.figures`).
Exit codes: 0 done, 2 bad flag value or data, 1 a run diverged.
"""

from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np

from experiments.common import Bars, Parser, write_json_atomic
from experiments.figures import accuracy_curve_figure, cost_accuracy_figure, save_figure
from lightcl_jax.config import Config
from lightcl_jax.data.streams import DATASETS
from lightcl_jax.registry import STRATEGIES

# Table 1's order, then anything registered later.
ORDER = ("joint", "finetune", "ewc", "lwf", "er", "derpp", "lightcl")
COLUMNS = ("strategy", "buffer", "cil_mean", "cil_std", "til_mean", "til_std", "forgetting_cil",
           "forgetting_til", "train_flops", "step_mb", "step_mb_later", "wall_time_s")


def build_parser():
    d = Config()
    p = Parser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--num-tasks", type=int, default=None)
    p.add_argument("--strategies", default=None,
                   help="comma-separated (default: " + ",".join(ORDER) + ")")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--nf", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--buffer-size", type=int, default=d.buffer_size)
    p.add_argument("--workdir", default=None, help="default: runs/compare-<dataset>")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_cost(results: dict) -> dict:
    """Whole-run training FLOPs and train-step bytes from a run's ``resources`` (XLA).

    ``step_bytes`` is the largest compiled train step of the run, ``step_bytes_later``
    the step of the phase that trained the last task (LightCL: frozen + regulation).
    """
    resources = results["resources"]
    last = max(resources["train_steps"], key=lambda s: max(s["tasks"]))
    return {"train_flops": resources["train_flops"],
            "step_bytes": resources["peak_train_step_bytes"],
            "step_bytes_later": last["step_bytes"]}


def summarize(name: str, runs: list[dict], cost: dict, buffer: int | None) -> dict:
    cil = np.array([r["avg_cil"] for r in runs])
    til = np.array([r["avg_til"] for r in runs])
    return {
        "strategy": name,
        "buffer": buffer,
        "cil_mean": float(cil.mean()), "cil_std": float(cil.std()),
        "til_mean": float(til.mean()), "til_std": float(til.std()),
        "forgetting_cil": float(np.mean([r["forgetting_cil"] for r in runs])),
        "forgetting_til": float(np.mean([r["forgetting_til"] for r in runs])),
        "train_flops": cost["train_flops"],
        "step_mb": cost["step_bytes"] / 2 ** 20,
        "step_mb_later": cost["step_bytes_later"] / 2 ** 20,
        "wall_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
    }


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| Method | Buffer | CIL (%) | TIL (%) | Forgetting CIL | Forgetting TIL "
             "| Train FLOPs | Peak step MB | Step MB, task >= 1 | Wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['buffer'] if r['buffer'] is not None else '-'} "
            f"| {r['cil_mean']:.2f} ± {r['cil_std']:.2f} | {r['til_mean']:.2f} ± {r['til_std']:.2f} "
            f"| {r['forgetting_cil']:.2f} | {r['forgetting_til']:.2f} "
            f"| {r['train_flops']:.3g} | {r['step_mb']:.1f} | {r['step_mb_later']:.1f} "
            f"| {r['wall_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in COLUMNS})
    return out.getvalue()


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = (args.strategies.split(",") if args.strategies
             else [n for n in ORDER if n in STRATEGIES] + sorted(set(STRATEGIES) - set(ORDER)))
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(sorted(STRATEGIES))}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1; got {args.seeds}")
    configs = {}
    try:
        for name in names:
            configs[name] = Config(strategy=name, dataset=args.dataset, data_dir=args.data_dir,
                                   num_tasks=args.num_tasks, epochs=args.epochs, nf=args.nf,
                                   batch_size=args.batch_size,
                                   buffer_size=args.buffer_size).resolved()
    except ValueError as err:
        parser.error(str(err))
    workdir = args.workdir or os.path.join("runs", f"compare-{args.dataset}")

    from lightcl_jax.data.streams import make_stream, validate_stream
    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training.loop import train_and_evaluate

    first = next(iter(configs.values()))
    try:
        stream = make_stream(first.dataset, data_dir=first.data_dir, num_tasks=first.num_tasks,
                             eval_split=first.eval_split)
        for config in configs.values():
            validate_stream(stream, config.batch_size)
    except ValueError as err:
        parser.error(str(err))

    os.makedirs(workdir, exist_ok=True)
    rows, all_runs = [], {}
    seeds = range(args.seed, args.seed + args.seeds)
    for name in names:
        runs = []
        for seed in seeds:
            config = Config(**{**configs[name].to_dict(), "seed": seed})
            print(f"[{name} seed {seed}]", file=sys.stderr, flush=True)
            try:
                results = train_and_evaluate(
                    config, stream, progress=Bars(not args.no_progress))
            except DivergenceError as err:
                print(f"{parser.prog}: error: {name} seed {seed}: {err}", file=sys.stderr)
                return 1
            write_json_atomic(os.path.join(workdir, f"{name}-seed{seed}.json"), results)
            runs.append(results)
        all_runs[name] = runs
        uses_buffer = name in ("er", "derpp", "lightcl")
        rows.append(summarize(name, runs, run_cost(runs[0]),
                              configs[name].buffer_size if uses_buffer else None))

    c = first
    header = (f"{stream.name}: {stream.num_tasks} tasks, ResNet-18 nf={c.nf}, {c.epochs} epochs "
              f"per task, batch {c.batch_size}, lr {c.lr}, seeds {seeds.start}..{seeds.stop - 1}, "
              f"eval split {stream.eval_split}; mean ± std over seeds (forgetting: mean)")
    markdown = to_markdown(rows, header)
    _write_text(os.path.join(workdir, "table.md"), markdown)
    _write_text(os.path.join(workdir, "table.csv"), to_csv(rows))
    print(markdown)
    curve = save_figure(accuracy_curve_figure(all_runs, f"{stream.name}: average accuracy "
                                                        "over the tasks seen so far"),
                        os.path.join(workdir, "accuracy_curve.png"))
    costs = save_figure(cost_accuracy_figure(rows, f"{stream.name}: accuracy against cost"),
                        os.path.join(workdir, "cost_vs_accuracy.png"))
    print(f"written: {os.path.join(workdir, 'table.md')}, {os.path.join(workdir, 'table.csv')}, "
          f"{curve}, {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
