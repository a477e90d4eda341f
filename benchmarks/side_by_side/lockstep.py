"""lightcl_jax against the authors' model, step by step from the same state.

    python -m benchmarks.side_by_side.lockstep --ref CHECKOUT [--nf 8] [--epochs 2]
        [--seed 0] [--json PATH]

`vs_reference` runs the authors' script as it is, so the two sides start from
different random weights and draw different batches, and their per-seed
accuracies differ by chance as well as by any behaviour that differs. This
check removes the chance. It drives lightcl_jax's own pieces (`setup_run`,
`phase_step`, the strategy's `begin_task` / `end_task` hooks, `TaskBatches`)
through LightCL without pre-training on digits32, the last batch of each epoch
kept, and beside it the authors' ResNet-18 (`models.py` of the checkout,
imported as it is) through a transcription of their `LightCL.py` protocol
(`train`, `my_train`, `my_process`; line numbers below) on the same batches.
Before every step and every task boundary our state is set to theirs
(teacher forcing), so each comparison is of one step from one state: the
parameters and BatchNorm running statistics after it (relative L2 distance
per stage), the loss, the buffer's reference taps and logits, the vital
channels, and the evaluation logits on the held-out samples.

Why not let both run free from the same weights: training on digits32 is
chaotic. `--chaos` shows it with PyTorch alone: its float32 and float64
runs of the same steps from the same weights move apart by ~1e-2 (relative,
stem weights) within a few steps, so any two implementations do, and a
run's final accuracies are a draw. Needs PyTorch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections import defaultdict

import numpy as np

from experiments.cli.common import write_json_atomic
from lightcl_jax.model.layers import TAP_NAMES
from lightcl_jax.model.torch_import import convert_state_dict, export_state_dict

GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")


def authors_model(checkout: str, nf: int):
    """The authors' ``resnet18('seq-cifar10', nf)`` from ``checkout/models.py``."""
    path = _models_file(checkout)
    spec = importlib.util.spec_from_file_location("authors_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet18("seq-cifar10", nf)


def _models_file(checkout: str) -> str:
    path = os.path.join(checkout, "models.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {checkout} has no models.py; pass a clone of "
                         "github.com/INV-WZQ/LightCL as --ref")
    return path


def to_state_dict(variables: dict, model) -> dict:
    """lightcl_jax ``{params, batch_stats}`` as ``model``'s state_dict (the inverse of
    `convert_state_dict`); tensors it has no counterpart for keep the model's values."""
    import torch

    state = model.state_dict()
    arrays = export_state_dict(variables, state.keys())
    return {key: torch.from_numpy(arrays[key]) if key in arrays else value
            for key, value in state.items()}


def distances(ours: dict, theirs: dict) -> dict:
    """Relative L2 distance ``|ours - theirs| / |theirs|`` per collection and group."""
    out = {}
    for collection in ("params", "batch_stats"):
        for group in GROUPS:
            a, b = _flat(ours[collection], group), _flat(theirs[collection], group)
            if a.size:
                out[f"{collection}/{group}"] = float(np.linalg.norm(a - b) /
                                                     max(np.linalg.norm(b), 1e-30))
    return out


def _flat(tree: dict, group: str) -> np.ndarray:
    leaves = []
    for name in sorted(tree):
        top = name.split("_")[0]
        if top == group:
            leaves += [np.ravel(np.asarray(v)) for v in _leaves(tree[name])]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _leaves(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    else:
        yield tree


def _tensor(x: np.ndarray, channels_first: bool = True):
    import torch
    x = np.asarray(x)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if channels_first else x))


