"""Pre-train the ResNet-18 backbone on a TFDS image dataset: ``python -m experiments.pretrain``.

Defaults are the reference's (SPEC section 2): ``imagenet_resized/32x32``, 50
epochs, SGD lr 0.01, batch 256, horizontal flips, nf 64. The dataset must be
prepared in ``--data-dir`` (``tfds build imagenet_resized/32x32
--file_format=array_record`` on a machine with the data); a small dataset
such as ``--dataset cifar10`` works for trying it, and offline
``python -m benchmarks.digits_tfds DIR`` writes scikit-learn's digits as one
(``--dataset digits32 --data-dir DIR``).

Writes, under ``--workdir`` (default ``runs/pretrain-<dataset>``):
``checkpoints/`` every ``--ckpt-every`` steps and after every epoch (rerunning
the same command resumes from the newest), ``pretrain.json`` (per-epoch loss
and accuracies, normalisation, wall time) and ``backbone/``, which
``python -m experiments.run --init-from <workdir>/backbone`` starts from.
Prints each epoch's loss and accuracies, the peak resident memory and where the
backbone went.
Exit codes: 0 done, 2 bad flag value, data, checkpoint or workdir, 3 diverged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from experiments.cli import distributed
from experiments.cli.common import (Bars, Parser, add_compile_cache_flag, use_compile_cache,
                                   write_json_atomic)


def build_parser() -> argparse.ArgumentParser:
    from lightcl_jax.training.pretrain import PretrainConfig
    d = PretrainConfig()
    p = Parser(prog="python -m experiments.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=d.dataset,
                   help="TFDS image dataset with 'image' and 'label' (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir holding the prepared dataset")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--nf", type=int, default=d.nf, help="ResNet-18 width (64 = the paper)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="accuracy after each epoch on this many validation (else test) samples; "
                        "0: none")
    p.add_argument("--max-train-samples", type=int, default=None, metavar="N",
                   help="train on the first N records only (to try the script)")
    p.add_argument("--workdir", default=None,
                   help="where pretrain.json, checkpoints/ and backbone/ go (default: "
                        "runs/pretrain-<dataset>)")
    p.add_argument("--ckpt-every", type=int, default=1000, metavar="N",
                   help="checkpoint every N steps as well as after every epoch (0: epochs only)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard pretrain.json, checkpoints/ and backbone/ in --workdir first")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split each batch over the first N visible devices (default: all)")
    add_compile_cache_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    distributed.add_flags(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lightcl_jax.training.pretrain import PretrainConfig
    config = PretrainConfig(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, nf=args.nf, seed=args.seed,
                            flip=not args.no_flip, eval_samples=args.eval_samples,
                            max_train_samples=args.max_train_samples)
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    if args.ckpt_every < 0:
        parser.error(f"--ckpt-every must be >= 0 (0: after every epoch only); got {args.ckpt_every}")
    workdir = args.workdir or os.path.join("runs", "pretrain-" + args.dataset.replace("/", "-"))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        parser.error(f"--workdir {workdir} is a file; it must be a directory (or not exist)")
    problem = distributed.check_flags(args)
    if problem:
        parser.error(problem)
    use_compile_cache(parser, args)

    try:
        distributed.start(args)  # several processes: before anything touches a device
        data, finished, lock = _prepare_workdir(config, args, workdir)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    from lightcl_jax.training.workdir import handle_signals
    with lock, handle_signals():  # SIGTERM, SIGINT: checkpoint after the step, then stop
        return _pretrain_in_workdir(parser, args, config, data, finished, workdir)


def _pretrain_in_workdir(parser, args, config, data, finished: bool, workdir: str) -> int:
    """Pre-trains (or reports the finished run) in ``workdir``, whose lock this process
    holds; returns the exit code."""
    from lightcl_jax.model.backbone import BackboneError, save_backbone
    from lightcl_jax.training.checkpoint import RunCheckpoints
    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training.workdir import Preempted
    from lightcl_jax.training.pretrain import pretrain
    from lightcl_jax.training.progress import Progress

    results_path = os.path.join(workdir, "pretrain.json")
    backbone_dir = os.path.join(workdir, "backbone")
    writer = distributed.is_writer()  # process 0 of several writes and shows progress
    if finished and not writer:
        return 0
    if finished:
        print(f"{results_path} already holds this run; its backbone is {backbone_dir} "
              "(pass --overwrite to run it again)")
        return 0
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"), every=args.ckpt_every)
    try:
        variables, history = pretrain(config, data, checkpoints=checkpoints,
                                      progress=Bars(not args.no_progress) if writer
                                      else Progress(),  # the others: silent
                                      devices=args.devices)
    except DivergenceError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Preempted as stop:
        checkpoints.close()  # the checkpoint is complete on disk before the line says so
        print(f"{parser.prog}: {stop.describe(task=False)}; checkpoint "
              f"{checkpoints.path(*checkpoints.latest())}; rerun the same command to resume",
              file=sys.stderr)
        return stop.exit_code
    except ValueError as err:  # CheckpointError: unreadable, or another run's
        parser.error(str(err))
    except Exception as err:
        if distributed.lost_process(err):  # another process died: stop now, one line
            distributed.exit_lost_process(parser.prog, err, checkpoints.directory)
        raise
    finally:
        checkpoints.close()
    if not writer:
        return 0
    try:
        meta = save_backbone(backbone_dir, variables, {
            "nf": config.nf, "num_classes": data.num_classes, "in_channels": data.image_shape[-1],
            "image_shape": list(data.image_shape),
            "source": {"kind": "pretrain", "dataset": config.dataset, "epochs": config.epochs,
                       "final_eval_accuracy": history["epochs"][-1]["eval_accuracy"]},
            "normalisation": history["normalisation"],
        }, overwrite=True)
    except BackboneError as err:  # the checkpoints keep the trained state: rerun to retry
        parser.error(f"{err}; the trained state is in {checkpoints.directory}, rerun to save it")
    history["backbone"] = {"path": os.path.abspath(backbone_dir), "digest": meta["digest"]}
    write_json_atomic(results_path, history)
    for entry in history["epochs"]:
        accuracy = ("" if entry["eval_accuracy"] is None
                    else f", eval accuracy {entry['eval_accuracy']:.2f}%")
        print(f"epoch {entry['epoch']:>3}: loss {entry['loss']:.4f}, train accuracy "
              f"{entry['train_accuracy']:.2f}%{accuracy}")
    print(f"peak resident memory {history['peak_rss_mb']:.0f} MB")
    print(f"backbone written to {backbone_dir}; start a run from it: "
          f"python -m experiments.run --init-from {backbone_dir} --dataset cifar10")
    return 0


def _prepare_workdir(config, args, workdir: str):
    """(the data, whether ``workdir`` already holds this finished run, the workdir's
    `WorkdirLock`, which the caller releases). Discards the workdir's results,
    checkpoints and backbone first with ``--overwrite``.

    Raises:
      ValueError: bad data or devices, a workdir holding another run or a stray backbone,
        or one a live process trains in (`WorkdirInUse`).
    """
    from lightcl_jax.model.backbone import META_FILE
    from lightcl_jax.training.placement import data_parallel
    from lightcl_jax.training.pretrain import load_tfds_data
    from lightcl_jax.training.workdir import lock_workdir

    results_path = os.path.join(workdir, "pretrain.json")
    backbone_dir = os.path.join(workdir, "backbone")
    parallel = data_parallel(args.devices, {"--batch-size": config.batch_size})
    data = load_tfds_data(config)
    data.check_batch_size(config.batch_size)  # before --overwrite discards anything
    if os.path.exists(backbone_dir) and not os.path.isfile(os.path.join(backbone_dir, META_FILE)):
        raise ValueError(f"{backbone_dir} exists and is not a backbone directory (no "
                         f"{META_FILE}); move it away, or choose another --workdir")
    if (os.path.exists(backbone_dir) and not args.overwrite and not os.path.exists(results_path)
            and not os.path.isdir(os.path.join(workdir, "checkpoints"))):
        raise ValueError(f"{backbone_dir} holds a backbone that no run in this workdir "
                         "wrote; pass --overwrite to replace it, or choose another --workdir")
    lock = lock_workdir(workdir, distributed.process_index())  # one per process of the run
    try:
        return data, _finished(config, args, workdir, data, parallel.num_devices), lock
    except BaseException:
        lock.release()
        raise


def _finished(config, args, workdir: str, data, num_devices: int) -> bool:
    """Whether ``workdir`` holds this finished run; with ``--overwrite``, discards its
    results, checkpoints and backbone first (then False)."""
    from lightcl_jax.training.checkpoint import identity_differences
    from lightcl_jax.training.pretrain import pretrain_identity

    results_path = os.path.join(workdir, "pretrain.json")
    if args.overwrite:
        paths = (results_path, os.path.join(workdir, "checkpoints"),
                 os.path.join(workdir, "backbone"))
        for path in paths if distributed.is_writer() else ():  # process 0 discards
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
        distributed.barrier("overwrite")  # the others wait until it has
        return False
    if not os.path.exists(results_path):
        return False
    with open(results_path) as f:
        finished = json.load(f)
    identity = pretrain_identity(config, data, num_devices)
    differences = identity_differences(finished.get("identity", {}), identity)
    if differences:
        raise ValueError(f"{results_path} holds another pre-training run ({differences}); "
                         "pass --overwrite to replace it, or choose another --workdir")
    return True


if __name__ == "__main__":  # experiments/__init__.py has set up the process
    sys.exit(main())
