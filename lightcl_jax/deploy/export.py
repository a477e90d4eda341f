"""A run's training, exported: functions serialized with `jax.export`, and their state.

`export_run(run, workdir, out)` reads the run's checkpoint at the end of a task
and writes into ``out``:

    manifest.json      what the folder holds: the run's settings, each function's
                       inputs and outputs (names, shapes, dtypes), files, sizes and
                       SHA-256, and XLA's bytes and FLOPs for each function
    functions/*.jax    the functions, serialized StableHLO (`jax.export`):
                         init_optimizer  the optimizer state a task starts with
                         begin_task      the strategy's task-start work (LightCL: the
                                         buffer, the frozen prefix's features on it, the
                                         reference taps and logits)
                         train_step      one step of the phase every later task trains in
                         end_task        the strategy's task-end work (LightCL: vital channels)
                         eval_step       correct TIL and CIL predictions in a batch
    state.npz          the state they carry: parameters, BatchNorm statistics, optimizer
                       state, step, the strategy's memory, and (``__progress__``) the tasks
                       seen and the accuracy after each
    eval/task<i>.npz   each seen task's evaluation split
    runner.py          trains a new task with JAX and NumPy alone (`lightcl_jax.deploy.runner`)

Every function takes and returns flat lists of arrays: the pytrees (a flax
struct, optax states, named tuples) stay here, their leaves' names in the
manifest. The hooks are traced for the first task after the checkpoint and
serve every later one: each built-in strategy's hooks depend on the task only
through whether it is the first.

An epoch's smaller last batch (``last_batch="keep"``) needs no second file:
the train step is exported with a symbolic batch dimension, so one function
takes a batch of any size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.compiler import COMPILER_OPTIONS, MEMORY_SCHEDULER, compiled_cost

ARTIFACT_FORMAT = "lightcl_jax.artifact"
ARTIFACT_VERSION = 1
RUNNER = "runner.py"
STATE = "state.npz"
MANIFEST = "manifest.json"
PROGRESS = "__progress__"
# The platforms a function is exported for: where JAX lowers for one without its
# hardware, the artifact carries it; each function's entry says which it holds.
PLATFORMS = ("cpu", "cuda")
# Input groups the runner donates (it replaces them with the function's outputs).
DONATED = ("state", "memory")
# The smallest batch the exported train step takes (its batch axis is symbolic).
MIN_BATCH = 2


# Built-in strategies the export refuses, and why (BUILD.md "On the device" says how the
# others' runners compare with the library).
NOT_EXPORTED = {
    "joint": "it trains on every task's data so far (its training_arrays), which the runner "
             "does not hold",
}


class ExportError(ValueError):
    """A run that cannot be exported: no task checkpoint, several seeds, a bad folder."""


def leaf_names(tree, prefix: str) -> list[str]:
    """``prefix/key/key/...`` of each leaf of ``tree``, in flattening order."""
    from lightcl_jax.training.checkpoint import _paths
    return ["/".join((prefix, *keys)) if keys else prefix for keys, _ in _paths(tree)]


def _spec(names: list[str], leaves: list) -> list[dict]:
    return [{"name": n, "shape": [_dim(d) for d in leaf.shape],
             "dtype": np.dtype(leaf.dtype).name} for n, leaf in zip(names, leaves)]


def _dim(d):
    return int(d) if isinstance(d, (int, np.integer)) else str(d)


@dataclasses.dataclass
class _Function:
    """A function of named pytree groups, to be exported on flat leaves."""

    name: str
    fn: Callable            # fn(**groups) -> {group: pytree}
    inputs: dict[str, Any]  # group -> abstract pytree (ShapeDtypeStructs)
    batch_groups: tuple[str, ...] = ()  # groups whose leading axis is the symbolic batch
    # XLA's options the library compiles it with (`lightcl_jax.compiler.jit`); the runner
    # compiles it with them too.
    compiler_options: dict = dataclasses.field(default_factory=dict)

    def flat(self):
        """The function on lists of leaves; tracing it records its outputs' leaf names
        (``out_names``: group -> names), so that no second trace is needed."""
        treedefs = {g: jax.tree_util.tree_structure(t) for g, t in self.inputs.items()}

        def flat_fn(*groups):
            trees = {g: jax.tree_util.tree_unflatten(treedefs[g], leaves)
                     for g, leaves in zip(self.inputs, groups)}
            out = self.fn(**trees)
            self.out_names = {g: leaf_names(t, g) for g, t in out.items()}
            return {g: jax.tree_util.tree_leaves(t) for g, t in out.items()}
        return flat_fn

    def abstract_args(self, symbolic: bool) -> list[list]:
        # BatchNorm's unbiased variance divides by max(n - 1, 1): with two samples or
        # more, n - 1 >= 1 is decided for every spatial size.
        batch = (jax.export.symbolic_shape("b", constraints=(f"b >= {MIN_BATCH}",))[0]
                 if symbolic else None)
        args = []
        for group, tree in self.inputs.items():
            leaves = jax.tree_util.tree_leaves(tree)
            if symbolic and group in self.batch_groups:
                leaves = [jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype)
                          for leaf in leaves]
            args.append(list(leaves))
        return args


def _export(function: _Function, folder: str) -> dict:
    """Serializes ``function`` into ``folder/functions``; its manifest entry. Its batch
    groups' leading axis is symbolic."""
    flat_fn = function.flat()
    args = function.abstract_args(symbolic=bool(function.batch_groups))
    platforms, problem = PLATFORMS, None
    try:
        exported = jax.export.export(jax.jit(flat_fn), platforms=platforms)(*args)
    except Exception as err:  # a lowering JAX has only where the hardware is
        platforms, problem = ("cpu",), f"{type(err).__name__}: {str(err).splitlines()[0]}"
        exported = jax.export.export(jax.jit(flat_fn), platforms=platforms)(*args)
    blob = exported.serialize()
    path = os.path.join("functions", f"{function.name}.jax")
    with open(os.path.join(folder, path), "wb") as f:
        f.write(blob)
    out_shapes = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    out_names = function.out_names
    entry = {
        "file": path, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
        "platforms": list(exported.platforms),
        "inputs": {g: _spec(leaf_names(t, g), a) for (g, t), a in
                   zip(function.inputs.items(), args)},
        "outputs": {g: _spec(out_names[g], out_shapes[g]) for g in out_shapes},
        "batch_groups": list(function.batch_groups),
        "compiler_options": dict(function.compiler_options),
    }
    if problem is not None:
        entry["not_exported_for"] = {"cuda": problem}
    # XLA's figures for the program the runner compiles (the exported function, on
    # this machine's platform, at the run's shapes).
    # Donated as the runner donates them: the state and memory it replaces.
    donate = tuple(i for i, g in enumerate(function.inputs) if g in DONATED)
    compiled = jax.jit(exported.call, donate_argnums=donate,
                       compiler_options=function.compiler_options or None).lower(
        *function.abstract_args(False)).compile()
    cost = compiled_cost(compiled)
    entry["xla"] = {"platform": jax.default_backend(), "step_bytes": cost["step_bytes"],
                    "flops": cost["flops"]}
    return entry