class Theirs:
    """The authors' model and optimizer, stepped as their `LightCL.py` does."""

    def __init__(self, checkout: str, config, variables: dict, classes_per_task: int,
                 strategy):
        import torch

        # ``strategy``: our LightCL, whose beta, buffer_size and ratio the authors' run takes.
        self.config, self.classes_per_task, self.strategy = config, classes_per_task, strategy
        self.model = authors_model(checkout, config.nf)
        self.model.load_state_dict(to_state_dict(variables, self.model))
        self.optimizer = torch.optim.SGD(params=self.model.parameters(), lr=config.lr)  # 156
        self.masks, self.buffer, self.standard = {}, None, None
        self._variables = None                  # converted once per change of the model

    def variables(self) -> dict:
        """The model's state as lightcl_jax variables."""
        if self._variables is None:
            self._variables = convert_state_dict({k: v.detach().numpy()
                                                  for k, v in self.model.state_dict().items()})[0]
        return self._variables

    def begin(self, task: int, x) -> None:
        """171-176: the buffer and its taps, in train mode; then 117-120's freezing."""
        self.model.train()
        self._variables = None
        self.buffer = _tensor(x)[:self.strategy.buffer_size]
        _, standard = self.model(self.buffer)
        self.standard = {k: v.detach() for k, v in standard.items()}
        grad = False
        for name, param in self.model.named_parameters():
            grad = grad or "4_1" in name
            param.requires_grad = grad

    def step(self, task: int, x, y) -> float:
        """`train` (81-91) at task 0, `my_train` (122-150) after it: one batch."""
        import torch
        import torch.nn.functional as F

        self.model.train()
        self._variables = None
        cpt = self.classes_per_task
        x, y, lo = _tensor(x), torch.from_numpy(np.asarray(y).astype(np.int64)), cpt * task
        self.optimizer.zero_grad()
        reg = 0
        if task > 0:
            _, feats = self.model(self.buffer.clone())
            for name, feat in feats.items():
                if "linear" in name:
                    reg = reg + torch.sum(self.strategy.beta * (self.standard[name] - feat) ** 2)
                else:
                    mask = self.masks[name].view(1, -1, 1, 1).expand_as(feat)
                    reg = reg + torch.sum(self.strategy.beta * ((feat - self.standard[name]) * mask) ** 2)
        out, _ = self.model(x)
        loss = F.cross_entropy(out[:, lo:lo + cpt], y - lo) + reg
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def end(self, task: int, x) -> None:
        """182-196: vital channels of a fresh batch, in train mode, OR-ed with earlier ones."""
        import torch

        self.model.train()
        self._variables = None
        _, feats = self.model(_tensor(x))
        for name, feat in feats.items():
            if "linear" in name:
                continue
            score = feat.detach().abs().permute(1, 0, 2, 3).sum(-1).sum(-1).sum(-1)
            keep = int(feat.shape[1] * self.strategy.ratio + 0.5)
            vital = score >= torch.kthvalue(score.flatten(), max(1, feat.shape[1] - keep))[0]
            self.masks[name] = vital if task == 0 else self.masks[name] | vital

    def logits(self, x) -> np.ndarray:
        import torch

        self.model.eval()
        with torch.no_grad():
            return self.model(_tensor(x))[0].numpy()


