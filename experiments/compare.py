"""Strategies x seeds on one stream, tabulated like Table 1 of the LightCL paper.

    python -m experiments.compare --dataset digits --seeds 3
    python -m experiments.compare --config split_cifar10 --init-from BACKBONE --data-dir DIR

Runs every strategy (default: all registered; a class of your own by import path,
``path/to/file.py:Name``) for seeds --seed .. --seed+N-1
on the same stream, model and settings. Each strategy's seeds train together
in one compiled program (`lightcl_jax.training.placement`; ``--one-by-one``
trains them one after another instead). ``--config`` takes a paper
configuration (or a ``.py`` file with FLAGS, as ``experiments.run``): its
values are the defaults of every strategy (its ``strategy`` excepted), and
flags given here win. ``--strategy-arg NAME=VALUE`` sets a hyperparameter of every
strategy that has it (``buffer_size=15``), ``STRATEGY.NAME=VALUE`` of one
(``ewc.lam=100``); ``--init-from`` starts every strategy from the same
pre-trained backbone, as Table 1 did.

A comparison is a run of runs: each strategy (each seed, with ``--one-by-one``) is a
run of its own in ``<workdir>/runs/<strategy>`` (``<strategy>-seed<k>``), checkpointed
and resumed as ``experiments.run`` does. Rerunning the same command after any
interruption skips the finished runs, resumes the one that was cut off, and writes the
table of an uninterrupted comparison. ``comparison.json`` records what the comparison
is (strategies, seeds, settings, backbone); a workdir holding another is refused, its
files untouched, unless ``--overwrite``. SIGINT or SIGTERM stops it after a checkpoint
with one line (exit 130, 143). Prints the table and writes into the workdir:
  * ``table.md``, ``table.csv`` and ``table.json``: one row per strategy (named as
    --strategies names it): CIL and TIL final average accuracy as mean +/- std over
    seeds, CIL and TIL forgetting (mean), every other metric the runs report
    (``--metrics``: backward transfer, average incremental accuracy, the evaluation
    loss, a metric of your own, ...) as mean +/- std, one run's training FLOPs, one run's largest
    train step's bytes and those of its step of tasks >= 1 (all from XLA's
    analysis of one seed's compiled steps, `one_run_cost`: arguments +
    temporaries + outputs not aliased), and the wall time of all of the strategy's seeds. The cost
    columns count train steps only, not the work at task boundaries (EWC's
    Fisher pass, LightCL's reference and vital-channel forwards, LwF's copy);
  * ``<strategy>-seed<k>.json``: each seed's results;
  * ``accuracy_curve.png`` and ``cost_vs_accuracy.png`` (`lightcl_jax.figures`);
  * ``runs/``: each run's workdir (results.json, metrics.jsonl, accuracy.png,
    checkpoints/, and with ``--tensorboard`` tensorboard/).
Exit codes: 0 done, 2 bad flag value, config, backbone, data or workdir, 3 a run diverged,
1 a file could not be written, 130/143 stopped by SIGINT/SIGTERM (rerun to resume).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import os
import sys

import numpy as np

from experiments.cli.common import (Bars, Parser, add_compile_cache_flag, check_ckpt_every,
                                    metrics_help, parse_metrics, strategies_help,
                                    strategy_arguments, use_compile_cache, write_json_atomic)
from lightcl_jax.figures import accuracy_curve_figure, cost_accuracy_figure, save_figure
from lightcl_jax.config import DEFAULT_METRICS, Config
from lightcl_jax.data.streams import DATASETS
from lightcl_jax.registry import STRATEGIES

# Table 1's order, then anything registered later.
ORDER = ("joint", "finetune", "ewc", "lwf", "er", "agem", "derpp", "lightcl")
COLUMNS = ("strategy", "buffer", "cil_mean", "cil_std", "til_mean", "til_std", "forgetting_cil",
           "forgetting_til", "train_flops", "step_mb", "step_mb_later", "wall_time_s")
# The metrics with columns of their own above (their std is not tabulated).
TABULATED = ("avg_cil", "avg_til", "forgetting_cil", "forgetting_til")
# The flags of this script that set a `Config` field; None: not given.
CONFIG_FLAGS = ("dataset", "data_dir", "num_tasks", "epochs", "nf", "batch_size")
DEFAULT_SEEDS = 3
# The comparison's own files in its workdir, besides each seed's <strategy>-seed<k>.json.
UNITS = "runs"              # each run's workdir
MANIFEST = "comparison.json"
OUTPUTS = ("table.md", "table.csv", "table.json", "accuracy_curve.png", "cost_vs_accuracy.png")


def build_parser():
    p = Parser(prog="python -m experiments.compare", description=__doc__.splitlines()[0],
               more_help=lambda args: strategies_help(_names(args)) + "\n\n" + metrics_help())
    p.add_argument("--config", default=None, metavar="NAME",
                   help="a paper configuration (split_cifar10, split_tinyimagenet) or a .py file "
                        "defining FLAGS: the defaults of every strategy; flags here override")
    p.add_argument("--init-from", default=None, metavar="BACKBONE",
                   help="start every strategy from this pre-trained backbone (a directory of "
                        "experiments.pretrain or experiments.convert_torch); --nf defaults to its")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help=f"default: the config's, or {Config().dataset}")
    p.add_argument("--data-dir", default=None, help="as experiments.run's (default: TFDS's)")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="tasks to split the classes into (default: the dataset's)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated names or import paths (default: " + ",".join(ORDER)
                        + ")")
    p.add_argument("--strategy-arg", action="append", default=[], metavar="[STRATEGY.]NAME=VALUE",
                   help="a hyperparameter, repeatable: NAME=VALUE sets it in every strategy "
                        "that has it (buffer_size=15), STRATEGY.NAME=VALUE in that one "
                        "(ewc.lam=100); the strategies' hyperparameters and defaults are listed "
                        "at the end (default: each strategy's defaults)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="NAMES",
                   help="the run summaries and evaluation metrics to report (as "
                        "experiments.run's --metrics)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds (default: the config's, or {DEFAULT_SEEDS})")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--one-by-one", action="store_true",
                   help="train a strategy's seeds one after another, not in one program")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per task (default: the config's, or the dataset's)")
    p.add_argument("--nf", type=int, default=None,
                   help="ResNet width (default: the config's, the backbone's, or the dataset's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch size (default: the config's, or {Config().batch_size})")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split each batch over the first N visible devices (default: all)")
    p.add_argument("--workdir", default=None,
                   help="default: runs/compare-<dataset>; rerunning the same command resumes")
    p.add_argument("--ckpt-every", type=int, default=500, metavar="N",
                   help="each run also checkpoints every N train steps within a task (0: only "
                        "after each task)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard another comparison's files in --workdir (without it, they "
                        "are refused)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log each run's epochs and tasks as TensorBoard scalars in its "
                        "workdir (runs/<strategy>/tensorboard)")
    add_compile_cache_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def strategy_configs(parser, args, names: list[str]) -> tuple[dict[str, Config], int]:
    """(strategy -> its `Config`, number of seeds) of the flags and ``--config``."""
    base = {}
    if args.config is not None:
        from experiments.configs import load_config
        try:
            base = dict(load_config(args.config).FLAGS)
        except ValueError as err:
            parser.error(str(err))
    seeds = args.seeds if args.seeds is not None else base.pop("seeds", DEFAULT_SEEDS)
    base.pop("seeds", None)
    base.pop("strategy", None)
    config_args = base.pop("strategy_args", None)
    fields = {f.name for f in dataclasses.fields(Config)} - {"strategy_args"}
    unknown = sorted(set(base) - fields)
    if unknown:
        parser.error(f"config {args.config} sets {unknown}, which experiments.compare cannot "
                     f"apply; it takes Config fields, strategy_args and seeds: "
                     f"{', '.join(sorted(fields))}")
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        parser.error(f"--seeds must be an integer >= 1; got {seeds!r}")
    configs = {}
    try:
        metrics = parse_metrics(args.metrics, DEFAULT_METRICS)
        for name in names:
            configs[name] = Config(**{**base, **given, "strategy": name, "seed": args.seed,
                                      "metrics": metrics})
            configs[name].validate()
        from lightcl_jax.strategies import strategy_class
        classes = {name: strategy_class(name) for name in names}
        strategy_args = strategy_arguments(classes, args.strategy_arg, config_args, args.config)
        for name in classes:
            configs[name] = dataclasses.replace(configs[name], strategy_args=strategy_args[name])
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    return configs, seeds


def load_start(parser, args, configs: dict[str, Config]):
    """The backbone's (variables, meta), (None, None) without ``--init-from``; sets each
    config's nf to the backbone's."""
    if args.init_from is None:
        return None, None
    from lightcl_jax.model.backbone import load_backbone
    try:
        variables, meta = load_backbone(args.init_from)
    except ValueError as err:
        parser.error(str(err))
    if args.nf is not None and args.nf != meta["nf"]:
        parser.error(f"--nf {args.nf} differs from the backbone's nf={meta['nf']} "
                     f"({args.init_from}); leave --nf out to use it")
    for name, config in configs.items():
        configs[name] = dataclasses.replace(config, nf=meta["nf"])
    return variables, meta


def one_run_cost(config: Config, stream, results: dict, pretrained: bool) -> dict:
    """One seed's whole-run training FLOPs and train-step bytes, from XLA.

    Each phase's train step is compiled here for one seed (a program of N
    seeds holds N of everything, and vmapped kernels count differently), and
    its FLOPs are multiplied by the steps the run took in that phase.
    ``step_bytes`` is the largest step, ``step_bytes_later`` the step of the
    phase that trained the last task (LightCL: frozen + regulation).
    """
    from lightcl_jax.accounting.compiled import compiled_train_step_cost
    flops, steps = 0.0, []
    for phase in results["resources"]["train_steps"]:
        cost = compiled_train_step_cost(config, stream.image_shape, stream.num_classes,
                                        stream.classes_per_task, task_index=phase["tasks"][0],
                                        pretrained=pretrained, quick=True)
        flops += phase["steps"] * cost["flops"]
        steps.append((max(phase["tasks"]), cost["step_bytes"]))
    return {"train_flops": flops, "step_bytes": max(b for _, b in steps),
            "step_bytes_later": max(steps)[1]}


def summarize(name: str, runs: list[dict], cost: dict, buffer: int | None,
              wall_time_s: float) -> dict:
    """A table row: ``runs`` are the seeds' results, ``wall_time_s`` that of all of them.
    Every metric the runs report besides those of `COLUMNS` (`TABULATED`) joins it as
    ``<key>`` (the mean over seeds) and ``<key>_std``."""
    from lightcl_jax.training.run import scalar_metric_keys
    cil = np.array([r["avg_cil"] for r in runs])
    til = np.array([r["avg_til"] for r in runs])
    others = {}
    for key in scalar_metric_keys(runs[0]):
        if key not in TABULATED:
            values = np.array([r[key] for r in runs])
            others.update({key: float(values.mean()), f"{key}_std": float(values.std())})
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
        "wall_time_s": float(wall_time_s),
        **others,
    }


def metric_columns(rows: list[dict]) -> list[str]:
    """The metrics the rows hold besides those of `COLUMNS`, in the order of the first."""
    return [k for k in rows[0] if k not in COLUMNS and not k.endswith("_std")]


def to_markdown(rows: list[dict], header: str) -> str:
    extra = metric_columns(rows)
    lines = [header, "",
             "| Method | Buffer | CIL (%) | TIL (%) | Forgetting CIL | Forgetting TIL "
             "| Train FLOPs | Peak step MB | Step MB, task >= 1 | Wall s, all seeds |"
             + "".join(f" {key} |" for key in extra),
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['buffer'] if r['buffer'] is not None else '-'} "
            f"| {r['cil_mean']:.2f} ± {r['cil_std']:.2f} | {r['til_mean']:.2f} ± {r['til_std']:.2f} "
            f"| {r['forgetting_cil']:.2f} | {r['forgetting_til']:.2f} "
            f"| {r['train_flops']:.3g} | {r['step_mb']:.1f} | {r['step_mb_later']:.1f} "
            f"| {r['wall_time_s']:.1f} |"
            + "".join(f" {r[key]:.4g} ± {r[key + '_std']:.2g} |" for key in extra))
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    fields = list(COLUMNS) + [k for key in metric_columns(rows) for k in (key, key + "_std")]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in fields})
    return out.getvalue()


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train_seeds(config: Config, stream, variables, seeds: int, args, workdir: str
                ) -> tuple[list[dict], dict]:
    """(each seed's results, the results a run's cost is read from) of one strategy, each
    run in its own workdir under ``workdir`` (``runs/<strategy>``, or ``runs/<strategy>-
    seed<k>`` one by one): a finished run's results are read back, an interrupted one
    resumes.

    Raises:
      DivergenceError: a seed diverged. Preempted: a signal stopped a run after its
      checkpoint. ValueError: a run's workdir holds another run's files.
    """
    from lightcl_jax.training.loop import train_and_evaluate
    from lightcl_jax.training.run import setup_run

    label = _label(config.strategy)
    if not args.one_by_one:
        run = setup_run(config, stream, init_variables=variables, devices=args.devices,
                        seeds=seeds)
        results = train_and_evaluate(run, os.path.join(workdir, UNITS, label),
                                     progress=_progress(args, workdir, label, config.lr),
                                     checkpoint_every=args.ckpt_every)
        if seeds == 1:
            return [results], results
        common = {k: results[k] for k in ("strategy", "dataset", "num_tasks", "eval_split",
                                          "pretrained", "config", "metric_names", "phases")}
        runs = [{**common, **seed, "trained_with_seeds": [r["seed"] for r in results["seeds"]]}
                for seed in results["seeds"]]
        return runs, results
    runs = []
    for seed in range(config.seed, config.seed + seeds):
        run = setup_run(dataclasses.replace(config, seed=seed), stream, init_variables=variables,
                        devices=args.devices)
        unit = f"{label}-seed{seed}"
        runs.append(train_and_evaluate(run, os.path.join(workdir, UNITS, unit),
                                       progress=_progress(args, workdir, unit, config.lr),
                                       checkpoint_every=args.ckpt_every))
    return runs, runs[0]


def _progress(args, workdir: str, unit: str, lr: float):
    """A run's progress: bars (unless ``--no-progress``) and, with ``--tensorboard``, its
    scalars in ``runs/<unit>/tensorboard``."""
    from lightcl_jax.training.progress import Fanout, TensorBoardLog
    sinks = [Bars(not args.no_progress)]
    if args.tensorboard:
        sinks.append(TensorBoardLog(os.path.join(workdir, UNITS, unit, "tensorboard"), lr=lr))
    return Fanout(*sinks)


def comparison_identity(configs: dict[str, Config], seeds: int, args, meta) -> dict:
    """What makes two comparisons the same: the strategies with every setting and
    hyperparameter (defaults filled in), the seeds and how they train, the backbone."""
    from lightcl_jax.strategies import strategy_of
    settings = {}
    for name, config in configs.items():
        config = config.resolved()
        config = dataclasses.replace(config, strategy_args=strategy_of(config).hyperparameters())
        settings[name] = config.identity_dict()
    identity = {"strategies": list(configs), "settings": settings,
                "seeds": {"first": args.seed, "count": seeds, "one_by_one": args.one_by_one},
                "devices": args.devices,
                "init_from": None if meta is None else meta["digest"]}
    return json.loads(json.dumps(identity))


def comparison_differences(stored: dict, current: dict) -> str:
    """'' when two comparisons agree, else what differs, one clause each (a strategy's
    settings setting by setting)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "absent"), current.get(key, "absent")
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) & set(b)):
                for field in sorted(set(a[name]) | set(b[name])):
                    x, y = a[name].get(field, "absent"), b[name].get(field, "absent")
                    if x != y:
                        out.append(f"{name} {field} {x!r} there, {y!r} here")
        elif a != b and not (key == "settings" and stored.get("strategies")
                             != current.get("strategies")):
            out.append(f"{key} {a!r} there, {b!r} here")
    return "; ".join(out)


