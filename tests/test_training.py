import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightcl_jax.config import Config
from lightcl_jax.data.streams import split_into_tasks
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.strategies import LightCL
from lightcl_jax.model.layers import frozen_groups
from lightcl_jax.training.epochs import DivergenceError
from lightcl_jax.training.step import BatchStatsChain, jitted_forward
from lightcl_jax.training.step import masked_optimizer
from lightcl_jax.training.loop import train_and_evaluate
from lightcl_jax.training.state import create_train_state
from lightcl_jax.training.step import Phase, make_train_step, phase_for_task, phase_step
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run

TINY = Config(strategy="lightcl", strategy_args={"buffer_size": 8}, dataset="digits", epochs=1,
              nf=4, batch_size=16)


def with_strategy(config: Config, strategy: str, **args) -> Config:
    """``config`` for ``strategy``: the tests' buffer of 8 samples where it has a buffer,
    and hyperparameters ``args``."""
    from lightcl_jax.strategies import strategy_class
    fields = {f.name for f in dataclasses.fields(strategy_class(strategy))}
    buffer = {"buffer_size": 8} if "buffer_size" in fields else {}
    return dataclasses.replace(config, strategy=strategy, strategy_args={**buffer, **args})


def _tiny_stream(num_tasks=3, per_class=24, seed=0):
    """Random 8x8 images whose class is readable from the mean brightness of a row."""
    rng = np.random.default_rng(seed)
    num_classes = 2 * num_tasks
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 1)).astype(np.float32)
    x[np.arange(len(y)), y % 8, :, 0] += 3.0
    return split_into_tasks("tiny", x, y, x[::3], y[::3], num_classes, num_tasks)


def _proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _step_setup(frozen_bn: str):
    config = dataclasses.replace(TINY, frozen_bn=frozen_bn).resolved()
    model = ResNet18(num_classes=4, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0))
    frozen = frozen_groups("stage3")
    phase = Phase(frozen=frozen, fixed_bn=frozen if frozen_bn == "fixed" else (), uses_memory=False)
    tx = masked_optimizer(optax.sgd(0.1), state.params, frozen)
    state = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(make_train_step(model, tx, LightCL(buffer_size=8), config, phase, 2), donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(2, 4, size=16).astype(np.int32))
    return state, step, x, y


@pytest.mark.parametrize("frozen_bn", ["update", "fixed"])
def test_train_step_leaves_frozen_params_bitwise_unchanged(frozen_bn):
    state, step, x, y = _step_setup(frozen_bn)
    before = jax.tree_util.tree_map(np.array, (state.params, state.batch_stats))
    state, _, metrics = step(state, None, x, y, jnp.asarray(2, jnp.int32))
    params, stats = before
    for group in ("stem_conv", "stem_bn", "stage1_block1", "stage2_block2", "stage3_block1"):
        chex.assert_trees_all_equal(params[group], jax.tree_util.tree_map(np.asarray,
                                                                          state.params[group]))
    for group in ("stage4_block1", "stage4_block2", "head"):
        for old, new in zip(jax.tree_util.tree_leaves(params[group]),
                            jax.tree_util.tree_leaves(state.params[group])):
            assert not np.array_equal(old, np.asarray(new)), group
    # Frozen BatchNorm statistics: fixed keeps them, update (the reference) changes them.
    same = np.array_equal(stats["stage3_block1"]["bn1"]["mean"],
                          np.asarray(state.batch_stats["stage3_block1"]["bn1"]["mean"]))
    assert same == (frozen_bn == "fixed")
    assert not np.array_equal(stats["stage4_block1"]["bn1"]["mean"],
                              np.asarray(state.batch_stats["stage4_block1"]["bn1"]["mean"]))
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


def test_train_step_loss_is_cross_entropy_over_the_tasks_logits():
    state, step, x, y = _step_setup("update")
    model = ResNet18(num_classes=4, nf=4)
    (logits, _), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                 train=True, mutable=["batch_stats"])
    task_logits = np.asarray(logits)[:, 2:4].astype(np.float64)
    shifted = task_logits - task_logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(16), np.asarray(y) - 2])
    _, _, metrics = step(state, None, x, y, jnp.asarray(2, jnp.int32))
    np.testing.assert_allclose(float(metrics["ce"]), expected, rtol=1e-5)