def leaf_specs(tree, prefix: str) -> list[dict]:
    """`_spec` of every leaf of ``tree``, named under ``prefix`` (`leaf_names`)."""
    return _spec(leaf_names(tree, prefix), jax.tree_util.tree_leaves(tree))


def task_checkpoints(workdir: str):
    """``{task index: step}`` of the run's checkpoints at a task's end (its ``tasks`` kind)."""
    from lightcl_jax.training.checkpoint import RunCheckpoints
    from lightcl_jax.training.workdir import CHECKPOINTS
    checkpoints = RunCheckpoints(os.path.join(workdir, CHECKPOINTS))
    manager = checkpoints._manager("tasks")
    found = {}
    if manager is not None:
        for step in manager.all_steps():
            found[checkpoints.read_meta("tasks", step)["position"]["task"]] = step
    return checkpoints, found


def _images(x) -> np.ndarray:
    """A task's images as one float32 array (a TFDS `RecordImages` is read here)."""
    return np.asarray(x if isinstance(x, np.ndarray) else x[np.arange(len(x))], np.float32)


def task_arrays(stream, task_index: int) -> dict[str, np.ndarray]:
    """A task of ``stream`` as the runner reads it: ``x_train``, ``y_train``, ``x_eval``,
    ``y_eval`` (normalised float32 NHWC images, int32 labels)."""
    task = stream.tasks[task_index]
    return {"x_train": _images(task.x_train), "y_train": np.asarray(task.y_train, np.int32),
            "x_eval": _images(task.x_eval), "y_eval": np.asarray(task.y_eval, np.int32)}


