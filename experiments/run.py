"""Run one continual-learning experiment: ``python -m experiments.run [flags]``.

With no flags: LightCL on the embedded digits at 32x32 (5 tasks x 2 classes),
results in ``runs/digits32-lightcl-seed0/results.json``. ``--help`` lists every flag.
Prints the TIL and CIL accuracy matrices and every summary metric, and writes
``results.json``, ``metrics.jsonl`` (a line per epoch and task) and ``accuracy.png``
(the matrices drawn) into the workdir.
Checkpoints go to ``<workdir>/checkpoints`` after every task and every
``--ckpt-every`` steps; rerunning the same command resumes from the newest.
Exit codes: 0 done, 2 bad flag value, data, checkpoint or workdir, 3 training diverged
(the workdir keeps its last good checkpoint, or is left empty when there was none), 1 a
file could not be written, 130/143 stopped by SIGINT/SIGTERM (rerun to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

from experiments.cli import distributed
from experiments.cli.common import (STRATEGY_ARG_HELP, Bars, Parser, add_compile_cache_flag,
                                    check_ckpt_every, metrics_help, parse_bool, parse_metrics,
                                    strategies_help, strategy_arguments, use_compile_cache)
from lightcl_jax.config import (DEFAULT_METRICS, FROZEN_BN_MODES, LAST_BATCH_MODES,
                                SPARSE_EXECUTIONS, XLA_SCHEDULERS, Config)
from lightcl_jax.data.streams import DATASETS, EVAL_SPLITS
from lightcl_jax.model.layers import FREEZE_POINTS
from lightcl_jax.registry import SIMILARITIES, STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = Parser(prog="python -m experiments.run", description=__doc__.splitlines()[0],
               more_help=_more_help)
    p.add_argument("--config", default=None, metavar="NAME",
                   help="a paper configuration (split_cifar10, split_tinyimagenet; see "
                        "experiments/configs/) or a .py file defining FLAGS: its values become "
                        "the defaults, and flags given here override them (default: none)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset, choices=DATASETS,
                      help="the task stream (digits32, digits: offline; the others from TFDS)")
    data.add_argument("--data-dir", default=None,
                      help="TFDS data_dir holding the prepared dataset; tinyimagenet: the "
                           "tiny-imagenet-200 folder (default: TFDS's)")
    data.add_argument("--num-tasks", type=int, default=None,
                      help="tasks to split the classes into (default: 5; cifar100, "
                           "tinyimagenet: 10)")
    data.add_argument("--eval-split", default=d.eval_split, choices=EVAL_SPLITS,
                      help="holdout: the reference's 10%% of train; test: the official test split")
    data.add_argument("--augment", type=parse_bool, default=None,
                      help="random crop + flip: on/off (default: off for digits, else on)")
    model = p.add_argument_group("model")
    model.add_argument("--nf", type=int, default=None,
                       help="ResNet width (default: digits32 and digits 16, else 64; with "
                            "--init-from, the backbone's)")
    model.add_argument("--init-from", default=None, metavar="BACKBONE",
                       help="start from a pre-trained backbone directory (written by "
                            "experiments.pretrain or experiments.convert_torch) with a fresh "
                            "head (default: none, train from scratch)")
    model.add_argument("--frozen-bn", default=d.frozen_bn, choices=FROZEN_BN_MODES,
                       help="frozen layers' BatchNorm statistics: update (reference) or fixed")
    model.add_argument("--sparse", action="store_true",
                       help="the reference's channel pruning (sparsity 0.2/0.7/0.8 by stage)")
    model.add_argument("--sparse-execution", default=d.sparse_execution,
                       choices=SPARSE_EXECUTIONS,
                       help="with --sparse: masked (dense layers, pruned weights held at zero, "
                            "as the reference) or compact (narrower layers of the kept channels)")
    schedule = p.add_argument_group("optimizer and schedule")
    schedule.add_argument("--epochs", type=int, default=None,
                          help="epochs per task (default: digits32 and digits 10, cifar 50, "
                               "tinyimagenet 100)")
    schedule.add_argument("--batch-size", type=int, default=d.batch_size,
                          help="training batch size")
    schedule.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    schedule.add_argument("--last-batch", default=d.last_batch, choices=LAST_BATCH_MODES,
                          help="an epoch's samples after its last full batch: drop them, or "
                               "keep them as a smaller last batch as the reference does (one "
                               "device only)")
    schedule.add_argument("--seed", type=int, default=d.seed,
                          help="seed of initialisation, data order and augmentation")
    schedule.add_argument("--seeds", type=int, default=1, metavar="N",
                          help="train seeds --seed .. --seed+N-1 together in one compiled program "
                               "(vmapped); results.json then holds per-seed results and mean/std")
    _add_strategy_and_metric_flags(p, d)
    _add_run_flags(p, d)
    return p


def _add_strategy_and_metric_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """The strategy's flags (its name, its hyperparameters, what it freezes) and the
    evaluation's (metrics, layer metrics)."""
    strategy = p.add_argument_group("strategy")
    strategy.add_argument("--strategy", default=d.strategy, metavar="NAME",
                          help="a built-in strategy (" + ", ".join(STRATEGIES) + ") or the "
                               "import path of your own class: package.module:Name or "
                               "path/to/file.py:Name")
    strategy.add_argument("--strategy-arg", action="append", default=[], metavar="NAME=VALUE",
                          help=STRATEGY_ARG_HELP + " (default: the strategy's defaults)")
    strategy.add_argument("--freeze", default=d.freeze, choices=list(FREEZE_POINTS) + ["auto"],
                          help="deepest frozen layer group of strategies that freeze (stage3 = "
                               "the reference), or auto: chosen from measured LP/MS by a "
                               "one-epoch probe (see README)")
    strategy.add_argument("--freeze-threshold", type=float, default=d.freeze_threshold,
                          help="with --freeze auto: LP and MS level a frozen group must reach")
    strategy.add_argument("--similarity", default=d.similarity, metavar="SIMILARITY",
                          help="with --freeze auto: the similarity LP and MS are measured with ("
                               + ", ".join(SIMILARITIES) + ", or an import path)")
    evaluation = p.add_argument_group("evaluation and metrics")
    evaluation.add_argument("--metrics", default=",".join(d.metrics), metavar="NAMES",
                            help="the run summaries and evaluation metrics to report, comma-"
                                 "separated names or import paths (avg always among them); "
                                 "+NAME,... adds to the built-ins (all listed at the end)")
    evaluation.add_argument("--layer-metrics", nargs="?", const=d.similarity, default=None,
                            metavar="SIMILARITY",
                            help="record LP and MS per layer after every task in results.json "
                                 f"(default: off; given alone, {d.similarity})")
    evaluation.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                            help="largest evaluation batch")