def check_workdir(workdir: str, identity: dict, overwrite: bool) -> str | None:
    """None when ``workdir`` may hold this comparison (new, empty, or this one's files; with
    ``overwrite``, another's files are discarded first); else what is wrong, in words.
    Nothing is touched without ``overwrite``."""
    path = os.path.join(workdir, MANIFEST)
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
            differences = comparison_differences(stored, identity)
        except (OSError, ValueError, AttributeError, TypeError) as err:
            differences = f"unreadable: {type(err).__name__}: {err}"
        if not differences:
            return None
        problem = f"{path} is of another comparison ({differences})"
    else:
        ours = [n for n in os.listdir(workdir) if n in OUTPUTS or n.endswith(".json")]
        if not ours:
            return None
        problem = (f"{workdir} holds results of a comparison that does not say what it was "
                   f"({', '.join(sorted(ours)[:4])}, without {MANIFEST})")
    if not overwrite:
        return (problem + "; pass --overwrite to discard its results and runs, or choose "
                          "another --workdir")
    discard_comparison(workdir)
    return None


def discard_comparison(workdir: str) -> None:
    """Removes a comparison's files from ``workdir`` (its runs, tables, figures, the seeds'
    results and the manifest); anything else stays."""
    import shutil
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if name == UNITS and os.path.isdir(path):
            shutil.rmtree(path)
        elif name in OUTPUTS or name == MANIFEST or (name.endswith(".json")
                                                      and "-seed" in name):
            os.unlink(path)


