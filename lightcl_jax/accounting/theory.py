"""A training run's memory and FLOPs counted on paper, as Table 1 of LightCL does.

Pure Python (no JAX): the CIFAR ResNet-18 of `lightcl_jax.model.resnet` becomes a table of
layers (`layer_table`), and `theoretical_cost` counts a run from it. MB are MiB (2**20
bytes); every stored number is float32 (4 bytes) except the vital masks (1 byte a channel).

Conventions (they reproduce the paper's SGD, EWC, ER and DER++ memory and FLOPs to within 0.7%
and LightCL's FLOPs to within 1.5%, on both datasets; `PAPER_TABLE1`, tests/test_theory.py):

* Parameters: conv kernels, BN scale + bias (running statistics are state, not
  parameters), the linear head. 11,173,962 at nf=64 and 10 classes.
* MACs: conv ``Cin*Cout*k*k*Hout*Wout``, linear ``in*out``; shortcut convs and the head
  count, BN/ReLU/pooling do not. 555,422,720 a 32x32 sample at nf=64.
* Activations kept for the backward pass: the output of the stem conv and of every 3x3
  conv (the 17 conv+BN+ReLU units of the main path), not the shortcut convs' outputs nor
  the logits, for the trainable layers; plus the input of the first trainable layer, which
  its weight gradient reads (the images when everything trains, stage 3's output when
  LightCL trains stage 4). 557,056 + 3,072 a 32x32 sample for the whole net.
* Memory = weights (all parameters) + gradients (trainable ones) + optimizer state (0:
  plain SGD without momentum) + activations x samples that carry a gradient each step
  (finetune/EWC: batch; ER: batch + buffer; DER++: batch + 2 buffer, its two replayed
  minibatches; LightCL: batch + buffer, its buffer goes through the net every step;
  A-GEM: batch, its memory's forward and backward come after the batch's)
  + the buffer's images + what the strategy stores beside them (DER++: logits; LightCL:
  four reference taps, reference logits, vital masks) + strategy state (EWC: one
  parameter-sized Fisher; online EWC also keeps the anchor parameters, which the paper
  did not count, so neither do we; A-GEM: the memory's gradient, held beside the batch's
  for the projection). Labels are not counted. A-GEM is not in the paper.
* FLOPs: 1 MAC = 2 FLOPs; a sample trained costs its forward pass through the whole net
  plus a backward pass of twice the trainable layers' forward MACs. A run trains
  ``train_samples * epochs`` samples, times samples per step / batch for the replayed
  ones. EWC's Fisher and penalty are not counted, as in the paper. The paper counts
  LightCL's buffer in every task, task 0 included, where a real run has none yet
  (its buffer is built at the start of task 1); ``num_tasks`` adds
  ``train_flops_no_task0_buffer`` without it. ER/DER++ replay from task 0 on; A-GEM's
  memory gradient (a forward and backward of the buffer a step, as ER's replay) is
  counted in every task too, though task 0 has no memory yet (the projection's dot
  products, 4 FLOPs a parameter, are not counted).

LightCL's memory does not reproduce (`LIGHTCL_MEM_GAP`, computed at import): these
conventions give 85.53 MB (CIFAR-10) and 118.87 MB (TinyImageNet) against the paper's 92.8
and 128.0, with the count that matches every other row. The two gaps (7.27 MB at 32x32,
9.13 MB at 64x64) barely grow with the image area: split into a part that scales with it
and a part that does not, the paper counted 0.62 MB more at 32x32 that scales (162,149
float32 values, about the training batch's 32 images, 98,304 values, which a frozen prefix
still has to read) and 6.65 MB that does not (1,743,588 float32 values: parameter-sized,
about a fifth of the 8.4M trained parameters). We found no natural term that gives the
latter; the paper does not say.

Sparse LightCL (``sparse=True``) follows the reference's channel pruning: sparsity 0.2 for
the stem's and stages 1-2's convs, 0.7 for stage 3, 0.8 for stage 4; a conv keeps
``int(C*(1-s)+0.5) + 1`` output channels (the reference's ``>=`` kth-value threshold keeps
one more; C when s = 0); its kept inputs are the kept outputs of the conv before it in
PyTorch's parameter order (a block's conv1 follows the previous block's shortcut conv where
that block has one; shortcut convs keep every input channel; the head's weight columns
follow stage4_block2's conv2, its bias is kept). Parameters, MACs and activations count the
kept channels only; the stored taps stay dense (4 x 8nf channels). From the pre-trained
sparse model, task 0 trains one block more than later tasks (stage3_block2 onward for the
reference's freeze) and has no buffer: memory is the larger of the two phases, FLOPs add
task 0's share (1/num_tasks of the samples; 5 tasks when num_tasks is None) to the later
tasks'. Ours (`PAPER_SETTINGS`, 5 and 10 tasks): 9.7 MB / 1.39e15 FLOPs (CIFAR-10) and
22.3 MB / 2.29e16 (TinyImageNet) against the paper's 25.0 / 2.3e15 and 87.1 / 3.7e16.
The paper's sparse FLOPs are instead reproduced (2.316e15, 3.706e16: +0.7%, +0.2%) by
dense LightCL's count with every conv's MACs times its kept fraction 1 - s (no input mask,
no quirk, buffer in every task), returned as ``train_flops_paper_sparse``. Its memory
counted the same way stays far below the paper's (it cannot reach 87.1 MB at 64x64 when
dense LightCL counts 118.9).
"""

