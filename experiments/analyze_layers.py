"""Per-layer learning plasticity and memory stability over a stream.

    python -m experiments.analyze_layers          # digits, writes runs/analyze-digits-seed0/

Trains ``finetune`` (every layer, plain SGD) over the stream and, after each
task t >= 1, measures LP and MS per layer (stem, each block, head) between the
models before and after task t, on held-out samples of task t (LP) and of the
earlier tasks (MS). Writes ``layer_metrics.json`` and ``layer_metrics.png``
(layers x tasks, one panel each for LP and MS) into the workdir, and prints the
freeze point that ``--freeze auto``'s probe chooses from this run's model after
task 0 (one epoch on task 1, training samples). A LightCL run's model after
task 0 also carries the BatchNorm update of its vital-channel forward, so its
choice can differ slightly.
Exit codes: 0 done, 2 bad flag value or data, 3 training diverged.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from experiments.cli.common import Bars, Parser, write_json_atomic
from lightcl_jax.config import Config
from lightcl_jax.data.streams import DATASETS
from lightcl_jax.registry import SIMILARITIES
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run


def build_parser():
    p = Parser(prog="python -m experiments.analyze_layers", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--num-tasks", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per task (default: digits32 and digits 10, cifar 50)")
    p.add_argument("--nf", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--similarity", default=Config().similarity, choices=sorted(SIMILARITIES))
    p.add_argument("--threshold", type=float, default=Config().freeze_threshold,
                   help="LP and MS level a layer group must reach to be frozen")
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/analyze-<dataset>-seed<seed>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def plot(layer_metrics: list[dict], path: str, title: str) -> None:
    """Writes a two-panel heatmap (LP, MS) of layers x tasks to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(layer_metrics[0]["layers"])
    tasks = [entry["task"] for entry in layer_metrics]
    fig, axes = plt.subplots(1, 2, figsize=(3.2 + 1.1 * len(tasks) * 2, 0.42 * len(layers) + 1.6),
                             constrained_layout=True)
    for ax, key, label in zip(axes, ("lp", "ms"), ("learning plasticity (LP)",
                                                   "memory stability (MS)")):
        values = np.array([[entry["layers"][layer][key] for entry in layer_metrics]
                           for layer in layers], dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(tasks)), [f"task {t}" for t in tasks])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_title(label)
        for i in range(len(layers)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = Config(strategy="finetune", dataset=args.dataset, data_dir=args.data_dir,
                    num_tasks=args.num_tasks, epochs=args.epochs, nf=args.nf, seed=args.seed,
                    similarity=args.similarity, freeze_threshold=args.threshold,
                    layer_metrics=args.similarity)
    try:
        config = config.resolved()
    except ValueError as err:
        parser.error(str(err))
    workdir = args.workdir or os.path.join("runs", f"analyze-{args.dataset}-seed{args.seed}")

    import jax

    from lightcl_jax.data.streams import make_stream, validate_stream
    from lightcl_jax.metrics.generalizability import choose_freeze
    from lightcl_jax.model.resnet import ResNet18
    from lightcl_jax.training.epochs import DivergenceError
    from lightcl_jax.training.loop import probe_freeze

    try:
        stream = make_stream(config.dataset, data_dir=config.data_dir,
                             num_tasks=config.num_tasks, eval_split=config.eval_split)
        validate_stream(stream, config.batch_size)
        if stream.num_tasks < 2:
            raise ValueError("layer analysis needs at least 2 tasks")
    except ValueError as err:
        parser.error(str(err))

    after_task0 = {}

    def keep_task0(task_index, state):
        if task_index == 0:
            after_task0["state"] = jax.tree_util.tree_map(jax.numpy.copy, state)

    try:
        results = train(setup_run(config, stream), progress=Bars(not args.no_progress),
                        hooks=Hooks(on_task_end=keep_task0))
    except DivergenceError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    model = ResNet18(num_classes=stream.num_classes, nf=config.nf)
    augment = stream.augment if config.augment is None else config.augment
    auto_choice, auto_metrics = probe_freeze(model, after_task0["state"], stream, 1,
                                             dataclasses.replace(config, strategy="lightcl"),
                                             augment=augment)
    by_task = {entry["task"]: choose_freeze(entry["layers"], args.threshold)
               for entry in results["layer_metrics"]}

    os.makedirs(workdir, exist_ok=True)
    out = {"dataset": stream.name, "seed": config.seed, "similarity": args.similarity,
           "threshold": args.threshold, "config": config.to_dict(),
           "layer_metrics": results["layer_metrics"],
           "rule_by_task": by_task,
           "auto": {"task": 1, "chosen": auto_choice, "metrics": auto_metrics},
           "finetune_avg_til": results["avg_til"], "finetune_avg_cil": results["avg_cil"],
           "wall_time_s": results["wall_time_s"]}
    json_path = os.path.join(workdir, "layer_metrics.json")
    png_path = os.path.join(workdir, "layer_metrics.png")
    write_json_atomic(json_path, out)
    plot(results["layer_metrics"], png_path,
         f"finetune on {stream.name}, seed {config.seed}: {args.similarity} before vs after each task")

    layers = list(results["layer_metrics"][0]["layers"])
    print(f"LP / MS per layer ({args.similarity}) between the models before and after each task")
    print(f"{'layer':<16}" + "".join(f"{'task ' + str(e['task']):>14}"
                                      for e in results["layer_metrics"]))
    for layer in layers:
        cells = "".join(f"{e['layers'][layer]['lp']:>7.3f}/{e['layers'][layer]['ms']:<6.3f}"
                        for e in results["layer_metrics"])
        print(f"{layer:<16}{cells}")
    print("freeze point by the rule (LP and MS >= "
          f"{args.threshold}) on each task's measurement: "
          + ", ".join(f"task {t}: {c}" for t, c in by_task.items()))
    print(f"--freeze auto's probe chooses: {auto_choice} (one epoch on task 1 from this run's "
          "model after task 0)")
    print(f"written: {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
