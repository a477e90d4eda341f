import dataclasses

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
from lightcl_jax.training.loop import train_and_evaluate
from lightcl_jax.training.state import create_train_state
from lightcl_jax.training.state import (REFERENCE_SPARSITY, apply_masks, channel_prune_masks,
                                           keep_pruned, kept_output_channels, sparsity_report)
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run

TINY = Config(strategy="lightcl", dataset="digits", epochs=1, nf=10, batch_size=16,
              strategy_args={"buffer_size": 8}, sparse=True)


def _params(nf=10, seed=0):
    model = ResNet18(num_classes=4, nf=nf)
    return create_train_state(model, (8, 8, 1), jax.random.PRNGKey(seed)).params


def test_kept_output_channels_follow_the_reference_threshold():
    # 5 output channels with means 0.0 .. 0.4 over a (1, 1, 2, 5) kernel.
    kernel = np.tile(np.arange(5, dtype=np.float32) / 10, (1, 1, 2, 1))
    # s = 0.6: n = int(5 * 0.4 + 0.5) = 2; threshold = 3rd smallest -> 3 channels survive.
    np.testing.assert_array_equal(kept_output_channels(kernel, 0.6), [0, 0, 1, 1, 1])
    # The mean is signed: large negative weights are pruned first.
    np.testing.assert_array_equal(kept_output_channels(-kernel, 0.6), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept_output_channels(kernel, 0.0), [1] * 5)


def test_channel_masks_chain_inputs_in_the_reference_parameter_order():
    params = _params()
    masks = jax.tree_util.tree_map(np.asarray, channel_prune_masks(params))

    def outputs(mask):  # kept output channels of an HWIO kernel mask
        return mask.reshape(-1, mask.shape[-1]).any(axis=0)

    def inputs(mask):
        return mask.any(axis=(0, 1, 3))

    # Kept outputs per conv: int(C (1 - s) + 0.5) + 1 (random weights: distinct means).
    for module, group, c in (("stem_conv", "stem", 10), ("stage1_block1", "stage1", 10),
                             ("stage3_block2", "stage3", 40), ("stage4_block1", "stage4", 80)):
        kernel = masks[module]["kernel"] if module == "stem_conv" else masks[module]["conv2"][
            "kernel"]
        assert outputs(kernel).sum() == int(c * (1 - REFERENCE_SPARSITY[group]) + 0.5) + 1
    # The kept outputs are the channels with the largest mean weight.
    stem = np.asarray(params["stem_conv"]["kernel"])
    means = stem.reshape(-1, 10).mean(axis=0)
    np.testing.assert_array_equal(np.flatnonzero(outputs(masks["stem_conv"]["kernel"])),
                                  np.sort(np.argsort(means)[-9:]))
    # Inputs follow the previous conv in PyTorch order: conv2 <- conv1, the next block's
    # conv1 <- the previous block's shortcut when it has one; shortcuts and stem: all inputs.
    s2b1, s2b2 = masks["stage2_block1"], masks["stage2_block2"]
    np.testing.assert_array_equal(inputs(s2b1["conv2"]["kernel"]),
                                  outputs(s2b1["conv1"]["kernel"]))
    np.testing.assert_array_equal(inputs(s2b2["conv1"]["kernel"]),
                                  outputs(s2b1["shortcut_conv"]["kernel"]))
    np.testing.assert_array_equal(inputs(s2b1["conv1"]["kernel"]),
                                  outputs(masks["stage1_block2"]["conv2"]["kernel"]))
    assert inputs(s2b1["shortcut_conv"]["kernel"]).all()
    assert inputs(masks["stem_conv"]["kernel"]).all()
    # A kernel mask is exactly outer(kept inputs, kept outputs) over every position.
    k = s2b2["conv1"]["kernel"]
    np.testing.assert_array_equal(k, np.broadcast_to(
        inputs(k)[None, None, :, None] & outputs(k)[None, None, None, :], k.shape))
    # BatchNorm follows its conv; the head's rows follow the last conv; its bias is kept.
    np.testing.assert_array_equal(s2b1["shortcut_bn"]["scale"],
                                  outputs(s2b1["shortcut_conv"]["kernel"]))
    np.testing.assert_array_equal(s2b1["bn1"]["bias"], outputs(s2b1["conv1"]["kernel"]))
    last = outputs(masks["stage4_block2"]["conv2"]["kernel"])
    np.testing.assert_array_equal(masks["head"]["kernel"], np.repeat(last[:, None], 4, axis=1))
    assert masks["head"]["bias"].all()


def test_keep_pruned_zeroes_masked_updates_and_sparsity_report_counts_zeros():
    params = {"a": jnp.asarray([1.0, 2.0, 3.0]), "b": jnp.asarray([[4.0, 5.0]])}
    masks = {"a": jnp.asarray([True, False, True]), "b": jnp.ones((), bool)}
    tx = optax.chain(optax.sgd(1.0), keep_pruned(masks))
    params = apply_masks(params, {"a": masks["a"], "b": jnp.ones((1, 2), bool)})
    updates, _ = tx.update({"a": jnp.ones(3), "b": jnp.ones((1, 2))}, tx.init(params), params)
    np.testing.assert_array_equal(updates["a"], [-1.0, 0.0, -1.0])
    np.testing.assert_array_equal(updates["b"], [[-1.0, -1.0]])
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["a"], [0.0, 0.0, 2.0])


