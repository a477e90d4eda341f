import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcl_jax.memory.replay import (ReplayBuffer, empty_buffer, replay_batch, reservoir_add,
                                       valid_mask)
from lightcl_jax.strategies import STRATEGIES, DERPlusPlus, ExperienceReplay, OnlineEWC
from lightcl_jax.strategies.base import task_cross_entropy
from lightcl_jax.strategies.regularization import (EWCMemory, diagonal_fisher, distillation_loss,
                                                   ewc_penalty)
from lightcl_jax.training.loop import train_and_evaluate
from test_training import TINY, _tiny_stream, with_strategy


def _np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_task_ce(logits, labels, c):
    first = labels - labels % c
    rows = np.stack([logits[i, f:f + c] for i, f in enumerate(first)])
    return -_np_log_softmax(rows)[np.arange(len(labels)), labels - first]


def test_task_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 6)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5, 3], np.int32)
    got = task_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 2)
    np.testing.assert_allclose(got, _np_task_ce(logits, labels, 2), rtol=1e-5)


def test_diagonal_fisher_matches_softmax_regression_by_hand():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(9, 4)).astype(np.float32)
    ys = rng.integers(0, 3, size=9).astype(np.int32)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}

    def log_likelihood(p, x, y):
        return jax.nn.log_softmax(x @ p["w"] + p["b"])[y]

    fisher = diagonal_fisher(log_likelihood, jax.tree_util.tree_map(jnp.asarray, params),
                             jnp.asarray(xs), jnp.asarray(ys))
    # d log softmax(xW + b)_y / dW = outer(x, onehot(y) - p), / db = onehot(y) - p.
    p = np.exp(_np_log_softmax(xs @ params["w"]))
    residual = np.eye(3)[ys] - p
    np.testing.assert_allclose(fisher["b"], np.mean(residual ** 2, axis=0), rtol=1e-4)
    np.testing.assert_allclose(fisher["w"], np.mean(
        np.einsum("nd,nk->ndk", xs, residual) ** 2, axis=0), rtol=1e-4)


def test_ewc_penalty_and_online_accumulation():
    rng = np.random.default_rng(2)
    tree = lambda: {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    fisher, anchor, params = tree(), tree(), tree()
    fisher = {k: np.abs(v) for k, v in fisher.items()}
    expected = sum(np.sum(fisher[k] * (params[k] - anchor[k]) ** 2) for k in params)
    got = ewc_penalty(params, EWCMemory(fisher=fisher, anchor=anchor))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # end_task: F = gamma * F_old + F_new, anchor = current params.
    from lightcl_jax.model.resnet import ResNet18
    from lightcl_jax.training.step import make_eval_forward
    model = ResNet18(num_classes=4, nf=4)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(np.array([0, 1, 1, 0, 1, 0], np.int32))
    config = with_strategy(TINY, "ewc", gamma=0.5).resolved()
    hooks = dict(config=config, batch=(x, y), forward=None, eval_forward=make_eval_forward(model),
                 params=v["params"], batch_stats=v["batch_stats"], classes_per_task=2)
    ewc = OnlineEWC(gamma=0.5)
    first = ewc.end_task(None, task_index=0, **hooks)
    second = ewc.end_task(first, task_index=1, **hooks)
    for old, new in zip(jax.tree_util.tree_leaves(first.fisher),
                        jax.tree_util.tree_leaves(second.fisher)):
        np.testing.assert_allclose(new, 1.5 * np.asarray(old), rtol=1e-5, atol=1e-12)
    assert sum(float(jnp.sum(f)) for f in jax.tree_util.tree_leaves(first.fisher)) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, second.anchor, v["params"])


def _offer_stream(key, n, batch, size):
    buf = empty_buffer(size, (), num_classes=None, key=key)
    ids = jnp.arange(n, dtype=jnp.float32)
    for start in range(0, n, batch):
        buf = reservoir_add(buf, ids[start:start + batch], ids[start:start + batch].astype(jnp.int32))
    return buf


def test_reservoir_fills_in_order_then_keeps_the_right_size():
    buf = _offer_stream(jax.random.PRNGKey(0), 6, 3, 10)
    assert int(buf.num_seen) == 6 and int(valid_mask(buf).sum()) == 6
    np.testing.assert_array_equal(buf.y[:6], np.arange(6))
    buf = _offer_stream(jax.random.PRNGKey(0), 64, 8, 10)
    assert int(valid_mask(buf).sum()) == 10
    assert len(set(np.asarray(buf.y).tolist())) == 10  # distinct stream items
    np.testing.assert_array_equal(buf.x, np.asarray(buf.y, np.float32))  # x and y stay paired


def test_reservoir_keeps_a_uniform_sample():
    n, size, trials = 64, 10, 4000
    keys = jax.random.split(jax.random.PRNGKey(1), trials)
    kept = jax.jit(jax.vmap(lambda k: _offer_stream(k, n, 8, size).y))(keys)
    counts = np.bincount(np.asarray(kept).ravel(), minlength=n) / trials
    p = size / n
    std = np.sqrt(p * (1 - p) / trials)
    assert np.abs(counts - p).max() < 5 * std, counts
    assert abs(counts[:16].mean() - counts[-16:].mean()) < 3 * std