def test_compiles_once_per_phase_across_steps_epochs_and_tasks():
    chex.clear_trace_counter()
    traces = []  # one counter per phase's step function

    def wrapper(fn):
        count = [0]
        traces.append(count)

        @functools.wraps(fn)
        def counted(*args):
            count[0] += 1  # runs only while tracing
            return fn(*args)
        # chex counts traces by the function's source footprint, shared by all
        # phases: two phases may trace twice in all, never more.
        return chex.assert_max_traces(counted, n=2)

    config = dataclasses.replace(TINY, epochs=2)
    rss_before = _proc_status_mb("VmRSS")
    results = train(setup_run(config, _tiny_stream(num_tasks=3)), hooks=Hooks(step_wrapper=wrapper))
    # The process's peak resident memory, as the kernel counts it (Linux: VmHWM).
    assert rss_before <= results["resources"]["peak_rss_mb"] <= _proc_status_mb("VmHWM")
    # LightCL without pre-training: task 0 trains everything, tasks 1-2 share one phase.
    assert [c[0] for c in traces] == [1, 1]
    assert [p["frozen"] for p in results["phases"]] == [[], list(frozen_groups("stage3")),
                                                        list(frozen_groups("stage3"))]
    assert [p["memory"] for p in results["phases"]] == [False, True, True]
    assert [len(row) for row in results["acc_til"]] == [1, 2, 3]


def test_pretrained_init_freezes_from_task_zero_with_a_fresh_head():
    stream = _tiny_stream(num_tasks=2)
    model = ResNet18(num_classes=stream.num_classes, nf=4)
    pre = model.init(jax.random.PRNGKey(42), jnp.zeros((1, 8, 8, 1)), train=False)
    strategy = LightCL(buffer_size=8)
    config = TINY.resolved()
    assert phase_for_task(strategy, config, 0, pretrained=True).frozen == frozen_groups("stage3")
    assert phase_for_task(strategy, config, 0, pretrained=False).frozen == ()
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0), init_variables=pre)
    # Every layer but the head starts from the backbone, BatchNorm statistics included.
    chex.assert_trees_all_equal({k: v for k, v in state.params.items() if k != "head"},
                                {k: v for k, v in pre["params"].items() if k != "head"})
    chex.assert_trees_all_equal(state.batch_stats, pre["batch_stats"])
    assert not np.allclose(state.params["head"]["kernel"], pre["params"]["head"]["kernel"])
    wrong = ResNet18(num_classes=stream.num_classes, nf=8).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    with pytest.raises(ValueError, match=r"do not fit a ResNet-18 with nf=4 .*stage1_block1"):
        create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0), init_variables=wrong)
    results = train(setup_run(TINY, stream, init_variables=pre))
    assert results["pretrained"] is True
    assert results["phases"][0] == {"task": 0, "frozen": list(frozen_groups("stage3")),
                                    "memory": False}


def test_regulation_loss_starts_at_zero_on_the_old_model():
    model = ResNet18(num_classes=4, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0))
    chain = BatchStatsChain(state.batch_stats)
    forward = jitted_forward(model, chain, ())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32))
    config = TINY.resolved()
    lightcl = LightCL(buffer_size=8)
    hooks = dict(config=config, batch=(x, None), forward=forward, eval_forward=None,
                 params=state.params, batch_stats=state.batch_stats, classes_per_task=2)
    memory = lightcl.end_task(None, task_index=0, **hooks)
    memory = lightcl.begin_task(memory, task_index=1, **hooks)
    assert memory.buffer_x.shape == (8, 8, 8, 1)
    # Both boundary forwards folded their statistics into the running ones, as the
    # reference's train-mode forwards do.
    assert not np.allclose(chain.latest["stage4_block1"]["bn1"]["mean"],
                           state.batch_stats["stage4_block1"]["bn1"]["mean"])
    step_args = dict(x=x, y=None, class_offset=2, config=config, classes_per_task=2)
    loss, terms = lightcl.extra_loss(forward, None, state.params, memory, **step_args)
    assert float(loss) == 0.0 and float(terms["regulation"]) == 0.0
    moved = jax.tree_util.tree_map(lambda p: p + 0.05, state.params)
    assert float(lightcl.extra_loss(forward, None, moved, memory, **step_args)[0]) > 0.0


