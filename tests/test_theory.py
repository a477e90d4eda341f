"""The paper-style cost count (`lightcl_jax.accounting.theory`): pure Python, no JAX run."""

import subprocess
import sys

import pytest

from lightcl_jax.accounting.theory import (LIGHTCL_MEM_GAP, PAPER_SETTINGS, PAPER_TABLE1,
                                           kept_channels, layer_table, theoretical_cost)

DATASETS = ("cifar10", "tinyimagenet")
REPRODUCED = ("finetune", "sgd", "ewc", "er", "derpp")


def _cost(strategy, dataset, **kwargs):
    return theoretical_cost(strategy, **{**PAPER_SETTINGS[dataset], **kwargs})


def test_layer_table_totals_match_hand_arithmetic():
    rows = layer_table(64, 32, 10)
    params = (3 * 64 * 9 + 2 * 64                                       # stem conv + BN
              + 4 * (64 * 64 * 9 + 2 * 64)                              # stage 1
              + 64 * 128 * 9 + 3 * 128 * 128 * 9 + 64 * 128 + 5 * 2 * 128  # stage 2
              + 128 * 256 * 9 + 3 * 256 * 256 * 9 + 128 * 256 + 5 * 2 * 256
              + 256 * 512 * 9 + 3 * 512 * 512 * 9 + 256 * 512 + 5 * 2 * 512
              + 512 * 10 + 10)                                          # head
    macs = (3 * 64 * 9 * 32 * 32 + 4 * 64 * 64 * 9 * 32 * 32
            + (64 * 128 * 9 + 3 * 128 * 128 * 9 + 64 * 128) * 16 * 16
            + (128 * 256 * 9 + 3 * 256 * 256 * 9 + 128 * 256) * 8 * 8
            + (256 * 512 * 9 + 3 * 512 * 512 * 9 + 256 * 512) * 4 * 4
            + 512 * 10)
    activations = 5 * 64 * 32 * 32 + 4 * 128 * 16 * 16 + 4 * 256 * 8 * 8 + 4 * 512 * 4 * 4
    assert (params, macs, activations) == (11_173_962, 555_422_720, 557_056)
    assert sum(r["params"] for r in rows) == params
    assert sum(r["macs"] for r in rows) == macs
    assert sum(r["activations"] for r in rows) == activations
    assert len(rows) == 1 + 16 + 3 + 1
    assert [r["block"] for r in rows][-3:] == ["stage4_block2", "stage4_block2", "head"]
    # At 64x64 every conv does four times the work; the head does not change.
    big = layer_table(64, 64, 10)
    assert sum(r["macs"] for r in big) == 4 * (macs - 5120) + 5120