from __future__ import annotations

from lightcl_jax.model.layers import FREEZE_POINTS
from lightcl_jax.model.layers import REFERENCE_SPARSITY as SPARSITY

MIB = 2 ** 20
FLOAT_BYTES = 4
MASK_BYTES = 1

STRATEGIES = ("finetune", "ewc", "er", "derpp", "lightcl", "agem")
ALIASES = {"sgd": "finetune"}

# Table 1 of the paper: Mem in MB and FLOPs of the whole run.
PAPER_TABLE1 = {
    "cifar10": {
        "finetune": {"mem_mb": 153.4, "train_flops": 7.5e15},
        "sgd": {"mem_mb": 153.4, "train_flops": 7.5e15},
        "ewc": {"mem_mb": 196.0, "train_flops": 7.5e15},
        "er": {"mem_mb": 185.4, "train_flops": 11e15},
        "derpp": {"mem_mb": 217.3, "train_flops": 14.5e15},
        "lightcl": {"mem_mb": 92.8, "train_flops": 5.4e15},
        "lightcl_sparse": {"mem_mb": 25.0, "train_flops": 2.3e15},
    },
    "tinyimagenet": {
        "finetune": {"mem_mb": 357.9, "train_flops": 12e16},
        "sgd": {"mem_mb": 357.9, "train_flops": 12e16},
        "ewc": {"mem_mb": 400.5, "train_flops": 12e16},
        "er": {"mem_mb": 485.7, "train_flops": 17.7e16},
        "derpp": {"mem_mb": 613.5, "train_flops": 23.3e16},
        "lightcl": {"mem_mb": 128.0, "train_flops": 8.6e16},
        "lightcl_sparse": {"mem_mb": 87.1, "train_flops": 3.7e16},
    },
}

# The paper's two settings (SPEC sections 2-3): 90% of the training set is trained on.
PAPER_SETTINGS = {
    "cifar10": dict(image_size=32, num_classes=10, batch_size=32, buffer_size=15,
                    train_samples=45000, epochs=50, nf=64, num_tasks=5),
    "tinyimagenet": dict(image_size=64, num_classes=200, batch_size=32, buffer_size=15,
                         train_samples=90000, epochs=100, nf=64, num_tasks=10),
}