def _names(args) -> list[str]:
    """The strategies to compare: ``--strategies``, or every registered one (Table 1's
    order first)."""
    if getattr(args, "strategies", None):
        return [n.strip() for n in args.strategies.split(",")]
    return [n for n in ORDER if n in STRATEGIES] + sorted(set(STRATEGIES) - set(ORDER))


def _label(name: str) -> str:
    """A strategy's name for file names: as given, or its class's ``name`` for an import
    path."""
    if name in STRATEGIES:
        return name
    from lightcl_jax.strategies import strategy_class
    return strategy_class(name).name


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _names(args)
    unknown = [n for n in names if not STRATEGIES.known(n)]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(sorted(STRATEGIES))}, or "
                     "import paths (package.module:Name, path/to/file.py:Name)")
    configs, seeds = strategy_configs(parser, args, names)
    variables, meta = load_start(parser, args, configs)
    first = next(iter(configs.values())).resolved()
    workdir = args.workdir or os.path.join("runs", f"compare-{first.dataset}")
    check_ckpt_every(parser, args.ckpt_every)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        parser.error(f"--workdir {workdir} is a file; it must be a directory (or not exist)")
    if args.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        parser.error("--tensorboard writes with tensorboardX, which is not installed: "
                     "pip install tensorboardX")
    use_compile_cache(parser, args)

    from lightcl_jax.data.streams import make_stream, validate_stream

    try:
        stream = make_stream(first.dataset, data_dir=first.data_dir, num_tasks=first.num_tasks,
                             eval_split=first.eval_split)
        for config in configs.values():
            validate_stream(stream, config.resolved().batch_size)
    except ValueError as err:
        parser.error(str(err))
    if meta is not None and meta["in_channels"] != stream.image_shape[-1]:
        parser.error(f"the backbone {args.init_from} takes {meta['in_channels']}-channel "
                     f"images; {first.dataset} has {stream.image_shape[-1]}")

    from lightcl_jax.training.workdir import handle_signals, lock_workdir

    fresh = not os.path.exists(workdir)
    try:
        lock = lock_workdir(workdir)  # one comparison per workdir
    except ValueError as err:
        parser.error(str(err))
    try:
        identity = comparison_identity(configs, seeds, args, meta)
        problem = check_workdir(workdir, identity, args.overwrite)
        if problem:
            parser.error(problem)
        write_json_atomic(os.path.join(workdir, MANIFEST), identity)
        with handle_signals():  # SIGTERM, SIGINT: checkpoint after the step, then stop
            return compare_in_workdir(parser, args, names, configs, (stream, variables, seeds),
                                      workdir)
    finally:
        lock.release(remove_empty_workdir=fresh)  # a comparison refused at its start