def read_task_state(run, workdir: str, after_task: int | None = None):
    """The run's arrays at the end of task ``after_task`` (None: the newest such checkpoint).

    Returns:
      (the task's index, train state, strategy memory, `RunRecord` so far, the
      checkpoint's JSON part, the sparse masks).

    Raises:
      ExportError: a run of several seeds or devices, no checkpoint at a task's end (or
        not at ``after_task``). CheckpointError: of another run, or unreadable.
    """
    from lightcl_jax.training.checkpoint import ResumePoint, restore_run
    from lightcl_jax.training.state import create_lane_states
    from lightcl_jax.training.step import Programs

    if run.placement.lanes.size != 1 or run.placement.parallel.num_devices != 1:
        raise ExportError("export takes a run of one seed on one device; this one trains "
                          f"{run.placement.lanes.size} seeds on "
                          f"{run.placement.parallel.num_devices} devices")
    checkpoints, found = task_checkpoints(workdir)
    try:
        if not found:
            raise ExportError(f"{workdir} holds no checkpoint at a task's end (a run writes one "
                              "after each task it finishes); train at least one task first")
        if after_task is None:
            after_task = max(found)
        if after_task not in found:
            raise ExportError(f"{workdir} has no checkpoint after task {after_task + 1}; it has "
                              f"them after tasks {', '.join(str(t + 1) for t in sorted(found))}")
        step = found[after_task]
        meta = checkpoints.read_meta("tasks", step)
        checkpoints.check_identity(meta, run.identity, "tasks", step)
        states, masks = create_lane_states(run.model, run.stream.image_shape,
                                           run.placement.lanes.seeds,
                                           init_variables=run.init_variables,
                                           sparse=run.config.sparse)
        point = ResumePoint("tasks", step, meta, checkpoints.path("tasks", step))
        arrays, record = restore_run(run, point, checkpoints, states[0], masks,
                                     Programs.of_run(run))
    finally:
        checkpoints.close()
    return after_task, arrays["state"], arrays["memory"], record, meta, masks


