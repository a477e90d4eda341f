"""Checkpoints of a whole run with orbax: save, find the latest, restore, refuse misfits.

A run's checkpoint is two orbax items:

  * ``state``: the arrays -- the train state (params, batch stats, optimizer
    state, step), the strategy's memory (buffer, reference features, vital
    masks, Fisher, ...) and, when layer metrics are recorded, the model as it
    was before the current task. Saved as nested dicts of arrays keyed by the
    pytree's field names; restored onto the structure the run expects at that
    point (`restore` takes a template), so NamedTuples and dataclasses come
    back as themselves.
  * ``meta``: JSON -- the run's identity (resolved config, stream, whether it
    started pre-trained, device count), the position (task, epoch, batch, global step), the
    data-order generator's state at the start of the epoch, the accuracy
    matrices and other results so far, compiled-step counts and figures, and
    the time spent.

Two orbax managers share a run's checkpoint directory: ``tasks/`` keeps one
checkpoint per finished task, ``steps/`` the latest mid-task one (every
``every`` train steps). orbax writes each into a temporary directory and
renames it when complete, so a crash during a write leaves the earlier
checkpoints as they were. Saves are synchronous: the next train step donates
the arrays being saved.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

# Version of the layout above; a checkpoint of another version is refused.
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or of another run."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where in a run a checkpoint was taken."""

    task: int            # task index
    task_done: bool      # the task was trained, ended and evaluated
    epoch: int           # epoch of the task (mid-task checkpoints)
    batch: int           # batches done in that epoch (mid-task checkpoints)
    step_in_task: int    # train steps done in the task
    global_step: int     # train steps done in the run: the checkpoint's number

    def describe(self, num_tasks: int, epochs: int) -> str:
        """E.g. "task 2/5, epoch 3/10, 25 steps of the task done (step 105 of the run)"."""
        if self.task_done:
            return (f"the end of task {self.task + 1}/{num_tasks} "
                    f"(step {self.global_step} of the run)")
        return (f"task {self.task + 1}/{num_tasks}, epoch {self.epoch + 1}/{epochs}, "
                f"{self.step_in_task} steps of the task done (step {self.global_step} of the run)")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def _paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def to_nested(tree) -> dict:
    """The pytree's leaves as nested dicts keyed by field names, keys and indices."""
    nested: dict = {}
    for keys, leaf in _paths(tree):
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return nested


def _nested_paths(nested, prefix=()) -> dict[tuple[str, ...], Any]:
    if not isinstance(nested, dict):
        return {prefix: nested}
    out = {}
    for key, value in nested.items():
        out.update(_nested_paths(value, prefix + (str(key),)))
    return out


def _shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name