def test_sparse_run_keeps_pruned_weights_exactly_zero():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 24).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 1)).astype(np.float32)
    x[np.arange(len(y)), y, :, 0] += 3.0
    stream = split_into_tasks("tiny", x, y, x[::3], y[::3], 4, 2)
    masks = jax.tree_util.tree_map(np.asarray, channel_prune_masks(_params(seed=TINY.seed)))
    start = jax.tree_util.tree_map(np.asarray, apply_masks(_params(seed=TINY.seed), masks))
    ends = []
    results = train(setup_run(TINY, stream), hooks=Hooks(on_task_end=lambda t, s: ends.append(
        jax.tree_util.tree_map(np.asarray, s.params))))
    for params in ends:
        for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks)):
            assert np.all(p[~m] == 0.0)
    # Unpruned trainable weights did learn.
    assert not np.array_equal(ends[-1]["stage4_block2"]["conv2"]["kernel"],
                              start["stage4_block2"]["conv2"]["kernel"])
    total = sum(m.size for m in jax.tree_util.tree_leaves(masks))
    kept = sum(int(m.sum()) for m in jax.tree_util.tree_leaves(masks))
    # The reported sparsity counts zeros, as the reference's get_model_sparsity: at most
    # the kept entries are nonzero (a kept entry may be zero, e.g. an untrained BN bias).
    nonzero = sum(np.count_nonzero(p) for p in jax.tree_util.tree_leaves(ends[-1]))
    assert results["sparsity"]["params"] == total
    assert results["sparsity"]["nonzero_params"] == nonzero <= kept
    np.testing.assert_allclose(results["sparsity"]["sparsity"], 1 - nonzero / total)
    assert kept / total < 0.5  # 0.2 / 0.7 / 0.8 channel sparsity prunes most weights
    assert sparsity_report(start)["params"] == total


def test_sparse_pretrained_task0_also_trains_the_last_frozen_block():
    lightcl = LightCL(buffer_size=8)
    dense = dataclasses.replace(TINY, sparse=False)
    assert lightcl.frozen_groups(TINY, 0, True) == ("stem", "stage1", "stage2", "stage3_block1")
    assert lightcl.frozen_groups(dense, 0, True) == ("stem", "stage1", "stage2", "stage3")
    assert lightcl.frozen_groups(TINY, 1, True) == ("stem", "stage1", "stage2", "stage3")
    assert lightcl.frozen_groups(TINY, 0, False) == ()


def _two_task_stream():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 24).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 1)).astype(np.float32)
    x[np.arange(len(y)), y, :, 0] += 3.0
    return split_into_tasks("tiny", x, y, x[::3], y[::3], 4, 2)


def test_compact_execution_equals_the_masked_one_with_narrower_layers():
    from lightcl_jax.accounting import compiled_train_step_cost
    from lightcl_jax.training.state import expand_variables, pruning_from_masks
    stream = _two_task_stream()
    # lr 1e-3: at 0.01 a tiny run magnifies float-order differences (see test_seeds).
    config = dataclasses.replace(TINY, epochs=2, lr=1e-3)
    masks = jax.tree_util.tree_map(np.asarray, channel_prune_masks(_params(seed=TINY.seed)))
    pruning = pruning_from_masks(masks)
    runs, ends = {}, {}
    for mode in ("masked", "compact"):
        ends[mode] = []
        runs[mode] = train(setup_run(dataclasses.replace(config, sparse_execution=mode), stream),
                           hooks=Hooks(on_task_end=lambda t, s, mode=mode: ends[mode].append(
                jax.tree_util.tree_map(np.asarray, s.params))))
    for masked, compact in zip(ends["masked"], ends["compact"]):
        # Only the kept channels exist: the last conv holds its kept inputs x outputs.
        kernel = masks["stage4_block2"]["conv2"]["kernel"]
        kept_in, kept_out = kernel.any(axis=(0, 1, 3)).sum(), kernel.any(axis=(0, 1, 2)).sum()
        assert compact["stage4_block2"]["conv2"]["kernel"].shape == (3, 3, kept_in, kept_out)
        assert kept_out < kernel.shape[-1]
        widened = expand_variables(compact, pruning, masked)
        chex.assert_trees_all_close(widened, masked, atol=1e-5, rtol=0)
    for key in ("acc_til", "acc_cil", "sparsity"):
        assert runs["compact"][key] == runs["masked"][key]
    # Fewer FLOPs and bytes in the compiled step of a later task.
    cost = {mode: compiled_train_step_cost(dataclasses.replace(TINY, sparse_execution=mode),
                                           (8, 8, 1), 4, 2)
            for mode in ("masked", "compact")}
    assert cost["compact"]["flops"] < 0.7 * cost["masked"]["flops"]
    assert cost["compact"]["step_bytes"] < 0.7 * cost["masked"]["step_bytes"]


def test_compact_seeds_must_prune_alike_and_masked_runs_keep_their_identity():
    from lightcl_jax.training.run import run_identity
    stream = _two_task_stream()
    compact = dataclasses.replace(TINY, sparse_execution="compact")
    # Without a backbone each seed starts (and prunes) from its own random weights.
    with pytest.raises(ValueError, match="seed 1 prunes other channels than seed 0"):
        train_and_evaluate(compact, stream=stream, seeds=2)
    # Runs made before the field existed were masked: their checkpoints still resume.
    assert "sparse_execution" not in run_identity(TINY, stream, False)["config"]
    assert run_identity(compact, stream, False)["config"]["sparse_execution"] == "compact"