def task_functions(run, state, memory, record, masks, t: int) -> list[_Function]:
    """The functions that train task ``t`` and later ones from ``state`` and ``memory``
    (the run's arrays at the end of task ``t - 1``), on abstract inputs."""
    from lightcl_jax.training.checkpoint import _abstract
    from lightcl_jax.training.step import (BatchStatsChain, make_eval_step, make_forward,
                                           memory_scheduled)

    stream, strategy = run.stream, run.strategy
    configs = record.configs(run.lane_configs)
    config = configs[0]
    task_phase = run.task_phase(t, configs, state.params, masks)
    phase, tx = task_phase.phase, task_phase.optimizers[0]
    cpt = stream.classes_per_task
    hooks = dict(config=config, task_index=t, eval_forward=run.eval_forward,
                 classes_per_task=cpt)

    def run_hook(hook, params, batch_stats, memory, x, y):
        chain = BatchStatsChain(batch_stats)
        memory = hook(memory, batch=(x, y), forward=make_forward(run.model, chain, phase.fixed_bn),
                      params=params, batch_stats=batch_stats, **hooks)
        return chain.latest, memory

    def begin(params, batch_stats, memory, x, y):
        batch_stats, memory = run_hook(strategy.begin_task, params, batch_stats, memory, x, y)
        return {"batch_stats": batch_stats, "opt_state": tx.init(params), "memory": memory}

    def end(params, batch_stats, memory, x, y):
        batch_stats, memory = run_hook(strategy.end_task, params, batch_stats, memory, x, y)
        return {"batch_stats": batch_stats, "memory": memory}

    def init_optimizer(params):
        return {"opt_state": tx.init(params)}

    def train_step(state, memory, x, y, class_offset):
        state, memory, metrics = task_phase.step(state, memory, x, y, class_offset)
        return {"state": state, "memory": memory, "metrics": metrics}

    eval_fn = make_eval_step(run.model, cpt)

    def eval_step(params, batch_stats, x, y, valid, class_offset):
        til, cil, _ = eval_fn(params, batch_stats, x, y, valid, class_offset)
        return {"til": til, "cil": cil}

    image = stream.image_shape
    bs = config.batch_size
    sds = jax.ShapeDtypeStruct
    x_batch, y_batch = sds((bs, *image), jnp.float32), sds((bs,), jnp.int32)
    offset = sds((), jnp.int32)
    params, batch_stats = _abstract(state.params), _abstract(state.batch_stats)
    memory_in = _abstract(memory)
    begun = jax.eval_shape(begin, params, batch_stats, memory_in, x_batch, y_batch)
    train_state = _abstract(state).replace(opt_state=begun["opt_state"])
    ended = jax.eval_shape(end, params, batch_stats, begun["memory"], x_batch, y_batch)

    functions = [
        _Function("init_optimizer", init_optimizer, {"params": params}),
        _Function("begin_task", begin, {"params": params, "batch_stats": batch_stats,
                                        "memory": memory_in, "x": x_batch, "y": y_batch}),
        _Function("train_step", train_step, {"state": train_state, "memory": begun["memory"],
                                             "x": x_batch, "y": y_batch,
                                             "class_offset": offset}, ("x", "y"),
                  {**COMPILER_OPTIONS, **(MEMORY_SCHEDULER if memory_scheduled(config)
                                          else {})}),
        _Function("end_task", end, {"params": params, "batch_stats": batch_stats,
                                    "memory": begun["memory"], "x": x_batch, "y": y_batch}),
        _Function("eval_step", eval_step, {
            "params": params, "batch_stats": batch_stats,
            "x": sds((run.eval_batch_size, *image), jnp.float32),
            "y": sds((run.eval_batch_size,), jnp.int32),
            "valid": sds((run.eval_batch_size,), jnp.bool_), "class_offset": offset},
            compiler_options=dict(COMPILER_OPTIONS)),
    ]
    if leaf_specs(ended["memory"], "memory") != leaf_specs(memory_in, "memory"):
        # The checkpoint's memory has another structure than a task's end leaves (e.g.
        # LightCL after its first task: vital masks, no buffer yet): the runner's later
        # tasks begin from the structure end_task returns.
        functions.insert(2, _Function("begin_task_after_end", begin, {
            "params": params, "batch_stats": batch_stats, "memory": ended["memory"],
            "x": x_batch, "y": y_batch}))

    return functions


