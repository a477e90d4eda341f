"""Several seeds in one compiled program (`train_and_evaluate(..., seeds=N)`).

Each seed of a vmapped run must compute what a single run of that seed
computes, up to the order of float sums in XLA's batched kernels. The runs
are tiny (test_training's random stream and config: 2 tasks of 3 steps an epoch).

The runs use lr 1e-3: at lr 0.01 this nf=4 net on random 8x8 images meets
ReLU kinks, where a 1e-7 change of a weight flips an activation and moves
the next update by up to ~1e-3 (checked by hand: a single run with its
weights scaled by 1 - 1e-7 moved as far as the vmapped one), and over a few
steps the float-order differences of batched kernels grow past any tight
tolerance. At lr 1e-3 the seeds' final parameters agree to ~1e-7.
"""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import run
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.training import loop as probe
from lightcl_jax.training.checkpoint import RunCheckpoints
from lightcl_jax.training.epochs import DivergenceError, check_finite
from lightcl_jax.training.placement import Lanes
from lightcl_jax.training.loop import train_and_evaluate
from lightcl_jax.training.state import create_train_state
from test_checkpoint import _SnapshotAfter, _same, resume_old_fixture
from test_training import TINY, _tiny_stream, with_strategy
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run


def _final_params(store, key):
    def keep(task, state):
        store[key] = jax.tree_util.tree_map(np.asarray, state.params)
    return keep


def _final_memory(directory):
    """The strategy's memory in a run's last checkpoint, as nested dicts of arrays."""
    checkpoints = RunCheckpoints(directory)
    kind, step = checkpoints.latest()
    state = ocp.StandardCheckpointer().restore(os.path.join(checkpoints.path(kind, step), "state"))
    return state["memory"]


def test_seeds_in_one_program_equal_single_runs(tmp_path):
    stream = _tiny_stream(num_tasks=2)
    # Sparse: each seed prunes its own starting weights (masks in the optimizer state).
    config = dataclasses.replace(TINY, strategy="lightcl", seed=3, lr=1e-3, sparse=True)
    params = {}
    multi = train(setup_run(config, stream, seeds=2),
                  checkpoints=RunCheckpoints(tmp_path / "multi"),
                  hooks=Hooks(on_task_end=_final_params(params, "multi")))
    singles = [train(setup_run(dataclasses.replace(config, seed=s), stream),
                     checkpoints=RunCheckpoints(tmp_path / str(s)),
                     hooks=Hooks(on_task_end=_final_params(params, s)))
               for s in (3, 4)]
    # The memories (LightCL's buffer, reference outputs, prefix statistics and vital masks)
    # are each seed's own.
    memory = _final_memory(tmp_path / "multi")
    for lane, seed in enumerate((3, 4)):
        alone = _final_memory(tmp_path / str(seed))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(memory),
                                jax.tree_util.tree_leaves(alone)):
            if np.issubdtype(b.dtype, np.floating):
                np.testing.assert_allclose(a[lane], b, rtol=1e-4, atol=1e-4,
                                           err_msg=jax.tree_util.keystr(path))
            else:
                np.testing.assert_array_equal(a[lane], b, err_msg=jax.tree_util.keystr(path))

    assert [entry["seed"] for entry in multi["seeds"]] == [3, 4]
    assert multi["identity"]["seeds"] == 2 and "seeds" not in singles[0]["identity"]
    assert multi["phases"] == singles[0]["phases"]
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(params[3]))
    for lane, (seed, single) in enumerate(zip((3, 4), singles)):
        entry = multi["seeds"][lane]
        for a, b in zip(jax.tree_util.tree_leaves(params["multi"]),
                        jax.tree_util.tree_leaves(params[seed])):
            assert a.shape[0] == 2
            np.testing.assert_allclose(a[lane], b, rtol=0, atol=1e-5 * scale)
        for key in ("acc_til", "acc_cil"):
            np.testing.assert_allclose(entry[key][-1], single[key][-1], rtol=0, atol=1e-9)
        for key in ("avg_til", "avg_cil", "forgetting_til", "bwt_cil"):
            assert entry[key] == pytest.approx(single[key], abs=1e-9)
        assert entry["sparsity"] == single["sparsity"]
    # Mean and (population) standard deviation over the seeds, by hand.
    for mode in ("til", "cil"):
        a, b = (single[f"avg_{mode}"] for single in singles)
        assert multi[f"avg_{mode}_mean"] == pytest.approx((a + b) / 2)
        assert multi[f"avg_{mode}_std"] == pytest.approx(abs(a - b) / 2)
    table = run.format_table(multi)
    assert "seeds 3..4 trained together" in table
    assert (f"{multi['avg_til_mean']:10.2f} +/- {multi['avg_til_std']:.2f}" in table)
    assert f"{'avg_til':22}{multi['seeds'][0]['avg_til']:10.2f}" in table