CONVENTIONS = (
    "MiB, float32; params incl. BN scale/bias; MACs of convs (shortcuts too) and head, 1 MAC = "
    "2 FLOPs, backward = 2x trainable forward; activations = outputs of stem + 3x3 convs of "
    "trainable layers + input of the first trainable layer, x samples with gradient per step; "
    "plain SGD (no optimizer state); "
    "EWC: one Fisher copy; A-GEM: a second gradient, activations of the batch only; "
    "buffer counted in every task (paper)")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layer_table(nf: int, image_size: int, num_classes: int, channels: int = 3, *,
                sparse: bool = False) -> list[dict]:
    """The CIFAR ResNet-18's layers in PyTorch parameter order, one row each.

    Args:
      nf: width of the first stage.
      image_size: side S of the square input.
      num_classes: outputs of the head.
      channels: input channels.
      sparse: count the reference's pruned channels only (module docstring).

    Returns:
      Rows with ``name`` (parameter path, e.g. ``"stage3_block2/conv1"``), ``group``
      (stem, stage1..4, head), ``block`` (stem, stage3_block2, ..., head), ``kind`` (conv,
      shortcut, linear), ``cin``/``cout`` (kept channels when sparse), ``kernel``,
      ``out_hw`` (output positions), ``params`` (weights + BN scale/bias, or head bias),
      ``macs``, ``activations`` (output elements kept for backward) and ``inputs``
      (input elements) per sample.
    """
    for name, value in (("nf", nf), ("image_size", image_size), ("num_classes", num_classes),
                        ("channels", channels)):
        _check_int(name, value, 1)
    rows = []
    prev_out = channels  # kept outputs of the previous conv in parameter order (sparse)

    def conv(name, group, block, kind, cin, cout, kernel, side, in_side):
        nonlocal prev_out
        if sparse:
            cout = kept_channels(cout, SPARSITY[group])
            cin = cin if kind == "shortcut" else prev_out
            prev_out = cout
        rows.append(dict(name=name, group=group, block=block, kind=kind, cin=cin, cout=cout,
                         kernel=kernel, out_hw=side * side, inputs=cin * in_side * in_side,
                         params=cin * cout * kernel * kernel + 2 * cout,
                         macs=cin * cout * kernel * kernel * side * side,
                         activations=0 if kind == "shortcut" else cout * side * side))

    side = image_size
    conv("stem_conv", "stem", "stem", "conv", channels, nf, 3, side, side)
    cin = nf
    for stage in range(1, 5):
        width = nf * 2 ** (stage - 1)
        for b in (1, 2):
            stride = 2 if (stage > 1 and b == 1) else 1
            block = f"stage{stage}_block{b}"
            block_in, in_side = cin, side
            side = _ceil_div(side, stride)
            conv(f"{block}/conv1", f"stage{stage}", block, "conv", block_in, width, 3, side,
                 in_side)
            conv(f"{block}/conv2", f"stage{stage}", block, "conv", width, width, 3, side, side)
            if stride != 1 or block_in != width:
                conv(f"{block}/shortcut_conv", f"stage{stage}", block, "shortcut", block_in,
                     width, 1, side, in_side)
            cin = width
    features = rows[-1]["cout"] if sparse else cin
    rows.append(dict(name="head", group="head", block="head", kind="linear", cin=features,
                     cout=num_classes, kernel=1, out_hw=1, inputs=features,
                     params=features * num_classes + num_classes,
                     macs=features * num_classes, activations=0))
    return rows


def kept_channels(channels: int, sparsity: float) -> int:
    """Channels the reference's pruning keeps: ``int(C*(1-s)+0.5) + 1`` (at most C), C at s=0."""
    if sparsity <= 0:
        return channels
    return min(channels, int(channels * (1 - sparsity) + 0.5) + 1)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _trainable_blocks(rows, frozen_groups, extra_block):
    blocks = [r["block"] for r in rows]
    trainable = {b for r, b in zip(rows, blocks) if r["group"] not in frozen_groups}
    if extra_block and frozen_groups:
        # Task 0 of sparse LightCL also trains the last block of the frozen prefix.
        trainable.add(max((b for r, b in zip(rows, blocks) if r["group"] in frozen_groups),
                          key=blocks.index))
    return trainable