def _more_help(args) -> str:
    """What ``--help`` prints after the flags: the strategies' hyperparameters (those of
    ``--strategy`` alone when one was given before ``--help``) and the metrics."""
    chosen = getattr(args, "strategy", None)
    names = [chosen] if chosen not in (None, Config().strategy) else list(STRATEGIES)
    return strategies_help(names) + "\n\n" + metrics_help()


def _add_run_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """Flags of where and how the run goes, not what it computes."""
    execution = p.add_argument_group("execution")
    execution.add_argument("--workdir", default=None,
                           help="where results.json and checkpoints/ go (default: "
                                "runs/<dataset>-<strategy>-seed<seed>); rerunning the same "
                                "command with the same workdir resumes from the newest checkpoint")
    execution.add_argument("--ckpt-every", type=int, default=500, metavar="N",
                           help="also checkpoint every N train steps within a task (0: only "
                                "after each task)")
    execution.add_argument("--overwrite", action="store_true",
                           help="discard results.json and checkpoints/ in --workdir before "
                                "running (without it, those of another run are refused)")
    execution.add_argument("--devices", type=int, default=None, metavar="N",
                           help="split each batch over the first N visible devices (data "
                                "parallel; default: all of them)")
    add_compile_cache_flag(execution)
    execution.add_argument("--xla-scheduler", default=d.xla_scheduler, choices=XLA_SCHEDULERS,
                           help="XLA:CPU scheduler of train steps (auto: the library's "
                                "choice, memory-optimized for every step)")
    execution.add_argument("--no-progress", action="store_true", help="no progress bars")
    execution.add_argument("--tensorboard", action="store_true",
                           help="also log each epoch and task as TensorBoard scalars in "
                                "<workdir>/tensorboard (tensorboard --logdir runs/)")
    distributed.add_flags(p.add_argument_group("several processes"))