def test_replay_batch_uses_whole_small_buffers_and_samples_large_ones():
    buf = _offer_stream(jax.random.PRNGKey(2), 5, 5, 8)
    index, valid = replay_batch(buf, 32)
    np.testing.assert_array_equal(index, np.arange(8))
    np.testing.assert_array_equal(valid, np.arange(8) < 5)
    index, valid = replay_batch(buf, 4)
    assert len(set(np.asarray(index).tolist())) == 4 and bool(np.all(valid))
    assert set(np.asarray(index).tolist()) <= set(range(5))


def _fixed_forward(logits):
    return lambda params, x: (jnp.asarray(logits), {})


def test_er_and_derpp_loss_terms_match_numpy():
    rng = np.random.default_rng(3)
    size, k = 6, 4
    stored = rng.normal(size=(size, k)).astype(np.float32)
    labels = np.array([0, 3, 2, 1, 0, 2], np.int32)
    now = rng.normal(size=(size, k)).astype(np.float32)
    buf = ReplayBuffer(x=jnp.zeros((size, 2)), y=jnp.asarray(labels), logits=jnp.asarray(stored),
                       num_seen=jnp.asarray(4, jnp.int32), key=jax.random.PRNGKey(0))
    config = with_strategy(TINY, "derpp", alpha=0.3, beta=0.7)
    args = dict(x=None, y=None, class_offset=2, config=config, classes_per_task=2)
    valid = np.arange(size) < 4
    ce = _np_task_ce(now, labels, 2)[valid].mean()
    mse = ((now - stored) ** 2).mean(axis=1)[valid].mean()
    loss, terms = DERPlusPlus(alpha=0.3, beta=0.7).extra_loss(_fixed_forward(now), None, None,
                                                              buf, **args)
    np.testing.assert_allclose(float(terms["logit_mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(terms["replay_ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.3 * mse + 0.7 * ce, rtol=1e-5)
    loss, _ = ExperienceReplay().extra_loss(_fixed_forward(now), None, None, buf, **args)
    np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
    empty = buf._replace(num_seen=jnp.asarray(0, jnp.int32))
    assert float(ExperienceReplay().extra_loss(_fixed_forward(now), None, None, empty,
                                               **args)[0]) == 0.0


def test_lwf_distillation_matches_numpy():
    rng = np.random.default_rng(4)
    new = rng.normal(size=(5, 6)).astype(np.float32)
    old = rng.normal(size=(5, 6)).astype(np.float32)
    t = 2.0
    p_old = np.exp(_np_log_softmax(old[:, :4] / t))
    expected = -np.mean(np.sum(p_old * _np_log_softmax(new[:, :4] / t), axis=1))
    got = distillation_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(4), t)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Identical logits: the term equals the old distribution's entropy, its minimum.
    same = distillation_loss(jnp.asarray(old), jnp.asarray(old), jnp.asarray(4), t)
    np.testing.assert_allclose(float(same), -np.mean(np.sum(p_old * np.log(p_old), axis=1)),
                               rtol=1e-5)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_runs_end_to_end(strategy):
    stream = _tiny_stream(num_tasks=3)
    results = train_and_evaluate(with_strategy(TINY, strategy), stream=stream)
    assert [len(row) for row in results["acc_til"]] == [1, 2, 3]
    assert all(0.0 <= v <= 100.0 for row in results["acc_cil"] for v in row)
    memory_flags = [p["memory"] for p in results["phases"]]
    expected = {"finetune": [False] * 3, "joint": [False] * 3, "er": [True] * 3,
                "agem": [False, True, True],
                "derpp": [True] * 3}.get(strategy, [False, True, True])
    assert memory_flags == expected


def test_joint_trains_on_every_task_seen_so_far():
    stream = _tiny_stream(num_tasks=3)
    x, y = STRATEGIES["joint"]().training_arrays(stream, 1)
    assert len(x) == len(stream.tasks[0].x_train) + len(stream.tasks[1].x_train)
    assert set(np.unique(y)) == {0, 1, 2, 3}


def _np_agem(g, r, keep):
    """A-GEM's projection in NumPy over lists of arrays; ``keep``: which enter the dots."""
    dot = sum(float(np.sum(a * b)) for a, b, k in zip(g, r, keep) if k)
    norm = sum(float(np.sum(b * b)) for b, k in zip(r, keep) if k)
    if dot >= 0 or norm == 0:
        return g, 0.0
    return [a - dot / norm * b if k else a for a, b, k in zip(g, r, keep)], 1.0


@pytest.mark.parametrize("case", ["conflict", "agree", "empty memory"])
def test_agem_projection_matches_numpy(case):
    from lightcl_jax.strategies.agem import project_gradient
    rng = np.random.default_rng(5)
    shapes = {"a": (3, 4), "b": (5,), "frozen": (2, 2)}
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    r = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    keep = {"a": True, "b": True, "frozen": False}
    # Make the trainable parts conflict (negative dot) or agree, as the case says.
    dot = sum(np.sum(g[k] * r[k]) for k in ("a", "b"))
    if (case == "conflict") != (dot < 0):
        r = {k: -v if keep[k] else v for k, v in r.items()}
    if case == "empty memory":
        r = {k: np.zeros_like(v) for k, v in r.items()}
    names = sorted(shapes)
    expected, was = _np_agem([g[k] for k in names], [r[k] for k in names],
                             [keep[k] for k in names])
    got, projected = project_gradient(jax.tree_util.tree_map(jnp.asarray, g),
                                      jax.tree_util.tree_map(jnp.asarray, r), keep)
    assert float(projected) == was == (1.0 if case == "conflict" else 0.0)
    for k, e in zip(names, expected):
        np.testing.assert_allclose(np.asarray(got[k]), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["frozen"]), g["frozen"])
    if case == "conflict":  # the projected gradient no longer opposes the memory's
        assert abs(sum(float(np.sum(np.asarray(got[k]) * r[k])) for k in ("a", "b"))) < 1e-4