def test_module_runs_without_jax():
    code = ("import sys\n"
            "from lightcl_jax.accounting import theory\n"
            "theory.theoretical_cost('lightcl', **theory.PAPER_SETTINGS['cifar10'])\n"
            "assert 'jax' not in sys.modules, 'importing the theory loaded JAX'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("strategy", REPRODUCED)
def test_baselines_reproduce_table1(strategy, dataset):
    cost = _cost(strategy, dataset)
    paper = PAPER_TABLE1[dataset][strategy]
    assert cost["mem_mb"] == pytest.approx(paper["mem_mb"], rel=0.02)
    assert cost["train_flops"] == pytest.approx(paper["train_flops"], rel=0.02)
    assert cost["mem_mb"] == pytest.approx(sum(cost["mem_breakdown_mb"].values()))


@pytest.mark.parametrize("dataset", DATASETS)
def test_lightcl_flops_reproduce_and_its_memory_stays_below_the_paper(dataset):
    cost = _cost("lightcl", dataset)
    paper = PAPER_TABLE1[dataset]["lightcl"]
    assert cost["train_flops"] == pytest.approx(paper["train_flops"], rel=0.02)
    expected = {"cifar10": 85.53, "tinyimagenet": 118.87}[dataset]
    assert cost["mem_mb"] == pytest.approx(expected, abs=0.01)
    assert cost["mem_mb"] < paper["mem_mb"]  # the documented gap
    assert cost["trainable_params"] == 8_393_728 + 512 * PAPER_SETTINGS[dataset]["num_classes"] \
        + PAPER_SETTINGS[dataset]["num_classes"]
    # Kept for backward: stage 4's four conv outputs and its input (stage 3's output).
    side = PAPER_SETTINGS[dataset]["image_size"] // 8
    assert cost["activation_elements_per_sample"] == 4 * 512 * side ** 2 + 256 * (2 * side) ** 2
    assert _cost("finetune", dataset)["activation_elements_per_sample"] == 557_056 * (
        side // 4) ** 2 + 3 * (8 * side) ** 2  # every conv output + the images
    # Without the buffer in task 0 (none exists there in a real run) the run costs less.
    assert cost["train_flops_no_task0_buffer"] < cost["train_flops"]


def test_lightcl_memory_gap_split():
    gap = LIGHTCL_MEM_GAP
    assert gap["gap_mb"]["cifar10"] == pytest.approx(7.27, abs=0.01)
    assert gap["gap_mb"]["tinyimagenet"] == pytest.approx(9.13, abs=0.01)
    assert gap["area_part_mb_at_32"] == pytest.approx(0.62, abs=0.01)
    assert gap["fixed_part_mb"] == pytest.approx(6.65, abs=0.01)
    assert gap["fixed_part_values"] == pytest.approx(1_743_588, abs=1)
    for dataset, scale in (("cifar10", 1), ("tinyimagenet", 4)):
        assert gap["area_part_mb_at_32"] * scale + gap["fixed_part_mb"] == pytest.approx(
            gap["gap_mb"][dataset])


def test_strategy_parts():
    finetune = _cost("finetune", "cifar10")
    assert _cost("sgd", "cifar10") == finetune
    ewc = _cost("ewc", "cifar10")
    assert ewc["mem_breakdown_mb"]["strategy_state"] == finetune["mem_breakdown_mb"]["weights"]
    assert ewc["train_flops"] == finetune["train_flops"]
    assert finetune["mem_breakdown_mb"]["optimizer_state"] == 0.0
    assert finetune["mem_breakdown_mb"]["buffer"] == 0.0
    assert [_cost(s, "cifar10")["samples_per_step"] for s in ("er", "derpp", "lightcl")] == \
        [47, 62, 47]
    er = _cost("er", "cifar10")
    assert er["mem_breakdown_mb"]["buffer"] == 15 * 3 * 32 * 32 * 4 / 2 ** 20
    assert er["train_flops_no_task0_buffer"] == er["train_flops"]  # replay starts in task 0
    derpp = _cost("derpp", "cifar10")
    assert derpp["mem_breakdown_mb"]["stored_features"] == 15 * 10 * 4 / 2 ** 20
    lightcl = _cost("lightcl", "cifar10")
    taps, logits, masks = 4 * 512 * 4 * 4 * 15 * 4, 15 * 10 * 4, 4 * 512
    assert lightcl["mem_breakdown_mb"]["stored_features"] == (taps + logits + masks) / 2 ** 20
    # Other strategies train everything whatever ``freeze`` says.
    assert _cost("er", "cifar10", freeze="stage1") == er
    # A-GEM: ER's FLOPs (the buffer's forward and backward a step), finetune's activations
    # (the two backward passes run one after the other), a second gradient and the images.
    agem, parts = _cost("agem", "cifar10"), finetune["mem_breakdown_mb"]
    assert agem["train_flops"] == er["train_flops"]
    assert agem["mem_breakdown_mb"] == {**parts, "strategy_state": parts["gradients"],
                                        "buffer": er["mem_breakdown_mb"]["buffer"]}
    assert agem["mem_mb"] == pytest.approx(finetune["mem_mb"] + parts["gradients"]
                                           + 15 * 3 * 32 * 32 * 4 / 2 ** 20)


@pytest.mark.parametrize("freeze", ["stem", "stage1", "stage2", "stage3", "all-but-head"])
def test_freezing_costs_less_than_training_everything(freeze):
    full = _cost("lightcl", "cifar10", freeze="none")
    frozen = _cost("lightcl", "cifar10", freeze=freeze)
    assert frozen["mem_mb"] < full["mem_mb"]
    assert frozen["train_flops"] < full["train_flops"]
    assert frozen["mem_breakdown_mb"]["weights"] == full["mem_breakdown_mb"]["weights"]


def test_kept_channels_and_sparse_masks_follow_the_reference():
    assert [kept_channels(64, 0.2), kept_channels(128, 0.2), kept_channels(256, 0.7),
            kept_channels(512, 0.8), kept_channels(7, 0.0), kept_channels(2, 0.2)] == \
        [52, 103, 78, 103, 7, 2]
    rows = {r["name"]: r for r in layer_table(64, 32, 10, sparse=True)}
    assert rows["stem_conv"]["cin"] == 3
    assert rows["stage2_block1/conv1"]["cin"] == rows["stage1_block2/conv2"]["cout"] == 52
    assert rows["stage2_block1/shortcut_conv"]["cin"] == 64  # shortcuts: no input mask
    assert rows["stage2_block2/conv1"]["cin"] == rows["stage2_block1/shortcut_conv"]["cout"]
    assert rows["stage3_block1/conv1"]["cin"] == 103 and rows["stage3_block1/conv1"]["cout"] == 78
    assert rows["head"]["cin"] == 103 and rows["head"]["params"] == 103 * 10 + 10
    assert rows["stage4_block2/conv2"]["params"] == 103 * 103 * 9 + 2 * 103
    assert rows["stage4_block2/conv2"]["activations"] == 103 * 4 * 4


@pytest.mark.parametrize("dataset", DATASETS)
def test_sparse_lightcl_costs_less_than_dense(dataset):
    dense = _cost("lightcl", dataset)
    sparse = _cost("lightcl", dataset, sparse=True)
    assert sparse["params"] < dense["params"]
    assert sparse["trainable_params"] < dense["trainable_params"]
    assert sparse["mem_mb"] < dense["mem_mb"]
    assert sparse["train_flops"] < dense["train_flops"]
    assert [p["phase"] for p in sparse["phases"]] == ["task 0", "tasks 1+"]
    assert sparse["phases"][0]["trainable_blocks"][0] == "stage3_block2"
    assert sparse["mem_mb"] == max(p["mem_mb"] for p in sparse["phases"])
    assert sparse["train_flops"] == pytest.approx(sum(p["train_flops"] for p in sparse["phases"]))
    # The paper's sparse FLOPs: dense count with each conv's MACs x its kept fraction.
    paper = PAPER_TABLE1[dataset]["lightcl_sparse"]["train_flops"]
    assert sparse["train_flops_paper_sparse"] == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="joint"), "unknown strategy 'joint'; known: finetune, ewc, er, derpp, "
                             "lightcl, agem, sgd"),
    (dict(freeze="stage5"), "unknown freeze point 'stage5'; known: none, stem"),
    (dict(strategy="er", sparse=True), "allowed with sparse: lightcl"),
    (dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
    (dict(buffer_size=-1), "buffer_size must be an integer >= 0"),
    (dict(image_size=0), "image_size must be an integer >= 1"),
    (dict(epochs=2.5), "epochs must be an integer >= 1"),
    (dict(train_samples=True), "train_samples must be an integer"),
    (dict(num_tasks=0), "num_tasks must be an integer >= 1"),
    (dict(nf=-4), "nf must be an integer >= 1"),
])
def test_bad_inputs_are_errors(kwargs, match):
    kwargs = {"strategy": "lightcl", **PAPER_SETTINGS["cifar10"], **kwargs}
    with pytest.raises(ValueError, match=match):
        theoretical_cost(kwargs.pop("strategy"), **kwargs)


def test_empty_buffer_lightcl_is_plain_frozen_training():
    cost = _cost("lightcl", "cifar10", buffer_size=0)
    assert cost["samples_per_step"] == 32
    assert cost["mem_breakdown_mb"]["buffer"] == 0