class RunCheckpoints:
    """The checkpoints of one run under ``directory``.

    Args:
      directory: where the checkpoints live (created on the first save).
      every: also save every this many train steps within a task; 0: only at
        task boundaries.
    """

    def __init__(self, directory: str, *, every: int = 0):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
            raise ValueError(f"checkpoint interval must be an integer >= 0 (0: only at task "
                             f"boundaries); got {every!r}")
        self.directory = os.path.abspath(directory)
        self.every = every
        self._managers: dict[str, Any] = {}

    def _manager(self, kind: str, *, create: bool = False):
        """The orbax manager of ``kind`` ("tasks" or "steps"); None when absent and not ``create``."""
        path = os.path.join(self.directory, kind)
        if kind not in self._managers:
            if not os.path.isdir(path):
                if not create:
                    return None
                os.makedirs(path, exist_ok=True)  # several processes may make it at once
            import orbax.checkpoint as ocp  # late: importing orbax takes about a second
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if kind == "tasks" else 1, create=False,
                enable_async_checkpointing=False)
            self._managers[kind] = ocp.CheckpointManager(
                path, options=options, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "meta": ocp.JsonCheckpointHandler()})
        return self._managers[kind]

    def latest(self) -> tuple[str, int] | None:
        """(kind, step) of the newest checkpoint, or None when there is none."""
        found = []
        for kind in ("tasks", "steps"):
            manager = self._manager(kind)
            step = None if manager is None else manager.latest_step()
            if step is not None:
                found.append((step, kind == "tasks", kind))
        if not found:
            return None
        step, _, kind = max(found)
        return kind, step

    def path(self, kind: str, step: int) -> str:
        return os.path.join(self.directory, kind, str(step))

    def read_meta(self, kind: str, step: int) -> dict:
        """The JSON part of a checkpoint; CheckpointError when it is unreadable."""
        import orbax.checkpoint as ocp
        try:
            meta = self._manager(kind).restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax and the file system raise many types
            raise self._unreadable(kind, step, err) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"checkpoint {self.path(kind, step)} has format {found!r}; "
                                  f"this version reads format {FORMAT}. Use another --workdir "
                                  "or pass --overwrite to start again")
        return meta

    def _unreadable(self, kind: str, step: int, err: Exception) -> CheckpointError:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return CheckpointError(
            f"checkpoint {self.path(kind, step)} is unreadable ({type(err).__name__}: "
            f"{reason[:200]}); delete that directory to resume from the checkpoint before "
            "it, or pass --overwrite to start again")

    def check_identity(self, meta: dict, identity: dict, kind: str, step: int) -> None:
        """Raises CheckpointError when ``meta`` belongs to another run than ``identity``."""
        differences = identity_differences(meta.get("identity", {}), identity)
        if differences:
            raise CheckpointError(
                f"checkpoint {self.path(kind, step)} is of another run ({differences}); use "
                "another --workdir, or pass --overwrite to discard it")

    def save(self, payload, meta: dict, *, task_done: bool) -> None:
        """Saves ``payload`` (a pytree of arrays) and ``meta`` at ``meta['position']``'s step.

        A task-boundary checkpoint also deletes the mid-task ones before it.
        """
        import orbax.checkpoint as ocp
        step = meta["position"]["global_step"]
        kind = "tasks" if task_done else "steps"
        manager = self._manager(kind, create=True)
        saved = manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(to_nested(payload)),
            meta=ocp.args.JsonSave({"format": FORMAT, **meta})), force=True)
        manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax did not save checkpoint {self.path(kind, step)}")
        if task_done:
            # Made whether or not "steps" exists: in a run of several processes the
            # manager is built together (orbax syncs them), so no process may skip it
            # because of what it saw on disk a moment earlier.
            steps = self._manager("steps", create=True)
            for old in steps.all_steps():
                if old <= step:
                    steps.delete(old)

    def restore(self, kind: str, step: int, template):
        """The arrays of a checkpoint, in ``template``'s structure.

        ``template`` is the pytree the run expects at that point (arrays or
        ``jax.ShapeDtypeStruct``s). Raises CheckpointError naming the first
        array whose path, shape or dtype differs, or when orbax cannot read it.
        """
        import orbax.checkpoint as ocp
        manager = self._manager(kind)
        expected = {keys: _shape_dtype(leaf) for keys, leaf in _paths(template)}
        try:
            stored_meta = manager.item_metadata(step)["state"]
            stored_tree = getattr(stored_meta, "tree", stored_meta)
            stored = {keys: _shape_dtype(leaf)
                      for keys, leaf in _nested_paths(stored_tree).items() if leaf is not None}
        except Exception as err:
            raise self._unreadable(kind, step, err) from err
        for keys in sorted(set(expected) | set(stored)):
            if expected.get(keys) != stored.get(keys):
                name = "/".join(keys)
                raise CheckpointError(
                    f"checkpoint {self.path(kind, step)} does not fit this run: {name} is "
                    f"{_describe(stored.get(keys))} there, {_describe(expected.get(keys))} "
                    "here; use another --workdir, or pass --overwrite to start again")
        abstract = to_nested(jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), template))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:
            raise self._unreadable(kind, step, err) from err
        flat = _nested_paths(restored)
        _, treedef = jax.tree_util.tree_flatten(template)
        return jax.tree_util.tree_unflatten(treedef, [flat[keys] for keys, _ in _paths(template)])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers = {}


def _describe(shape_dtype) -> str:
    if shape_dtype is None:
        return "absent"
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


# Before strategies owned their hyperparameters, the config held them: old field ->
# {strategy: hyperparameter}. `upgrade_identity` reads older runs' identities with it.
LEGACY_STRATEGY_FIELDS = {
    "beta": {"lightcl": "beta"}, "ratio": {"lightcl": "ratio"},
    "buffer_size": {"lightcl": "buffer_size", "er": "buffer_size", "derpp": "buffer_size",
                    "agem": "buffer_size"},
    "derpp_alpha": {"derpp": "alpha"}, "derpp_beta": {"derpp": "beta"},
    "ewc_lambda": {"ewc": "lam"}, "ewc_gamma": {"ewc": "gamma"},
    "lwf_alpha": {"lwf": "alpha"}, "lwf_temperature": {"lwf": "temperature"},
}
# What runs computed before the metrics were a setting.
LEGACY_METRICS = ("avg", "forgetting", "bwt")


def upgrade_identity(identity: dict) -> dict:
    """A run identity as this version writes it, from one an older version wrote (the
    same dict when it is current): a config that held the strategies' hyperparameters
    as fields (`LEGACY_STRATEGY_FIELDS`) gets its strategy's as ``strategy_args`` and the
    metrics those runs computed (`LEGACY_METRICS`)."""
    config = identity.get("config") if isinstance(identity, dict) else None
    if not isinstance(config, dict) or "strategy_args" in config or "beta" not in config:
        return identity
    config = dict(config)
    strategy, args = config.get("strategy"), {}
    for field, owners in LEGACY_STRATEGY_FIELDS.items():
        value = config.pop(field, None)
        if strategy in owners:
            args[owners[strategy]] = value
    config["strategy_args"] = args
    config["metrics"] = list(LEGACY_METRICS)
    return {**identity, "config": config}


def identity_differences(stored: dict, current: dict) -> str:
    """'' when two run identities agree, else the differing entries, one clause each.

    ``stored`` may be an older version's (`upgrade_identity` reads it).
    """
    stored = upgrade_identity(stored)
    out = []
    for section in sorted(set(stored) | set(current)):
        a, b = stored.get(section, "absent"), current.get(section, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key, "absent") != b.get(key, "absent"):
                    out.append(f"{key} {a.get(key, 'absent')!r} there, "
                               f"{b.get(key, 'absent')!r} here")
        elif a != b:
            out.append(f"{section} {a!r} there, {b!r} here")
    return "; ".join(out)