def test_train_step_folds_buffer_then_batch_statistics_into_running_ones():
    """Reference order: the buffer's forward, then the batch's, each a BN momentum update."""
    config = TINY.resolved()
    model = ResNet18(num_classes=4, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(2, 4, size=16).astype(np.int32)
    buffer_x = rng.normal(size=(8, 8, 8, 1)).astype(np.float32) + 2.0
    lightcl = LightCL(buffer_size=8)
    host = jitted_forward(model, BatchStatsChain(state.batch_stats), ())
    hooks = dict(config=config, forward=host, eval_forward=None, params=state.params,
                 batch_stats=state.batch_stats, classes_per_task=2)
    memory = lightcl.end_task(None, task_index=0, batch=(x, y), **hooks)
    memory = lightcl.begin_task(memory, task_index=1, batch=(buffer_x, y), **hooks)
    phase, tx, step = phase_step(model, lightcl, config, state.params, 1, False, 2)
    state = state.replace(opt_state=tx.init(state.params))
    old_mean = np.asarray(state.batch_stats["stem_bn"]["mean"])
    new_state, _, _ = jax.jit(step)(state, memory, jnp.asarray(x), jnp.asarray(y),
                                    jnp.asarray(2, jnp.int32))

    # Stem BN input = stem conv output; batch mean over N, H, W (frozen params unchanged).
    def stem_mean(images):
        out = jax.lax.conv_general_dilated(images, state.params["stem_conv"]["kernel"], (1, 1),
                                           ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return np.asarray(out).mean(axis=(0, 1, 2))
    expected = 0.9 * (0.9 * old_mean + 0.1 * stem_mean(buffer_x)) + 0.1 * stem_mean(x)
    np.testing.assert_allclose(new_state.batch_stats["stem_bn"]["mean"], expected,
                               rtol=1e-4, atol=1e-6)
    assert phase.uses_memory


def test_divergence_names_task_and_step():
    config = dataclasses.replace(with_strategy(TINY, "finetune"), lr=1e30)
    with pytest.raises(DivergenceError, match=r"at task 1, step \d+ of the task"):
        train_and_evaluate(config, stream=_tiny_stream(num_tasks=2))


def test_too_small_tasks_are_refused():
    config = dataclasses.replace(TINY, batch_size=64)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        train_and_evaluate(config, stream=_tiny_stream(num_tasks=2))


@pytest.mark.parametrize("frozen_bn", ["update", "fixed"])
def test_cached_prefix_step_equals_the_reference_full_forward_step(frozen_bn):
    """The step starts the buffer at stage 4 on stored prefix features; the reference runs
    the buffer through every layer. Loss, updated params and running statistics agree."""
    config = dataclasses.replace(TINY, frozen_bn=frozen_bn).resolved()
    model = ResNet18(num_classes=4, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(2, 4, size=16).astype(np.int32))
    lightcl = LightCL(buffer_size=8)
    phase, tx, step = phase_step(model, lightcl, config, state.params, 1, False, 2)
    chain = BatchStatsChain(state.batch_stats)
    hooks = dict(config=config, forward=jitted_forward(model, chain, phase.fixed_bn),
                 eval_forward=None, params=state.params, batch_stats=state.batch_stats,
                 classes_per_task=2)
    memory = lightcl.end_task(None, task_index=0, batch=(x, y), **hooks)
    memory = lightcl.begin_task(memory, task_index=1, batch=(x + 1.0, y), **hooks)
    assert memory.buffer_features.shape == (8, 2, 2, 16)  # stage 3's output on the buffer
    state = state.replace(batch_stats=chain.latest, opt_state=tx.init(state.params))
    got, _, metrics = jax.jit(step)(state, memory, x, y, jnp.asarray(2, jnp.int32))

    # The reference's step, written out: buffer through the whole model, then the batch.
    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (logits_b, taps_b), upd = model.apply(variables, memory.buffer_x, train=True,
                                              fixed_bn=phase.fixed_bn, mutable=["batch_stats"])
        masks = {k: memory.vital_masks[k].astype(jnp.float32)[None, None, None, :]
                 for k in taps_b}
        reg = 2e-4 * (jnp.sum((logits_b - memory.ref_logits) ** 2) + sum(
            jnp.sum((masks[k] * (taps_b[k] - memory.ref_taps[k])) ** 2) for k in taps_b))
        (logits, _), upd = model.apply({"params": params, "batch_stats": upd["batch_stats"]},
                                       x, train=True, fixed_bn=phase.fixed_bn,
                                       mutable=["batch_stats"])
        task_logits = logits[:, 2:4]
        ce = -jnp.mean(jax.nn.log_softmax(task_logits)[jnp.arange(16), y - 2])
        return ce + reg, upd["batch_stats"]

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    frozen = set(phase.frozen)
    for (path, new), old, g in zip(jax.tree_util.tree_leaves_with_path(got.params),
                                   jax.tree_util.tree_leaves(state.params),
                                   jax.tree_util.tree_leaves(grads)):
        trainable = jax.tree_util.keystr(path[:1]).strip("[]'").split("_")[0] not in frozen
        want = old - config.lr * g if trainable else old
        np.testing.assert_allclose(new, want, rtol=1e-4, atol=1e-6, err_msg=str(path))
    chex.assert_trees_all_close(got.batch_stats, stats, rtol=1e-5, atol=1e-7)


def test_progress_gets_the_mean_loss_terms_of_each_whole_epoch(monkeypatch):
    """Losses are checked (and read from the device) in chunks of CHECK_EVERY steps; the
    epoch's figures are the mean over all its steps, not over its last chunk."""
    from lightcl_jax.training import epochs
    from lightcl_jax.training.progress import Progress

    class EpochMetrics(Progress):
        def __init__(self):
            self.epochs = []

        def advance(self, steps, metrics=None):
            if metrics:
                self.epochs.append(metrics)

    per_step, check = [], epochs.check_finite

    def spy(losses, *args):
        terms = check(losses, *args)
        per_step.extend(np.asarray(terms["loss"]).tolist())
        return terms
    monkeypatch.setattr(epochs, "check_finite", spy)
    monkeypatch.setattr(epochs, "CHECK_EVERY", 2)
    got = EpochMetrics()
    # One task of 48 samples: 3 steps an epoch, checked after steps 2 and 3.
    train_and_evaluate(dataclasses.replace(with_strategy(TINY, "finetune"), epochs=2),
                       stream=_tiny_stream(num_tasks=1), progress=got)
    assert len(per_step) == 6 and [m["epoch"] for m in got.epochs] == [1, 2]
    for epoch, metrics in enumerate(got.epochs):
        assert metrics["loss"] == pytest.approx(np.mean(per_step[3 * epoch:3 * epoch + 3]))
        assert metrics["ce"] == metrics["loss"]  # finetune: the loss is the cross-entropy
    assert got.epochs[0]["loss"] != pytest.approx(per_step[2])


def test_evaluate_gives_each_seeds_accuracy_on_each_task():
    """Against argmax of each seed's logits in NumPy; batches of 12 pad the 16 samples."""
    from lightcl_jax.registry import EVAL_METRICS
    from lightcl_jax.training.epochs import evaluate
    from lightcl_jax.training.placement import Placement
    from lightcl_jax.training.state import create_lane_states
    from lightcl_jax.training.step import make_eval_step

    stream = _tiny_stream(num_tasks=2)
    model = ResNet18(num_classes=4, nf=4)
    placement = Placement.of(5, 2, 1, {})
    states, _ = create_lane_states(model, (8, 8, 1), placement.lanes.seeds)
    loss = EVAL_METRICS["loss"]
    eval_step = placement.jit_eval_step(make_eval_step(model, 2, (loss,)))
    til, cil, metrics = evaluate(eval_step, placement.lanes.join(states), stream, 2, 12,
                                 placement, (loss,))
    assert til.shape == cil.shape == metrics["loss"].shape == (2, 2)
    for lane, state in enumerate(states):
        for j, task in enumerate(stream.tasks):
            logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                    task.x_eval, train=False)
            logits = np.asarray(logits)
            own = logits[:, task.class_offset:task.class_offset + 2].argmax(1) + task.class_offset
            assert til[j, lane] == 100.0 * np.mean(own == task.y_eval)
            assert cil[j, lane] == 100.0 * np.mean(logits.argmax(1) == task.y_eval)
            # The evaluation loss: the task-masked cross-entropy, averaged over the task.
            task_logits = logits[:, task.class_offset:task.class_offset + 2].astype(np.float64)
            log_p = task_logits - np.log(np.exp(task_logits).sum(1, keepdims=True))
            expected = -np.mean(log_p[np.arange(len(task.y_eval)), task.y_eval - task.class_offset])
            np.testing.assert_allclose(metrics["loss"][j, lane], expected, rtol=1e-5)


def test_the_xla_scheduler_changes_memory_not_results():
    from lightcl_jax.accounting import compiled_train_step_cost
    from lightcl_jax.training.run import run_identity
    stream = _tiny_stream(num_tasks=2)
    runs = {name: train_and_evaluate(dataclasses.replace(TINY, xla_scheduler=name), stream=stream)
            for name in ("memory", "default")}
    for key in ("acc_til", "acc_cil", "avg_til", "avg_cil"):
        assert runs["memory"][key] == runs["default"][key]
    # Not part of a run's identity: a checkpoint resumes under the other scheduler.
    assert runs["memory"]["identity"] == runs["default"]["identity"] == run_identity(
        TINY, stream, pretrained=False)
    # The option reaches the compiler: LightCL's frozen-phase step (task 1) and its
    # full-network step (task 0) hold less with it, and `auto` is it for both.
    small = dataclasses.replace(TINY, nf=16, batch_size=32, strategy_args={})
    for task_index in (1, 0):
        step_bytes = {name: compiled_train_step_cost(
            dataclasses.replace(small, xla_scheduler=name), (16, 16, 3), 10, 2,
            task_index=task_index)["step_bytes"] for name in ("memory", "default", "auto")}
        assert step_bytes["memory"] < step_bytes["default"], (task_index, step_bytes)
        assert step_bytes["auto"] == step_bytes["memory"], (task_index, step_bytes)