def lockstep(checkout: str, config, stream, report=print) -> dict:
    """Both sides through every task, our state set to theirs before each step and
    boundary; per task the worst distances after one of them (see the module doc)."""
    import jax

    from lightcl_jax.training.loop import run_hook
    from lightcl_jax.training.epochs import TaskBatches
    from lightcl_jax.training.run import setup_run
    from lightcl_jax.training.state import create_lane_states
    from lightcl_jax.training.step import phase_step

    run = setup_run(config, stream)
    (state,), _ = create_lane_states(run.model, run.stream.image_shape, [config.seed])
    theirs = Theirs(checkout, config, _variables(state), run.stream.classes_per_task,
                    run.strategy)

    def forced(state):
        return state.replace(**jax.tree_util.tree_map(jax.numpy.asarray, theirs.variables()))

    memory, tasks = None, []
    for task in run.stream.tasks:
        t, entry = task.index, {"task": task.index, "steps": 0, "worst": defaultdict(float)}
        phase, tx, step = phase_step(run.model, run.strategy, config, state.params, t, False,
                                     run.stream.classes_per_task)
        step, batches = jax.jit(step), TaskBatches.of(run, t)
        hook = functools.partial(run_hook, run=run, task_index=t, configs=[config],
                                 fixed_bn=phase.fixed_bn)
        state = forced(state)
        state = state.replace(opt_state=tx.init(state.params))
        first = batches.one()
        state, memory = hook(run.strategy.begin_task, state=state, memory=memory, batch=first)
        if t > 0:
            theirs.begin(t, first[0])
            _worst(entry, "buffer taps and logits", _memory_distance(memory, theirs.standard))
        for _ in range(config.epochs):
            for x, y in batches.epoch():
                state = forced(state)
                state, memory, metrics = step(state, memory, x, y, task.class_offset)
                loss = theirs.step(t, x, y)
                kind = "step" if len(x) == config.batch_size else "last batch"
                _worst(entry, kind, distances(_variables(state), theirs.variables()))
                _worst(entry, "loss |ours - theirs|", {"": abs(float(metrics["loss"]) - loss)})
                entry["steps"] += 1
        state, last = forced(state), batches.one()
        state, memory = hook(run.strategy.end_task, state=state, memory=memory, batch=last)
        theirs.end(t, last[0])
        _worst(entry, "task end", distances(_variables(state), theirs.variables()))
        entry["vital_channels_differing"] = _mask_difference(memory, theirs.masks)
        entry.update(_evaluation(run, forced(state), theirs, t + 1))
        entry["worst"] = dict(entry["worst"])
        tasks.append(entry)
        report(format_task(entry))
    return {"config": config.to_dict(), "tasks": tasks}


def _numpy(tree):
    import jax
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _variables(state) -> dict:
    return _numpy({"params": state.params, "batch_stats": state.batch_stats})


def _worst(entry: dict, kind: str, figures: dict) -> None:
    for key, value in figures.items():
        name = f"{kind}/{key}" if key else kind
        entry["worst"][name] = max(entry["worst"][name], value)


def _memory_distance(memory, standard: dict) -> dict:
    """Our buffer's reference taps and logits against theirs (relative L2)."""
    ours = [np.asarray(memory.ref_taps[name]) for name in TAP_NAMES]
    ours.append(np.asarray(memory.ref_logits))
    out = {}
    for (name, value), mine in zip(standard.items(), ours):
        value = value.numpy()
        value = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
        out[name] = float(np.linalg.norm(mine - value) / max(np.linalg.norm(value), 1e-30))
    return out


def _mask_difference(memory, masks: dict) -> int:
    ours = [np.asarray(memory.vital_masks[name]) for name in TAP_NAMES]
    return int(sum(np.sum(mine != theirs.numpy()) for mine, theirs in zip(ours, masks.values())))


def _evaluation(run, state, theirs: Theirs, seen: int) -> dict:
    """Evaluation-mode logits of both on each seen task's held-out samples (our state set
    to theirs): their distance, and TIL / CIL in % of both (the authors' `test`, 94-104)."""
    figures = {"eval logits": 0.0, "ours": {"til": [], "cil": []},
               "theirs": {"til": [], "cil": []}}
    for task in run.stream.tasks[:seen]:
        x, y = np.asarray(task.x_eval), np.asarray(task.y_eval)
        lo, hi = task.class_offset, task.class_offset + len(task.classes)
        both = {"ours": np.asarray(run.eval_forward(state.params, state.batch_stats, x)[0]),
                "theirs": theirs.logits(x)}
        gap = np.linalg.norm(both["ours"] - both["theirs"]) / np.linalg.norm(both["theirs"])
        figures["eval logits"] = max(figures["eval logits"], float(gap))
        for side, logits in both.items():
            figures[side]["til"].append(100.0 * float(np.mean(
                logits[:, lo:hi].argmax(1) == y - lo)))
            figures[side]["cil"].append(100.0 * float(np.mean(logits.argmax(1) == y)))
    return figures


