"""lightcl_jax against the authors' own LightCL script: same stream, same machine, one after the other.

    python -m benchmarks.vs_reference --ref CHECKOUT [--seeds 3] [--epochs 50] [--json PATH]

CHECKOUT is the authors' public repository (github.com/INV-WZQ/LightCL), cloned
by the user outside this one; its LightCL.py runs unmodified. The stream
(default ``digits32``: scikit-learn's digits at 32x32x3, see
`lightcl_jax.data.streams`) is exported to ``stream.npz`` in the workdir;
for every seed the authors' script (``benchmarks/side_by_side/run_reference.py``:
LightCL without pre-training, its own defaults otherwise) and then lightcl_jax
(``benchmarks/side_by_side/run_ours.py``: LightCL without pre-training, nf 64,
batch 32, lr 0.01, beta 2e-4, buffer 15, ratio 0.15, stem + stages 1-3 frozen
from task 1, no augmentation, no checkpoints) each run in their own process
on that file. Both keep an epoch's smaller last batch, as the script's
DataLoader does (``--last-batch drop``: both drop it, the script's loaders
served with ``drop_last=True``, a diagnostic). Prints, per seed and as mean +/- std (population), the final
average TIL and CIL of both, the wall time of each process and its peak
resident memory (``wait4``'s ``ru_maxrss``), and the wall-time ratio ours /
the reference's summed over seeds. The script hard-codes 50 epochs per task;
``--epochs`` other than 50 runs a temporary copy of it with that one
assignment changed, and the output says so. Needs PyTorch (the optional
``bench`` extra). Exit codes: 0 done, 2 bad flag or checkout, 1 a run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from experiments.cli.common import Parser, write_json_atomic
from lightcl_jax.process import huge_pages_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "benchmarks", "side_by_side", "run_reference.py")
SCRIPT_EPOCHS = 50
# What the authors' script hard-codes for Split CIFAR-10 (it builds a 3-channel ResNet-18
# with nf 64 and slices logits in pairs).
REFERENCE_SHAPE = {"num_tasks": 5, "num_classes": 10, "channels": 3}
# Our side of the comparison: the reference's settings (SPEC section 2), no pre-training.
OUR_SETTINGS = dict(strategy="lightcl", strategy_args=dict(beta=2e-4, buffer_size=15, ratio=0.15),
                    nf=64, batch_size=32, lr=0.01, freeze="stage3", frozen_bn="update",
                    augment=False)
LAST_BATCH = {"keep": "both keep an epoch's smaller last batch (the script's DataLoader does)",
              "drop": "both drop it (a diagnostic: the script's loaders are served with "
                      "drop_last=True)"}


def export_stream(stream, path: str) -> None:
    """Writes every task's training and evaluation arrays (NHWC float32, int labels) to ``path``."""
    arrays = {"name": np.array(stream.name), "num_classes": np.array(stream.num_classes),
              "num_tasks": np.array(stream.num_tasks), "eval_split": np.array(stream.eval_split),
              "augment": np.array(stream.augment), "pad_value": np.array(stream.pad_value)}
    for task in stream.tasks:
        for key in ("x_train", "y_train", "x_eval", "y_eval"):
            values = getattr(task, key)
            arrays[f"task{task.index}_{key}"] = np.asarray(values[np.arange(len(values))])
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_stream(path: str):
    """The `TaskStream` `export_stream` wrote to ``path``."""
    from lightcl_jax.data.streams import split_into_tasks

    data = np.load(path)
    tasks = range(int(data["num_tasks"]))
    joined = {key: np.concatenate([data[f"task{t}_{key}"] for t in tasks])
              for key in ("x_train", "y_train", "x_eval", "y_eval")}
    return split_into_tasks(str(data["name"]), joined["x_train"], joined["y_train"],
                            joined["x_eval"], joined["y_eval"], int(data["num_classes"]),
                            len(tasks), eval_split=str(data["eval_split"]),
                            augment=bool(data["augment"]),
                            pad_value=tuple(float(v) for v in data["pad_value"]))