def compare_in_workdir(parser, args, names, configs, data, workdir: str) -> int:
    """Trains (or reads back) every strategy's runs in ``workdir``, whose lock this process
    holds, and writes the tables; returns the exit code."""
    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training.workdir import Preempted

    stream, variables, seeds = data
    rows, all_runs = [], {}
    for name in names:
        print(f"[{name}: seeds {args.seed}..{args.seed + seeds - 1}"
              f"{' one by one' if args.one_by_one else ' in one program'}]",
              file=sys.stderr, flush=True)
        try:
            runs, costed = train_seeds(configs[name], stream, variables, seeds, args, workdir)
        except DivergenceError as err:
            print(f"{parser.prog}: error: {name}: {err}", file=sys.stderr)
            return err.exit_code
        except Preempted as stop:
            print(f"{parser.prog}: {name}: {stop}; rerun the same command to resume",
                  file=sys.stderr)
            return stop.exit_code
        except OSError as err:  # a checkpoint or results file that could not be written
            print(f"{parser.prog}: error: {name}: writing failed ({err}); free the space (or "
                  "fix the permissions) and rerun the same command to resume", file=sys.stderr)
            return 1
        except ValueError as err:
            parser.error(f"{name}: {err}")
        # The runs' own clocks: the time they trained, over every process that ran them.
        wall = sum(r["wall_time_s"] for r in ([costed] if not args.one_by_one else runs))
        for results in runs:
            write_json_atomic(os.path.join(workdir, f"{_label(name)}-seed{results['seed']}.json"),
                              results)
        all_runs[name] = runs
        cost = one_run_cost(configs[name], stream, costed, variables is not None)
        rows.append(summarize(name, runs, cost,
                              runs[0]["config"]["strategy_args"].get("buffer_size"), wall))
    write_outputs(workdir, stream, next(iter(configs.values())).resolved(), rows, all_runs,
                  seeds, args)
    return 0