def format_table(results: dict) -> str:
    """The accuracy matrices, the evaluation metrics' matrices and every summary as plain
    text (per seed and mean +/- std for several seeds)."""
    if "seeds" in results:
        return _format_seeds(results)
    from lightcl_jax.training.run import metric_names
    n = results["num_tasks"]
    names = metric_names(results)
    lines = [f"{results['strategy']} on {results['dataset']} ({n} tasks, seed {results['seed']}, "
             f"eval split {results['eval_split']})", ""]
    matrices = [(f"{label} accuracy (%)", results[key], "8.2f")
                for key, label in (("acc_til", "TIL"), ("acc_cil", "CIL"))]
    matrices += [(f"evaluation {name}", results[f"eval_{name}"], "8.4f")
                 for name in names["evaluation"]]
    for title, matrix, form in matrices:
        lines.append(f"{title}, row = after task i, column = task j")
        lines.append("        " + "".join(f"{'T' + str(j + 1):>8}" for j in range(n))
                     + f"{'avg':>8}")
        for i, row in enumerate(matrix):  # tasks count from 1 here, from 0 in results.json
            cells = "".join(f"{v:{form}}" for v in row) + " " * 8 * (n - len(row))
            lines.append(f"after {i + 1:<2}{cells}{sum(row) / len(row):{form}}")
        lines.append("")
    widths = [max(8, len(name) + 2) for name in names["summaries"]]
    lines.append(f"{'':6}" + "".join(f"{name:>{w}}" for name, w in zip(names["summaries"], widths)))
    for mode in ("til", "cil"):
        lines.append(f"{mode.upper():6}" + "".join(
            f"{results[f'{name}_{mode}']:{w}.2f}" for name, w in zip(names["summaries"], widths)))
    if results.get("freeze_auto"):
        auto = results["freeze_auto"]
        lines.append(f"--freeze auto chose {auto['chosen']} at task {auto['task'] + 1} "
                     f"({auto['similarity']} LP and MS >= {auto['threshold']})")
    if results.get("sparsity"):
        lines.append(f"sparse: {100 * results['sparsity']['sparsity']:.1f}% of the parameters "
                     f"are zero ({results['sparsity']['nonzero_mb']:.2f} MB of nonzero weights)")
    lines.append(_time_and_memory(results))
    return "\n".join(lines)


def _time_and_memory(results: dict) -> str:
    peak = results.get("resources", {}).get("peak_rss_mb")
    memory = "" if peak is None else f", peak resident memory {peak:.0f} MB"
    return f"wall time {results['wall_time_s']:.1f} s{memory}"


