"""Export a run's training for a device: ``python -m experiments.export --workdir RUN --out DIR``.

Reads the run's checkpoint at the end of a task (the newest, or ``--after-task``)
and writes into DIR its train step, task-boundary and evaluation functions
(`jax.export`, for the CPU and, where JAX lowers for it here, CUDA), the state
they carry (state.npz), each seen task's evaluation split and ``runner.py``,
which trains the next tasks with JAX and NumPy alone:

    python DIR/runner.py --task TASK.npz

``--write-next-task FILE`` also writes the run's own next task in the runner's
format. The run's settings come from its checkpoint; a run that started from a
pre-trained backbone needs it again (``--init-from``). Exit codes: 0 done, 2 a bad
flag, workdir or checkpoint (DIR is left as it was), 1 a file could not be written.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.cli.common import Parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the run's workdir (experiments.run's)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--after-task", type=int, default=None, metavar="N",
                   help="export the state after task N (counted from 1; default: the newest "
                        "finished task)")
    p.add_argument("--init-from", default=None, metavar="BACKBONE",
                   help="the pre-trained backbone the run started from, if it did")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data_dir of the run's dataset (default: the run's)")
    p.add_argument("--write-next-task", default=None, metavar="FILE",
                   help="also write the run's next task as the runner's .npz (x_train, "
                        "y_train, x_eval, y_eval)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def run_settings(workdir: str):
    """(Config, identity) of the run in ``workdir``, from its newest checkpoint at a task's
    end. Raises ValueError naming what is missing."""
    from lightcl_jax.config import Config
    from lightcl_jax.deploy.export import task_checkpoints
    checkpoints, found = task_checkpoints(workdir)
    try:
        if not found:
            raise ValueError(f"--workdir {workdir} holds no checkpoint at a task's end (a run "
                             "writes one after each task it finishes); train at least one task")
        meta = checkpoints.read_meta("tasks", found[max(found)])
    finally:
        checkpoints.close()
    identity = meta["identity"]
    return Config(**identity["config"]), identity


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        parser.error(f"--workdir {args.workdir} is not a directory (a run's workdir, written "
                     "by python -m experiments.run)")
    if args.after_task is not None and args.after_task < 1:
        parser.error(f"--after-task counts tasks from 1; got {args.after_task}")
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} exists; choose another, or pass --overwrite")

    import dataclasses
    from lightcl_jax.deploy.export import ExportError, export_run, task_arrays
    from lightcl_jax.model.backbone import load_backbone
    from lightcl_jax.training.run import setup_run
    try:
        config, identity = run_settings(args.workdir)
        if identity.get("seeds", 1) != 1 or identity.get("devices", 1) != 1:
            raise ExportError(f"--workdir {args.workdir} holds a run of "
                              f"{identity.get('seeds', 1)} seeds on {identity.get('devices', 1)} "
                              "devices; export takes a run of one seed on one device")
        if args.data_dir is not None:
            config = dataclasses.replace(config, data_dir=args.data_dir)
        init_variables = None
        if identity.get("pretrained"):
            if args.init_from is None:
                raise ExportError(f"the run in {args.workdir} started from a pre-trained "
                                  "backbone: give it again with --init-from")
            init_variables, _ = load_backbone(args.init_from)
        elif args.init_from is not None:
            raise ExportError(f"the run in {args.workdir} did not start from a backbone; leave "
                              "--init-from out")
        run = setup_run(config, init_variables=init_variables, devices=1)
        after = None if args.after_task is None else args.after_task - 1
        manifest = export_run(run, args.workdir, args.out, after_task=after,
                              overwrite=args.overwrite)
    except ValueError as err:  # ExportError, CheckpointError, bad data or backbone
        parser.error(str(err))
    except OSError as err:  # the folder could not be written (nothing is left half-written)
        print(f"python -m experiments.export: error: {args.out} could not be written: {err}",
              file=sys.stderr)
        return 1
    next_task = manifest["run"]["exported_after_task"] + 1
    if args.write_next_task:
        import numpy as np
        if next_task >= run.stream.num_tasks:
            parser.error(f"--write-next-task: the run has {run.stream.num_tasks} tasks and the "
                         f"export is after the last; there is no next task of its own")
        with open(args.write_next_task, "wb") as f:
            np.savez(f, **task_arrays(run.stream, next_task))
    sizes = {name: entry["bytes"] for name, entry in manifest["functions"].items()}
    total = sum(os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(args.out) for f in files)
    step = manifest["functions"]["train_step"]
    print(f"exported {manifest['run']['strategy']} after task {next_task} of "
          f"{run.stream.num_tasks} to {args.out}: {total / 2**20:.2f} MiB "
          f"(functions {sum(sizes.values()) / 2**20:.2f} MiB, for "
          f"{', '.join(step['platforms'])}); train step {step['xla']['step_bytes'] / 2**20:.1f} MB, "
          f"{step['xla']['flops'] / 1e9:.3f} GFLOP")
    print(f"next: python {os.path.join(args.out, 'runner.py')} --task TASK.npz"
          + (f"   (the run's task {next_task + 1}: {args.write_next_task})"
             if args.write_next_task else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