def format_task(entry: dict) -> str:
    rows = [f"task {entry['task']}: {entry['steps']} steps, each from the same state; worst "
            "relative L2 distance after one"]
    worst = entry["worst"]
    for kind in ("step", "last batch", "task end"):
        for collection in ("params", "batch_stats"):
            figures = [f"{g} {worst[f'{kind}/{collection}/{g}']:.1e}" for g in GROUPS
                       if f"{kind}/{collection}/{g}" in worst]
            if figures:
                rows.append(f"  {kind:10s} {collection:11s} " + "  ".join(figures))
    taps = [f"{k.split('/', 1)[1]} {v:.1e}" for k, v in worst.items()
            if k.startswith("buffer taps")]
    if taps:
        rows.append("  buffer's reference taps and logits: " + "  ".join(taps))
    rows.append(f"  loss |ours - theirs| {worst['loss |ours - theirs|']:.1e}; vital channels "
                f"differing {entry['vital_channels_differing']}; evaluation logits "
                f"{entry['eval logits']:.1e}")
    for side in ("ours", "theirs"):
        til, cil = entry[side]["til"], entry[side]["cil"]
        rows.append(f"  {side:6s} TIL " + " ".join(f"{v:6.2f}" for v in til)
                    + "  CIL " + " ".join(f"{v:6.2f}" for v in cil))
    return "\n".join(rows)


def chaos(checkout: str, config, stream, steps: int = 8, report=print) -> list[float]:
    """The authors' model in float32 and in float64 from the same weights, through the
    same first ``steps`` batches of task 0 (their `train`): the relative distance of
    the stem's weights after each step."""
    import copy

    import torch

    torch.manual_seed(config.seed)
    single = authors_model(checkout, config.nf)
    double = copy.deepcopy(single).double()
    models = {"float32": single, "float64": double}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=config.lr) for k, m in models.items()}
    task = stream.tasks[0]
    order = np.random.default_rng(config.seed).permutation(len(task.x_train))
    figures = []
    for i in range(steps):
        idx = order[(i * config.batch_size) % len(order):][:config.batch_size]
        y = torch.from_numpy(task.y_train[idx].astype(np.int64))
        for name, model in models.items():
            model.train()
            optimizers[name].zero_grad()
            x = _tensor(task.x_train[idx])
            out, _ = model(x.double() if name == "float64" else x)
            torch.nn.functional.cross_entropy(out[:, :2], y).backward()
            optimizers[name].step()
        a, b = single.conv1.weight.detach().double(), double.conv1.weight.detach()
        figures.append(float((a - b).norm() / b.norm()))
        report(f"step {i + 1}: stem weights, float32 against float64: {figures[-1]:.1e}")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side.lockstep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, metavar="CHECKOUT",
                        help="a clone of github.com/INV-WZQ/LightCL (outside this repository)")
    parser.add_argument("--nf", type=int, default=8, help="ResNet-18 width (default 8)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chaos", type=int, default=0, metavar="STEPS",
                        help="instead: PyTorch float32 against float64, this many steps")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    for name, value in (("--nf", args.nf), ("--epochs", args.epochs)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    _models_file(args.ref)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: lockstep needs PyTorch: pip install -e .[bench]", file=sys.stderr)
        return 2
    from lightcl_jax.config import Config
    from lightcl_jax.data.streams import make_stream

    config = Config(strategy="lightcl", dataset="digits32", nf=args.nf, epochs=args.epochs,
                    seed=args.seed, last_batch="keep", batch_size=32, lr=0.01,
                    strategy_args=dict(beta=2e-4, buffer_size=15, ratio=0.15), freeze="stage3",
                    frozen_bn="update").resolved()
    stream = make_stream("digits32")
    if args.chaos:
        out = {"config": config.to_dict(),
               "float32_against_float64_stem": chaos(args.ref, config, stream, args.chaos)}
    else:
        out = lockstep(args.ref, config, stream)
    if args.json:
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