def write_outputs(workdir, stream, c: Config, rows, all_runs, seeds: int, args) -> None:
    """table.md, table.csv and the two figures, printed and written into ``workdir``."""
    how = "one after another" if args.one_by_one else "trained together"
    start = "from " + args.init_from if args.init_from else "from scratch"
    header = (f"{stream.name}: {stream.num_tasks} tasks, ResNet-18 nf={c.nf} {start}, "
              f"{c.epochs} epochs per task, batch {c.batch_size}, lr {c.lr}, seeds "
              f"{args.seed}..{args.seed + seeds - 1} ({how}), eval split {stream.eval_split}; "
              "mean ± std over seeds (forgetting: mean)")
    markdown = to_markdown(rows, header)
    _write_text(os.path.join(workdir, "table.md"), markdown)
    _write_text(os.path.join(workdir, "table.csv"), to_csv(rows))
    write_json_atomic(os.path.join(workdir, "table.json"), {"header": header, "rows": rows})
    print(markdown)
    curve = save_figure(accuracy_curve_figure(all_runs, f"{stream.name}: average accuracy "
                                                        "over the tasks seen so far"),
                        os.path.join(workdir, "accuracy_curve.png"))
    costs = save_figure(cost_accuracy_figure(rows, f"{stream.name}: accuracy against cost"),
                        os.path.join(workdir, "cost_vs_accuracy.png"))
    print(f"written: {os.path.join(workdir, 'table.md')}, {os.path.join(workdir, 'table.csv')}, "
          f"{os.path.join(workdir, 'table.json')}, {curve}, {costs}")


if __name__ == "__main__":  # experiments/__init__.py has set up the process
    sys.exit(main())