def test_agem_step_applies_the_projected_gradient():
    """One A-GEM train step against the same step done by hand: the batch's gradient and the
    memory's (each from its own jax.grad, BatchNorm chained batch -> memory), projected in
    NumPy, times the learning rate."""
    import optax
    from lightcl_jax.model.resnet import ResNet18
    from lightcl_jax.strategies.agem import AGEM
    from lightcl_jax.training.step import BatchStatsChain, make_forward
    from lightcl_jax.training.state import create_train_state
    from lightcl_jax.training.step import Phase, make_train_step
    config = with_strategy(TINY, "agem", buffer_size=6).resolved()
    model = ResNet18(num_classes=4, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0))
    tx = optax.sgd(0.5)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(6)
    mem_x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    memory = reservoir_add(empty_buffer(6, (8, 8, 1), num_classes=None, key=jax.random.PRNGKey(1)),
                           mem_x, jnp.asarray([0, 1, 1, 0], jnp.int32))
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(2, 4, size=16), jnp.int32)
    phase = Phase(frozen=(), fixed_bn=(), uses_memory=True)
    step = make_train_step(model, tx, AGEM(buffer_size=6), config, phase, 2)
    new, _, metrics = jax.jit(step)(state, memory, x, y, jnp.asarray(2, jnp.int32))

    def loss(params, images, labels, valid, stats):
        chain = BatchStatsChain(stats)
        logits, _ = make_forward(model, chain, ())(params, images)
        ce = task_cross_entropy(logits, labels, 2)
        return jnp.sum(ce * valid) / jnp.sum(valid), chain.latest
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))  # op by op, the test took 42 s
    (_, stats), g = grad(state.params, x, y, jnp.ones(16), state.batch_stats)
    valid = (np.arange(6) < 4).astype(np.float32)
    (ref_ce, stats), r = grad(state.params, memory.x, memory.y, jnp.asarray(valid), stats)
    leaves = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(g)]
    expected, was = _np_agem(leaves, [np.asarray(v, np.float64)
                                      for v in jax.tree_util.tree_leaves(r)], [True] * len(leaves))
    assert float(metrics["projected"]) == was
    np.testing.assert_allclose(float(metrics["memory_ce"]), float(ref_ce), rtol=1e-5)
    for p0, p1, e in zip(jax.tree_util.tree_leaves(state.params),
                         jax.tree_util.tree_leaves(new.params), expected):
        np.testing.assert_allclose(np.asarray(p1), np.asarray(p0) - 0.5 * e, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           new.batch_stats, stats)


def test_agem_memory_holds_each_finished_tasks_share():
    from lightcl_jax.strategies.agem import AGEM
    config = with_strategy(TINY, "agem", buffer_size=7)   # 7 // 3 tasks = 2 a task
    stream = _tiny_stream(num_tasks=3)
    agem, memory = AGEM(buffer_size=7), None
    from lightcl_jax.model.resnet import ResNet18
    from lightcl_jax.training.step import make_eval_forward
    from lightcl_jax.training.state import create_train_state
    model = ResNet18(num_classes=6, nf=4)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(0))
    eval_forward = make_eval_forward(model)
    kwargs = dict(config=config, forward=None, eval_forward=eval_forward, params=state.params,
                  batch_stats=state.batch_stats, classes_per_task=2)
    for t in range(2):
        task = stream.tasks[t]
        batch = (task.x_train[:16], task.y_train[:16])
        memory = agem.begin_task(memory, task_index=t, batch=batch, **kwargs)
        memory = agem.end_task(memory, task_index=t, batch=batch, **kwargs)
        assert int(memory.num_seen) == 2 * (t + 1)
    np.testing.assert_array_equal(np.asarray(memory.y[:4]),
                                  np.concatenate([stream.tasks[0].y_train[:2],
                                                  stream.tasks[1].y_train[:2]]))
    np.testing.assert_array_equal(np.asarray(valid_mask(memory)), np.arange(7) < 4)