def test_seeds_resume_mid_task_to_the_uninterrupted_results(tmp_path):
    stream = _tiny_stream(num_tasks=2)
    config = dataclasses.replace(with_strategy(TINY, "derpp"), epochs=2)
    # Tasks run steps 1-6 and 7-12; a kill after step 9 leaves the checkpoint of step 8.
    clean = train(setup_run(config, stream, seeds=2),
                  checkpoints=RunCheckpoints(tmp_path / "run", every=8),
                  progress=_SnapshotAfter(9, tmp_path / "run", tmp_path / "killed"))
    meta = RunCheckpoints(tmp_path / "killed").read_meta("steps", 8)
    assert len(meta["rng_state"]) == 2 and len(meta["results"]["acc_til"]) == 2
    resumed = train(setup_run(config, stream, seeds=2),
                    checkpoints=RunCheckpoints(tmp_path / "killed", every=8))
    assert resumed["resumed_at_steps"] == [8]
    assert _same(resumed) == _same(clean)
    # The task-0 checkpoint of the same run, written by the code before the training
    # package was split.
    old = resume_old_fixture("old_derpp_seeds2", tmp_path, config, stream, clean, seeds=2,
                             boundary=True)
    assert old["resumed_at_steps"] == [6]
    # Each seed's reservoir draws from its own seed's key (`ExperienceReplay.begin_task`).
    keys = _final_memory(tmp_path / "killed")["key"]
    for lane, seed in enumerate((0, 1)):
        np.testing.assert_array_equal(keys[lane], jax.random.PRNGKey(seed + 7919))
    # A checkpoint of two seeds does not resume a single run.
    with pytest.raises(ValueError, match="seeds 2 there, 'absent' here"):
        train(setup_run(config, stream), checkpoints=RunCheckpoints(tmp_path / "killed"))


def test_seeds_whose_freeze_auto_disagrees_are_refused(monkeypatch):
    def fake_probe(model, state, stream, task_index, config, *, augment, masks=None, step=None):
        return ("stage2" if config.seed == 0 else "stage3"), {}
    monkeypatch.setattr(probe, "probe_freeze", fake_probe)
    config = dataclasses.replace(TINY, freeze="auto").resolved()
    # Pre-trained: LightCL freezes, and probes, from task 0.
    model = ResNet18(num_classes=4, nf=config.nf)
    state = create_train_state(model, (8, 8, 1), jax.random.PRNGKey(9))
    backbone = {"params": state.params, "batch_stats": state.batch_stats}
    with pytest.raises(ValueError, match=r"different freeze points for the seeds trained "
                                         r"together \(seed 0: stage2, seed 1: stage3\)"):
        train(setup_run(config, _tiny_stream(num_tasks=2), init_variables=backbone, seeds=2))


def test_lanes_split_join_and_divergence_names_the_seed():
    lanes = Lanes.of(5, 3)
    assert lanes.seeds == (5, 6, 7) and lanes.batch_axis == 1
    tree = {"a": np.arange(6.0).reshape(3, 2), "b": None}
    parts = lanes.split(tree)
    np.testing.assert_array_equal(parts[2]["a"], [4.0, 5.0])
    np.testing.assert_array_equal(lanes.join(parts)["a"], tree["a"])
    assert Lanes.of(5).split(tree) == [tree] and Lanes.of(5).values([1]) == 1
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
            Lanes.of(0, bad)
    losses = [{"loss": np.array([1.0, 2.0, 3.0])}, {"loss": np.array([1.0, np.nan, 3.0])}]
    with pytest.raises(DivergenceError, match=r"task 5, step 12 of the task \(seed 6\) "
                                              r"\(loss=nan\)"):
        check_finite(losses, 10, 4, lanes.seeds)
    np.testing.assert_array_equal(check_finite(losses[:1], 0, 0, lanes.seeds)["loss"],
                                  [[1.0, 2.0, 3.0]])