def _phase(rows, trainable, *, name, share, samples_per_step, batch_size, buffer_bytes,
           stored_bytes, state_bytes, samples_trained, activation_samples=None):
    """Memory and FLOPs of one phase of the run (a set of tasks with one trainable set).

    ``activation_samples``: samples whose activations are alive at once (default: all
    ``samples_per_step``, which go through one forward and backward)."""
    params = sum(r["params"] for r in rows)
    train_rows = [r for r in rows if r["block"] in trainable]
    trainable_params = sum(r["params"] for r in train_rows)
    macs = sum(r["macs"] for r in rows)
    trainable_macs = sum(r["macs"] for r in train_rows)
    # Each trained conv's output, and the input of the first trained layer: its
    # weight gradient reads it (the images when everything trains).
    activations = sum(r["activations"] for r in train_rows) + (
        train_rows[0]["inputs"] if train_rows else 0)
    breakdown = {
        "weights": params * FLOAT_BYTES / MIB,
        "gradients": trainable_params * FLOAT_BYTES / MIB,
        "optimizer_state": 0.0,
        "activations": activations * (activation_samples or samples_per_step) * FLOAT_BYTES
        / MIB,
        "buffer": buffer_bytes / MIB,
        "stored_features": stored_bytes / MIB,
        "strategy_state": state_bytes / MIB,
    }
    flops_per_sample = 2 * (macs + 2 * trainable_macs)
    steps = samples_trained * share / batch_size
    return {
        "phase": name,
        "share": share,
        "trainable_blocks": list(dict.fromkeys(r["block"] for r in train_rows)),
        "params": params,
        "trainable_params": trainable_params,
        "forward_macs_per_sample": macs,
        "trainable_forward_macs_per_sample": trainable_macs,
        "activation_elements_per_sample": activations,
        "samples_per_step": samples_per_step,
        "steps": steps,
        "flops_per_sample": flops_per_sample,
        "train_flops": float(flops_per_sample * samples_per_step * steps),
        "mem_breakdown_mb": breakdown,
        "mem_mb": sum(breakdown.values()),
    }


def theoretical_cost(strategy: str, *, image_size: int, num_classes: int, batch_size: int = 32,
                     buffer_size: int = 15, train_samples: int, epochs: int, nf: int = 64,
                     freeze: str = "stage3", sparse: bool = False, channels: int = 3,
                     num_tasks: int | None = None) -> dict:
    """Memory and FLOPs of a training run, counted as the paper's Table 1 (module docstring).

    Args:
      strategy: one of finetune (alias sgd), ewc, er, derpp, lightcl, agem.
      image_size: side of the square input images.
      num_classes: outputs of the head.
      batch_size: new samples a step.
      buffer_size: samples in the memory buffer (er, derpp, lightcl, agem).
      train_samples: training samples of the whole stream (all tasks).
      epochs: epochs per task.
      nf: width of the first stage.
      freeze: what LightCL freezes (`FREEZE_POINTS`); other strategies train everything.
      sparse: LightCL's channel-pruned variant.
      channels: input channels.
      num_tasks: tasks in the stream; adds ``train_flops_no_task0_buffer`` and sets task 0's
        share for sparse LightCL (5 when None).

    Returns:
      ``mem_mb`` and ``train_flops`` with ``mem_breakdown_mb`` (weights, gradients,
      optimizer_state, activations, buffer, stored_features, strategy_state); the counts
      behind them (``params``, ``trainable_params``, ``forward_macs_per_sample``,
      ``trainable_forward_macs_per_sample``, ``activation_elements_per_sample``,
      ``flops_per_sample`` per sample trained, ``samples_per_step``, ``steps``) of the later
      tasks' phase; ``phases`` (one, or task 0 and later tasks for sparse LightCL, whose
      memory is the larger and FLOPs the sum); ``train_flops_no_task0_buffer`` when
      ``num_tasks`` is given; ``train_flops_paper_sparse`` when sparse (module
      docstring); and ``conventions``.

    Raises:
      ValueError: unknown strategy or freeze point, sparse for a strategy other than
        lightcl, or a count out of range.
    """
    strategy = _checked(strategy, freeze, sparse, batch_size=batch_size, buffer_size=buffer_size,
                        train_samples=train_samples, epochs=epochs, num_tasks=num_tasks)
    rows = layer_table(nf, image_size, num_classes, channels, sparse=sparse)
    frozen = FREEZE_POINTS[freeze] if strategy == "lightcl" else ()
    replayed = REPLAYED[strategy]
    samples = train_samples * epochs
    common = dict(batch_size=batch_size, samples_trained=samples)
    later = dict(name="all tasks", share=1.0, samples_per_step=batch_size + replayed * buffer_size,
                 activation_samples=batch_size if strategy == "agem" else None,
                 **_stored_bytes(strategy, rows, buffer_size=buffer_size, nf=nf,
                                 num_classes=num_classes,
                                 image_bytes=channels * image_size * image_size * FLOAT_BYTES))
    task0 = None
    if sparse:
        tasks = num_tasks or 5
        later.update(name="tasks 1+", share=1 - 1 / tasks)
        task0 = _phase(rows, _trainable_blocks(rows, frozen, True), name="task 0",
                       share=1 / tasks, samples_per_step=batch_size, buffer_bytes=0,
                       stored_bytes=0, state_bytes=0, **common)
    main = _phase(rows, _trainable_blocks(rows, frozen, False), **later, **common)
    phases = [p for p in (task0, main) if p is not None]
    largest = max(phases, key=lambda p: p["mem_mb"])
    result = {k: v for k, v in main.items() if k not in ("phase", "share")}
    result.update(
        strategy=strategy, freeze=freeze if strategy == "lightcl" else "none", sparse=sparse,
        mem_mb=largest["mem_mb"], mem_breakdown_mb=dict(largest["mem_breakdown_mb"]),
        train_flops=float(sum(p["train_flops"] for p in phases)), phases=phases,
        conventions=CONVENTIONS)
    if sparse:
        # The paper's apparent sparse count: dense rows, each conv's MACs x (1 - s).
        dense = [dict(r, macs=r["macs"] * (1 - SPARSITY.get(r["group"], 0.0)))
                 for r in layer_table(nf, image_size, num_classes, channels)]
        result["train_flops_paper_sparse"] = _phase(
            dense, _trainable_blocks(dense, frozen, False), **dict(later, share=1.0),
            **common)["train_flops"]
    if num_tasks is not None:
        flops = result["train_flops"]
        if strategy == "lightcl" and not sparse and replayed * buffer_size:
            # Task 0 trains its batches alone: the buffer is built at the start of task 1.
            task0_flops = main["flops_per_sample"] * samples / num_tasks
            flops = task0_flops + main["train_flops"] * (1 - 1 / num_tasks)
        result["train_flops_no_task0_buffer"] = float(flops)
    return result