def run_child(command: list[str], log: str, env: dict | None = None) -> tuple[float, float]:
    """Runs ``command`` to completion: (wall seconds, peak resident MB of the process).

    Raises:
      RuntimeError: the process failed (names its log).
    """
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {proc.returncode} "
                           f"(log: {log}):\n{tail}")
    return wall, usage.ru_maxrss / 1024.0  # Linux reports kilobytes


def compare(checkout: str, stream, config, seeds: list[int], epochs: int, workdir: str,
            report=print, reuse: bool = False) -> dict:
    """Runs the authors' script and lightcl_jax for each seed on ``stream``; their figures.

    Args:
      checkout: the authors' repository (holds LightCL.py).
      stream: the `TaskStream` both train on (exported to ``workdir/stream.npz``).
      config: our run's `Config` (its seed is replaced by each seed's).
      seeds: the seeds, each run by both.
      epochs: epochs per task of both.
      workdir: where the stream, logs and result files go.
      report: called with one line per finished run.
      reuse: take a seed's figures from ``workdir/seed{N}.json`` (written after every
        finished seed) when it exists and was measured with the same checkout, stream,
        epochs and settings, instead of running that seed again.

    Returns:
      ``{"seeds": [{"seed", "reference": {...}, "ours": {...}}], "reference": summary,
      "ours": summary, "wall_time_ratio", "peak_rss_mb", "epochs", "epochs_overridden",
      "glibc_tunables"}``; each side's per-seed entry has ``til``, ``cil``, ``wall_time_s``,
      ``peak_rss_mb``. ``glibc_tunables``: the ``GLIBC_TUNABLES`` both processes ran
      with (None: unset).
    """
    os.makedirs(workdir, exist_ok=True)
    stream_path = os.path.join(workdir, "stream.npz")
    export_stream(stream, stream_path)
    # The reference's loaders keep an epoch's smaller last batch (PyTorch's default), or
    # drop it when ours does (a diagnostic: the served loaders' drop_last, the script as is).
    # Both sides run in one environment: where our scripts run themselves again with
    # glibc's malloc asking for huge pages (`run_with_huge_pages`), the reference gets
    # the same tunable (it speeds PyTorch's steps too).
    same = huge_pages_here() or dict(os.environ)
    env = dict(same, LIGHTCL_STREAM=stream_path,
               LIGHTCL_DROP_LAST="1" if config.last_batch == "drop" else "0")
    runs = []
    settings = {"checkout": checkout, "stream": stream.name, "epochs": epochs,
                "last_batch": config.last_batch, "glibc_tunables": same.get("GLIBC_TUNABLES"),
                "ours": {k: v for k, v in config.identity_dict().items()
                         if k not in ("seed", "epochs")}}
    for seed in seeds:
        record = os.path.join(workdir, f"seed{seed}.json")
        if reuse and os.path.exists(record):
            with open(record) as f:
                saved = json.load(f)
            if saved.get("settings") == settings:
                report(f"seed {seed}: figures reused from {record}")
                runs.append(saved["entry"])
                continue
            report(f"seed {seed}: {record} was measured with other settings; running again")
        entry = {"seed": seed}
        out = os.path.join(workdir, f"reference-seed{seed}.json")
        wall, rss = run_child([sys.executable, RUNNER, "--checkout", checkout, "--stream",
                               stream_path, "--seed", str(seed), "--epochs", str(epochs),
                               "--out", out], out.replace(".json", ".log"), env)
        entry["reference"] = {**_read(out, "til", "cil"), "wall_time_s": wall, "peak_rss_mb": rss}
        report(f"seed {seed}, the authors' script: {_line(entry['reference'])}")
        out = os.path.join(workdir, f"ours-seed{seed}.json")
        ours = dataclasses.replace(config, seed=seed, epochs=epochs).to_dict()
        wall, rss = run_child([sys.executable, "-m", "benchmarks.side_by_side.run_ours",
                               "--stream", stream_path, "--config", json.dumps(ours),
                               "--out", out], out.replace(".json", ".log"), same)
        with open(out) as f:
            result = json.load(f)
        entry["ours"] = {"til": result["avg_til"], "cil": result["avg_cil"],
                         "wall_time_s": wall, "peak_rss_mb": rss,
                         "breakdown": our_breakdown(result)}
        with open(out.replace("ours-", "reference-").replace(".json", ".log")) as f:
            entry["reference"]["breakdown"] = reference_breakdown(f.read(), stream, epochs)
        report(f"seed {seed}, lightcl_jax:         {_line(entry['ours'])}")
        write_json_atomic(record, {"settings": settings, "entry": entry})
        runs.append(entry)
    return {**summarize(runs, epochs), "glibc_tunables": same.get("GLIBC_TUNABLES")}