def _format_seeds(results: dict) -> str:
    """A row per summary and evaluation metric: each seed's value and the mean +/- std."""
    from lightcl_jax.training.run import scalar_metric_keys
    runs = results["seeds"]
    lines = [f"{results['strategy']} on {results['dataset']} ({results['num_tasks']} tasks, "
             f"seeds {runs[0]['seed']}..{runs[-1]['seed']} trained together, eval split "
             f"{results['eval_split']})", "",
             f"{'':22}" + "".join(f"{'seed ' + str(run['seed']):>10}" for run in runs)
             + f"{'mean +/- std':>18}"]
    for key in scalar_metric_keys(results):
        form = ".4f" if key.startswith("avg_eval_") else ".2f"
        lines.append(f"{key:22}" + "".join(f"{run[key]:10{form}}" for run in runs)
                     + f"{results[key + '_mean']:10{form}} +/- {results[key + '_std']:{form}}")
    chosen = {run["freeze_auto"]["chosen"] for run in runs if run.get("freeze_auto")}
    if chosen:
        lines.append(f"--freeze auto chose {', '.join(sorted(chosen))}")
    lines.append(_time_and_memory(results))
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` that parsed flags describe: one flag per run setting, the strategy's
    hyperparameters from ``--strategy-arg`` and the config file's ``strategy_args``.

    The run settings are checked first (no JAX loads for a bad one); then the strategy's
    class is loaded to read and check its arguments.

    Raises:
      ValueError: a bad setting, strategy, strategy argument or metric list.
    """
    own = {"strategy_args", "metrics"}
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                       if f.name not in own},
                    metrics=parse_metrics(args.metrics, DEFAULT_METRICS))
    config.validate()
    from lightcl_jax.strategies import strategy_class
    cls = strategy_class(config.strategy)
    strategy_args = strategy_arguments({config.strategy: cls}, args.strategy_arg,
                                       getattr(args, "config_strategy_args", None),
                                       args.config)[config.strategy]
    return dataclasses.replace(config, strategy_args=strategy_args)


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None
               ) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, flags): with ``--config``, its FLAGS are the defaults the flags given override.

    ``parser``: `build_parser`'s, possibly with flags of another script added. ``args.note``:
    a line for stderr once the flags are known to be good (a paper config without its
    backbone), or None.
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    note = config_args = None
    if args.config is not None:
        from experiments.configs import load_config
        try:
            module = load_config(args.config)
        except ValueError as err:
            parser.error(str(err))
        flags = dict(module.FLAGS)
        config_args = flags.pop("strategy_args", None)
        known = {action.dest for action in parser._actions} - {"help", "config"}
        unknown = sorted(set(flags) - known)
        if unknown:
            parser.error(f"config {args.config} sets unknown flags {unknown}; flags are "
                         f"experiments.run's, by argparse name: {', '.join(sorted(known))}, "
                         "and strategy_args (strategy -> its hyperparameters)")
        parser.set_defaults(**flags)
        args = parser.parse_args(argv)
        if getattr(module, "PRETRAINED", False) and args.init_from is None:
            note = (f"note: config {args.config} follows the paper, which starts from a "
                    "pre-trained backbone; without --init-from this run trains from scratch")
    args.note, args.config_strategy_args = note, config_args
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1 (how many seeds from --seed on to train "
                     f"together); got {args.seeds}")
    check_ckpt_every(parser, args.ckpt_every)
    if args.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        parser.error("--tensorboard writes with tensorboardX, which is not installed: "
                     "pip install tensorboardX")
    seeds = (f"seed{args.seed}" if args.seeds == 1
             else f"seeds{args.seed}-{args.seed + args.seeds - 1}")
    workdir = args.workdir or os.path.join("runs", f"{args.dataset}-{_strategy_label(config)}-"
                                                   f"{seeds}")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        parser.error(f"--workdir {workdir} is a file; it must be a directory (or not exist)")
    problem = distributed.check_flags(args)
    if problem:
        parser.error(problem)
    use_compile_cache(parser, args)

    # JAX loads only now that the flags are known to be good: a bad flag fails fast.
    from lightcl_jax.training.workdir import handle_signals
    from lightcl_jax.training.workdir import lock_workdir

    fresh = not os.path.exists(workdir)
    try:
        distributed.start(args)  # several processes: before anything touches a device
        run = prepare_run(config, args)
        # One run per workdir (`WorkdirInUse` otherwise); a lock per process of the run.
        lock = lock_workdir(workdir, distributed.process_index())
    except ValueError as err:  # bad settings or data, or a live run in the workdir
        parser.error(str(err))
    if args.note and distributed.is_writer():  # after every refusal: one line for those
        print(args.note, file=sys.stderr)
    try:
        with handle_signals():  # SIGTERM, SIGINT: checkpoint after the step, then stop
            return train_in_workdir(parser, args, run, workdir)
    finally:
        lock.release(remove_empty_workdir=fresh)  # a run refused at its start leaves none


def _strategy_label(config: Config) -> str:
    """The strategy's name for a default workdir: its registry name, or its class's
    ``name`` for one given by import path."""
    from lightcl_jax.strategies import strategy_class
    return config.strategy if config.strategy in STRATEGIES else strategy_class(config.strategy).name


def train_in_workdir(parser, args, run, workdir: str) -> int:
    """Trains ``run`` (or prints its finished results) in ``workdir``, whose lock this
    process holds (`lightcl_jax.training.loop.train_in_workdir` writes there); returns
    the exit code."""
    from lightcl_jax.training.checkpoint import RunCheckpoints
    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training import loop
    from lightcl_jax.training.progress import Fanout, Progress, TensorBoardLog
    from lightcl_jax.training.workdir import (CHECKPOINTS, RESULTS, Preempted,
                                              ResultsWriteError, discard_run, finished_results)

    path = os.path.join(workdir, RESULTS)
    checkpoints = RunCheckpoints(os.path.join(workdir, CHECKPOINTS))  # for the messages
    writer = distributed.is_writer()  # process 0 of several writes and shows progress
    try:
        if args.overwrite:
            if writer:
                discard_run(workdir)
            distributed.barrier("overwrite")  # no process looks for checkpoints before
        else:
            finished = finished_results(workdir, run.identity)
            if finished is not None:
                if writer:
                    print(format_table(finished))
                    print(f"{path} already holds this run's results; pass --overwrite to "
                          "run it again")
                return 0
        sinks = [Bars(not args.no_progress) if writer else Progress()]  # others: silent
        if args.tensorboard and writer:
            sinks.append(TensorBoardLog(os.path.join(workdir, "tensorboard"), lr=run.config.lr))
        results = loop.train_in_workdir(run, workdir, progress=Fanout(*sinks),
                                        checkpoint_every=args.ckpt_every)
    except DivergenceError as err:
        print(f"{parser.prog}: error: {err}{_after_divergence(workdir, checkpoints)}",
              file=sys.stderr)
        return err.exit_code
    except ResultsWriteError as err:  # nothing half-written is left
        print(f"{parser.prog}: error: {err.strerror}; {_kept(checkpoints)}, which holds the "
              "finished run: rerun the same command to write it", file=sys.stderr)
        return 1
    except OSError as err:  # a checkpoint that could not be written (disk full, permissions)
        print(f"{parser.prog}: error: writing a checkpoint failed ({err}); "
              f"{_kept(checkpoints)}; {_space_needed(workdir, checkpoints)} and rerun the "
              "same command to resume", file=sys.stderr)
        return 1
    except Preempted as stop:  # the checkpoint is complete on disk before the line says so
        print(f"{parser.prog}: {stop}; checkpoint {checkpoints.path(*checkpoints.latest())}; "
              "rerun the same command to resume", file=sys.stderr)
        return stop.exit_code
    except ValueError as err:  # a results file or checkpoint of another run, unreadable ones,
        parser.error(str(err))  # or seeds whose --freeze auto disagrees
    except Exception as err:
        if distributed.lost_process(err):  # another process died: stop now, one line
            distributed.exit_lost_process(parser.prog, err, checkpoints.directory)
        raise
    finally:
        checkpoints.close()
    if writer:
        print(format_table(results))
        print(f"results written to {path}, the accuracy matrices drawn in "
              f"{os.path.join(workdir, 'accuracy.png')} (checkpoints in {checkpoints.directory})")
    return 0


def _after_divergence(workdir: str, checkpoints) -> str:
    """What a diverged run leaves, for its error line. With checkpoints, the workdir stays
    resumable from the last good one (the same command diverges there again: training is
    deterministic); without any, the run's logs go too, and the workdir with them when
    nothing else is in it, so no half-made run is left behind."""
    latest = checkpoints.latest()
    if latest:
        return (f"; the last good checkpoint is {checkpoints.path(*latest)} (the same command "
                "resumes from it and diverges there again: lower --lr with --overwrite or "
                "another --workdir)")
    from lightcl_jax.training.workdir import METRICS_LOG
    import shutil
    for name in (METRICS_LOG, "tensorboard"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    return "; no checkpoint was written before it, so the run left nothing: lower --lr"


def _space_needed(workdir: str, checkpoints) -> str:
    """How much space to free, for the error line of a checkpoint that could not be written:
    the size of the last complete checkpoint (the next is about as large) against what the
    disk has free."""
    import shutil
    latest = checkpoints.latest()
    if latest is None:
        return "free some space (or fix the permissions)"
    size = sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(checkpoints.path(*latest)) for name in files)
    free = shutil.disk_usage(workdir).free
    return (f"free at least {size / 2**20:.2f} MB on its disk (a checkpoint takes about that; "
            f"{free / 2**20:.2f} MB are free; or fix the permissions)")


def _kept(checkpoints) -> str:
    """Where the run can resume from, for an error message."""
    latest = checkpoints.latest()
    return (f"the last complete checkpoint is {checkpoints.path(*latest)}" if latest
            else "no checkpoint was written yet")


def prepare_run(config: Config, args: argparse.Namespace):
    """The `lightcl_jax.training.run.Run` of the flags (with ``--init-from``, its backbone
    and where it came from).

    Raises:
      ValueError: a bad backbone, data, device count, or a backbone that does not fit.
    """
    from lightcl_jax.model.backbone import load_backbone
    from lightcl_jax.training.run import setup_run

    init_variables = backbone = None
    if args.init_from is not None:
        init_variables, backbone = load_backbone(args.init_from)
        if args.nf is None:
            config = dataclasses.replace(config, nf=backbone["nf"])
        elif args.nf != backbone["nf"]:
            raise ValueError(f"--nf {args.nf} differs from the backbone's nf={backbone['nf']} "
                             f"({args.init_from}); leave --nf out to use it")
    run = setup_run(config, init_variables=init_variables, devices=args.devices,
                    seeds=args.seeds)
    if backbone is not None and backbone["in_channels"] != run.stream.image_shape[-1]:
        raise ValueError(f"the backbone {args.init_from} takes {backbone['in_channels']}-"
                         f"channel images; {config.dataset} has {run.stream.image_shape[-1]}")
    if backbone is not None:
        run = dataclasses.replace(run, init_from={
            "path": os.path.abspath(args.init_from), "source": backbone.get("source"),
            "digest": backbone["digest"]})
    return run


if __name__ == "__main__":  # experiments/__init__.py has set up the process
    sys.exit(main())