# Buffer samples that go through the net with each step's batch, by strategy.
REPLAYED = {"finetune": 0, "ewc": 0, "er": 1, "derpp": 2, "lightcl": 1, "agem": 1}


def _checked(strategy, freeze: str, sparse: bool, **counts) -> str:
    """The canonical strategy name; ValueError for any setting out of range."""
    if not isinstance(strategy, str) or ALIASES.get(strategy, strategy) not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: "
                         f"{', '.join(STRATEGIES + tuple(ALIASES))}")
    strategy = ALIASES.get(strategy, strategy)
    if freeze not in FREEZE_POINTS:
        raise ValueError(f"unknown freeze point {freeze!r}; known: {', '.join(FREEZE_POINTS)}")
    minimum = {"batch_size": 1, "buffer_size": 0, "train_samples": 1, "epochs": 1, "num_tasks": 1}
    for name, value in counts.items():
        if value is not None or name != "num_tasks":
            _check_int(name, value, minimum[name])
    if sparse and strategy != "lightcl":
        raise ValueError(f"sparse is LightCL's variant; strategy {strategy!r} must be run "
                         "with sparse=False (allowed with sparse: lightcl)")
    return strategy


def _stored_bytes(strategy: str, rows: list[dict], *, buffer_size: int, nf: int,
                  num_classes: int, image_bytes: int) -> dict:
    """What a strategy keeps besides the model: buffer images, what is stored beside them
    (DER++: logits; LightCL: taps, logits, vital masks), and its state (EWC: a Fisher;
    A-GEM: a second gradient)."""
    stored_bytes = 0
    if strategy == "derpp":
        stored_bytes = buffer_size * num_classes * FLOAT_BYTES
    elif strategy == "lightcl":
        # Four taps of 8nf channels at stage 4's resolution, stored whole (pruned or not).
        tap_hw = next(r["out_hw"] for r in rows if r["group"] == "stage4")
        stored_bytes = (buffer_size * (4 * 8 * nf * tap_hw + num_classes) * FLOAT_BYTES
                        + 4 * 8 * nf * MASK_BYTES)
    return {"buffer_bytes": buffer_size * image_bytes if REPLAYED[strategy] else 0,
            "stored_bytes": stored_bytes,
            "state_bytes": sum(r["params"] for r in rows) * FLOAT_BYTES
            if strategy in ("ewc", "agem") else 0}