def our_breakdown(results: dict) -> dict:
    """Where a run of ours spent its time, from its ``timeline`` and XLA's FLOPs.

    ``startup_s``: until the first task began (imports, data, initialisation);
    per phase (``full``: the tasks that train every layer, ``frozen``: the
    others) the seconds of its epochs after each task's first, their steps
    and the GFLOP/s they sustained; ``first_epoch_extra_s``: how much longer
    each task's first epoch took than its others (compiling the phase's step,
    the first host-device transfers); ``boundaries_s``: between a task's last
    epoch and the next task (end_task, evaluation, begin_task).
    """
    timeline, resources = results["timeline"], results["resources"]
    flops = {task: s["flops"] for s in resources["train_steps"] for task in s["tasks"]}
    frozen_tasks = {p["task"] for p in results["phases"] if p["frozen"]}
    phases = {name: {"seconds": 0.0, "steps": 0, "flops": 0.0} for name in ("full", "frozen")}
    first_extra = boundaries = 0.0
    for index, task in enumerate(timeline["tasks"]):
        ends = task["epoch_ends_s"]
        epochs = [b - a for a, b in zip([task["start_s"], *ends[:-1]], ends)]
        steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
        phase = phases["frozen" if index in frozen_tasks else "full"]
        steps = task["steps"] * (len(epochs) - 1) // len(epochs)
        phase["seconds"] += sum(epochs[1:])
        phase["steps"] += steps
        phase["flops"] += steps * flops[index]
        first_extra += epochs[0] - steady
        following = (timeline["tasks"][index + 1]["start_s"] if index + 1 < len(timeline["tasks"])
                     else timeline["end_s"])
        boundaries += following - ends[-1]
    for phase in phases.values():
        phase["gflop_per_s"] = phase["flops"] / phase["seconds"] / 1e9 if phase["seconds"] else 0.0
        phase["seconds_per_step"] = phase["seconds"] / phase["steps"] if phase["steps"] else 0.0
    return {"startup_s": timeline["tasks"][0]["start_s"], "phases": phases,
            "first_epoch_extra_s": first_extra, "boundaries_s": boundaries,
            "total_s": timeline["end_s"]}


_TQDM_DONE = re.compile(r"100%\|[^|]*\| (\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)<")