def export_run(run, workdir: str, out: str, *, after_task: int | None = None,
               overwrite: bool = False) -> dict:
    """Writes ``run``'s training after a task into the folder ``out`` (module docstring).

    Args:
      run: the run (`lightcl_jax.training.run.setup_run` with the settings it ran with).
      workdir: its workdir, holding a checkpoint at the end of at least one task.
      out: the folder to write (made; it must not exist unless ``overwrite``).
      after_task: export the state after this task (index from 0); None: the newest
        task checkpoint. The runner's first new task is the next index.
      overwrite: replace an existing ``out``.

    Returns:
      The manifest (also ``out/manifest.json``).

    Raises:
      ExportError: no checkpoint at a task's end (or not at ``after_task``), a run of
        several seeds, or ``out`` exists. CheckpointError: the checkpoint is of another
        run, or unreadable.
    """
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} exists; choose another --out, or pass --overwrite")
    refused = NOT_EXPORTED.get(run.strategy.name)
    if refused is not None:
        raise ExportError(f"strategy {run.strategy.name} is not exported: {refused}")
    after_task, state, memory, record, meta, masks = read_task_state(run, workdir, after_task)
    t = after_task + 1
    config = record.configs(run.lane_configs)[0]
    functions = task_functions(run, state, memory, record, masks, t)
    stream = run.stream
    staging = f"{os.path.abspath(out)}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "functions"))
    os.makedirs(os.path.join(staging, "eval"))
    try:
        entries = {}
        for function in functions:
            entries[function.name] = _export(function, staging)
        manifest = _manifest(run, config, record, meta, t, entries, stream)
        seen = []
        for task in stream.tasks[:t]:  # their evaluation splits only
            name = os.path.join("eval", f"task{task.index}.npz")
            np.savez(os.path.join(staging, name), x=_images(task.x_eval),
                     y=np.asarray(task.y_eval, np.int32))
            seen.append({"task": task.index, "class_offset": task.class_offset, "eval": name,
                         "size": int(len(task.y_eval))})
        progress = {"tasks": seen, "acc_til": record.acc_til[0], "acc_cil": record.acc_cil[0]}
        write_state(os.path.join(staging, STATE), state, memory, progress)
        manifest["state"] = {"file": STATE, "leaves": (
            leaf_specs(state, "state") + leaf_specs(memory, "memory")),
            # The pytrees the leaves come from, as JAX prints them (for a reader: the
            # runner needs only the names).
            "structure": {"state": str(jax.tree_util.tree_structure(state)),
                          "memory": str(jax.tree_util.tree_structure(memory))}}
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "runner.py"),
                        os.path.join(staging, RUNNER))
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def write_state(path: str, state, memory, progress: dict) -> None:
    """``state.npz``: each leaf under its name, and ``__progress__`` (JSON)."""
    leaves = {}
    for prefix, tree in (("state", state), ("memory", memory)):
        for name, leaf in zip(leaf_names(tree, prefix), jax.tree_util.tree_leaves(tree)):
            leaves[name] = np.asarray(leaf)
    leaves[PROGRESS] = np.array(json.dumps(progress))
    with open(path, "wb") as f:
        np.savez(f, **leaves)


def _manifest(run, config, record, meta, next_task: int, functions: dict, stream) -> dict:
    from lightcl_jax import __version__
    return {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
        "written_by": {"lightcl_jax": __version__, "jax": jax.__version__,
                       "serialization_version": jax.export.maximum_supported_calling_convention_version},
        "run": {
            "strategy": config.strategy, "strategy_args": dict(config.strategy_args),
            "dataset": stream.name, "seed": config.seed, "nf": config.nf,
            "sparse": config.sparse, "sparse_execution": config.sparse_execution,
            "batch_size": config.batch_size, "epochs": config.epochs,
            "last_batch": config.last_batch, "augment": run.augment,
            "pad_value": list(stream.pad_value), "image_shape": list(stream.image_shape),
            "num_classes": stream.num_classes, "classes_per_task": stream.classes_per_task,
            "eval_batch_size": run.eval_batch_size,
            "exported_after_task": next_task - 1, "checkpoint_step": meta["position"]["global_step"],
            "identity": run.identity,
        },
        "functions": functions,
    }