def lightcl_memory_gap() -> dict:
    """LightCL's memory here and in the paper, and the gap split by how it scales.

    Returns:
      ``ours_mb`` and ``gap_mb`` (paper - ours) per dataset of `PAPER_SETTINGS`;
      ``area_part_mb_at_32`` and ``fixed_part_mb``, the solution of
      ``gap = area_part * (S/32)**2 + fixed_part`` on the two datasets, with the same in
      float32 values (``*_values``) and the area part per sample of a step
      (``area_part_values_per_sample``).
    """
    ours = {ds: theoretical_cost("lightcl", **kw)["mem_mb"] for ds, kw in PAPER_SETTINGS.items()}
    gap = {ds: PAPER_TABLE1[ds]["lightcl"]["mem_mb"] - ours[ds] for ds in ours}
    scale = {ds: (kw["image_size"] / 32) ** 2 for ds, kw in PAPER_SETTINGS.items()}
    area = (gap["tinyimagenet"] - gap["cifar10"]) / (scale["tinyimagenet"] - scale["cifar10"])
    fixed = gap["cifar10"] - area * scale["cifar10"]
    kw = PAPER_SETTINGS["cifar10"]
    values = MIB / FLOAT_BYTES
    return {"ours_mb": ours, "gap_mb": gap, "area_part_mb_at_32": area,
            "area_part_values_at_32": area * values,
            "area_part_values_per_sample": area * values / (kw["batch_size"] + kw["buffer_size"]),
            "fixed_part_mb": fixed, "fixed_part_values": fixed * values}


LIGHTCL_MEM_GAP = lightcl_memory_gap()


def reproduction_table() -> str:
    """Ours against the paper's Table 1, every row and both datasets, as plain text."""
    lines = [f"{'dataset':<13}{'row':<16}{'Mem MB':>9}{'paper':>8}{'diff':>8}"
             f"{'FLOPs':>11}{'paper':>10}{'diff':>8}"]
    for dataset, settings in PAPER_SETTINGS.items():
        for row in ("finetune", "ewc", "er", "derpp", "lightcl", "lightcl_sparse"):
            sparse = row == "lightcl_sparse"
            ours = theoretical_cost("lightcl" if sparse else row, sparse=sparse, **settings)
            paper = PAPER_TABLE1[dataset][row]
            lines.append(
                f"{dataset:<13}{row:<16}{ours['mem_mb']:9.1f}{paper['mem_mb']:8.1f}"
                f"{100 * (ours['mem_mb'] / paper['mem_mb'] - 1):+7.1f}%"
                f"{ours['train_flops']:11.3g}{paper['train_flops']:10.3g}"
                f"{100 * (ours['train_flops'] / paper['train_flops'] - 1):+7.1f}%")
            if sparse:
                flops = ours["train_flops_paper_sparse"]
                lines.append(f"{'':13}{'  paper-style':<16}{'':25}{flops:11.3g}"
                             f"{paper['train_flops']:10.3g}"
                             f"{100 * (flops / paper['train_flops'] - 1):+7.1f}%")
    gap = LIGHTCL_MEM_GAP
    lines.append(f"lightcl memory gap (paper - ours): {gap['gap_mb']['cifar10']:.2f} MB at 32x32, "
                 f"{gap['gap_mb']['tinyimagenet']:.2f} MB at 64x64 = "
                 f"{gap['area_part_mb_at_32']:.2f} MB x (S/32)^2 + {gap['fixed_part_mb']:.2f} MB")
    return "\n".join(lines)