def reference_breakdown(log: str, stream, epochs: int) -> dict:
    """The authors' script's seconds per task (its tqdm bars over the epochs, evaluation every
    5 epochs included) and the GFLOP/s that sustains, counting its steps as it runs them:
    the last smaller batch of each epoch kept, from task 1 on the buffer through every
    layer (`theoretical_cost`'s conventions)."""
    from lightcl_jax.accounting.theory import layer_table
    seconds = []
    for segment in re.split(r"-+\d+ is beginning-+", log)[1:]:  # the script's task headers
        done = _TQDM_DONE.findall(segment)  # tqdm writes its last state more than once
        if done:
            _, h, m, s_ = done[-1]
            seconds.append(int(h or 0) * 3600 + int(m) * 60 + int(s_))
    rows = layer_table(64, stream.image_shape[0], stream.num_classes, stream.image_shape[-1])
    forward = sum(r["macs"] for r in rows)
    last = sum(r["macs"] for r in rows if r["group"] in ("stage4", "head"))
    tasks = []
    for index, task in enumerate(stream.tasks[:len(seconds)]):
        samples = len(task.y_train)
        if index == 0:
            flops = 2 * 3 * forward * samples * epochs
        else:
            steps = -(-samples // 32)
            flops = 2 * (forward + 2 * last) * (samples + 15 * steps) * epochs
        tasks.append({"seconds": seconds[index], "flops": float(flops),
                      "gflop_per_s": flops / seconds[index] / 1e9 if seconds[index] else 0.0})
    return {"tasks": tasks}


def _read(path: str, *keys: str) -> dict:
    with open(path) as f:
        values = json.load(f)
    return {k: float(values[k]) for k in keys}


def _line(side: dict) -> str:
    return (f"TIL {side['til']:.2f}, CIL {side['cil']:.2f}, {side['wall_time_s']:.1f} s, "
            f"peak RSS {side['peak_rss_mb']:.0f} MB")


def summarize(runs: list[dict], epochs: int) -> dict:
    """Mean and (population) standard deviation of each side's figures over the seeds."""
    def stats(side):
        out = {}
        for key in ("til", "cil", "wall_time_s", "peak_rss_mb"):
            values = np.array([r[side][key] for r in runs], np.float64)
            out[key] = {"mean": float(values.mean()), "std": float(values.std()),
                        "min": float(values.min()), "max": float(values.max())}
        return out
    reference, ours = stats("reference"), stats("ours")
    wall = {side: sum(r[side]["wall_time_s"] for r in runs) for side in ("reference", "ours")}
    return {"seeds": runs, "reference": reference, "ours": ours,
            "wall_time_ratio": wall["ours"] / wall["reference"],
            "peak_rss_mb": {side: max(r[side]["peak_rss_mb"] for r in runs)
                            for side in ("reference", "ours")},
            "epochs": epochs, "epochs_overridden": epochs != SCRIPT_EPOCHS,
            "fidelity": {
                "til_difference": ours["til"]["mean"] - reference["til"]["mean"],
                "til_within_1_point": abs(ours["til"]["mean"] - reference["til"]["mean"]) <= 1.0,
                "cil_within_reference_spread": abs(ours["cil"]["mean"] - reference["cil"]["mean"])
                <= reference["cil"]["std"]}}


def format_summary(summary: dict) -> str:
    """The comparison as a plain-text table."""
    lines = [f"{'':26}{'TIL':>16}{'CIL':>16}{'wall s':>16}{'peak RSS MB':>16}"]
    for name, side in (("the authors' script", "reference"), ("lightcl_jax", "ours")):
        figures = summary[side]
        cells = "".join(f"{figures[k]['mean']:>9.2f} ±{figures[k]['std']:5.2f}"
                        for k in ("til", "cil", "wall_time_s", "peak_rss_mb"))
        lines.append(f"{name:<26}{cells}")
    fidelity = summary["fidelity"]
    lines.append(f"wall time ratio (lightcl_jax / the authors', summed over "
                 f"{len(summary['seeds'])} seeds): {summary['wall_time_ratio']:.3f}")
    lines.append(f"mean TIL difference {fidelity['til_difference']:+.2f} points (within 1: "
                 f"{fidelity['til_within_1_point']}); mean CIL within the authors' mean ± std: "
                 f"{fidelity['cil_within_reference_spread']}")
    if "last_batch" in summary:
        lines.append(f"last batch of an epoch: {summary['last_batch']}")
    if "glibc_tunables" in summary:
        lines.append(f"both processes ran with GLIBC_TUNABLES={summary['glibc_tunables'] or ''}")
    if summary["epochs_overridden"]:
        lines.append(f"epochs: {summary['epochs']} per task, set in a temporary copy of the "
                     f"authors' LightCL.py (it hard-codes {SCRIPT_EPOCHS})")
    return "\n".join(lines)


def format_breakdown(run: dict) -> str:
    """Where one seed's time went, both sides (`our_breakdown`, `reference_breakdown`)."""
    ours, ref = run["ours"]["breakdown"], run["reference"]["breakdown"]
    lines = [f"seed {run['seed']}, lightcl_jax ({ours['total_s']:.0f} s in the process): "
             f"startup {ours['startup_s']:.1f} s, first epochs' extra (compiling) "
             f"{ours['first_epoch_extra_s']:.1f} s, task boundaries and evaluation "
             f"{ours['boundaries_s']:.1f} s"]
    for name, phase in ours["phases"].items():
        lines.append(f"  {name}-network steps (epochs after each task's first): "
                     f"{phase['seconds']:.1f} s, {phase['steps']} steps, "
                     f"{phase['seconds_per_step'] * 1e3:.0f} ms a step, "
                     f"{phase['gflop_per_s']:.0f} GFLOP/s (XLA's count)")
    tasks = ", ".join(f"{t['seconds']} s ({t['gflop_per_s']:.0f} GFLOP/s)" for t in ref["tasks"])
    lines.append(f"seed {run['seed']}, the authors' script, per task (evaluation every 5 epochs "
                 f"included; theoretical FLOPs): {tasks}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.vs_reference", description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, metavar="CHECKOUT",
                   help="a clone of github.com/INV-WZQ/LightCL (outside this repository)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--epochs", type=int, default=SCRIPT_EPOCHS,
                   help=f"epochs per task for both (the script's own: {SCRIPT_EPOCHS})")
    p.add_argument("--dataset", default="digits32",
                   help="a make_stream dataset of 5 tasks x 2 classes, 3-channel images "
                        "(default digits32)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir, for a TFDS dataset")
    p.add_argument("--workdir", default=os.path.join("runs", "vs-reference"),
                   help="where the exported stream, logs and per-run results go")
    p.add_argument("--last-batch", default="keep", choices=sorted(LAST_BATCH),
                   help="an epoch's samples after its last full batch: keep (default, as the "
                        "script's DataLoader) or drop, on both sides")
    p.add_argument("--reuse", action="store_true",
                   help="take a seed's figures from an earlier run in --workdir with the same "
                        "settings (its seedN.json) instead of running it again")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        parser.error(f"--seeds and --epochs must be >= 1; got {args.seeds} and {args.epochs}")
    checkout = os.path.abspath(args.ref)
    for name in ("LightCL.py", "models.py", "prune.py", "utils.py"):
        if not os.path.isfile(os.path.join(checkout, name)):
            parser.error(f"--ref {args.ref} is not a checkout of the authors' LightCL "
                         f"repository (no {name}); clone github.com/INV-WZQ/LightCL outside "
                         "this repository and pass its folder")
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        parser.error("the authors' script needs PyTorch, an optional extra here: "
                     "pip install torch==2.13.0")
    from lightcl_jax.config import Config
    from lightcl_jax.data.streams import make_stream
    try:
        config = Config(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                        last_batch=args.last_batch, **OUR_SETTINGS).resolved()
        stream = make_stream(args.dataset, data_dir=args.data_dir)
        check_fits_reference(stream)
    except ValueError as err:
        parser.error(str(err))
    seeds = list(range(args.seed, args.seed + args.seeds))
    try:
        summary = compare(checkout, stream, config, seeds, args.epochs, args.workdir,
                          reuse=args.reuse)
    except RuntimeError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    summary.update(stream=stream.name, ours_config=config.to_dict(),
                   last_batch=LAST_BATCH[args.last_batch])
    print(format_summary(summary))
    print(format_breakdown(summary["seeds"][0]))
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


def check_fits_reference(stream) -> None:
    """Raises ValueError when the authors' script cannot train on ``stream``."""
    shape = {"num_tasks": stream.num_tasks, "num_classes": stream.num_classes,
             "channels": stream.image_shape[-1]}
    if shape != REFERENCE_SHAPE:
        raise ValueError(f"the authors' script trains 5 tasks of 2 classes on 3-channel images "
                         f"(its Split CIFAR-10); {stream.name} has {shape['num_tasks']} tasks, "
                         f"{shape['num_classes']} classes and {shape['channels']} channels")


if __name__ == "__main__":
    sys.exit(main())