def test_bench_seeds_refuses_what_it_sets(capsys):
    from benchmarks import bench_seeds
    for argv, words in ((["--seeds", "1"], "--seeds must be >= 2"),
                        (["--", "--workdir", "x"], "--workdir is set by the benchmark")):
        with pytest.raises(SystemExit) as exit_info:
            bench_seeds.main(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_a_traced_hook_may_not_read_a_per_seed_field():
    """The step of all seeds is traced once, with the first seed's config."""
    import jax.numpy as jnp

    from lightcl_jax.strategies import STRATEGIES, Strategy, register_strategy

    class SeedInLoss(Strategy):
        name = "seed_in_loss"

        def uses_memory(self, task_index):
            return True

        def extra_loss(self, forward, eval_forward, params, memory, *, config, **unused):
            return jnp.zeros((), jnp.float32) * config.seed, {}

    register_strategy(SeedInLoss)
    try:
        config = with_strategy(TINY, "seed_in_loss")
        with pytest.raises(AttributeError, match=r"read config.seed, which differs between the "
                                                 r"seeds trained together"):
            train_and_evaluate(config, stream=_tiny_stream(num_tasks=1), seeds=2)
        assert train_and_evaluate(config, stream=_tiny_stream(num_tasks=1))["seed"] == 0  # one seed
    finally:
        STRATEGIES.pop("seed_in_loss", None)


def test_freeze_auto_probes_every_seed_with_one_compiled_step(monkeypatch):
    traces, make = [], probe.make_train_step

    def counting(*args, **kwargs):
        step = make(*args, **kwargs)

        def traced(*step_args):
            traces.append(1)  # runs only while tracing
            return step(*step_args)
        return traced
    monkeypatch.setattr(probe, "make_train_step", counting)
    from lightcl_jax.training.state import create_lane_states

    # Threshold -1: every layer is generalized, so both seeds choose the same point.
    config = dataclasses.replace(TINY, freeze="auto", freeze_threshold=-1.0, augment=False)
    stream = _tiny_stream(num_tasks=2)
    run = setup_run(config, stream, seeds=2, devices=1)
    model, placement = run.model, run.placement
    states, masks = create_lane_states(model, (8, 8, 1), placement.lanes.seeds)
    configs = run.lane_configs
    choices = probe.freeze_auto(run, placement.lanes.join(states), 1, masks)
    assert len(traces) == 1 and [c["chosen"] for c in choices] == ["all-but-head"] * 2
    # The shared step gives each seed what its own probe gives.
    alone, metrics = probe.probe_freeze(model, states[1], stream, 1, configs[1], augment=False)
    assert alone == choices[1]["chosen"] and len(traces) == 2
    for layer, values in metrics.items():
        assert choices[1]["metrics"][layer] == pytest.approx(values, abs=1e-6)


def test_seed_counts_the_memory_cannot_hold_are_refused():
    """Before anything is allocated: seeds past JAX's 32-bit keys, and more seeds than the
    machine's memory holds three copies of the weights of (counted here from a real init)."""
    from lightcl_jax.training.run import setup_run
    stream = _tiny_stream()
    config = dataclasses.replace(TINY, seed=2**32 - 2)
    with pytest.raises(ValueError, match=r"seeds 4294967294..4294967296 go past 4294967295"):
        setup_run(config, stream, seeds=3)
    setup_run(config, stream, seeds=2)  # the last two seeds there are
    variables = ResNet18(num_classes=stream.num_classes, nf=TINY.nf).init(
        jax.random.PRNGKey(0), np.zeros((1, *stream.image_shape), np.float32), train=False)
    count = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    too_many = ram // (3 * 4 * count) + 1
    gib = too_many * 4 * count / 2**30
    with pytest.raises(ValueError, match=rf"{too_many} seeds of a ResNet-18 of nf {TINY.nf} hold "
                                         rf"{gib:.1f} GiB of weights; a train step holds them"):
        setup_run(dataclasses.replace(TINY, seed=0), stream, seeds=too_many)
