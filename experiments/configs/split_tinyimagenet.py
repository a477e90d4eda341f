"""Split TinyImageNet as in the paper: 10 tasks x 20 classes at 64x64, ResNet-18 pre-trained.

Command (BACKBONE from ``experiments.pretrain`` or ``experiments.convert_torch``;
FOLDER the unpacked ``tiny-imagenet-200`` folder, prepared for TFDS on first use)::

    python -m experiments.run --config split_tinyimagenet --init-from BACKBONE --data-dir FOLDER

The sparse row: add ``--sparse``.

Hyperparameters (SPEC section 2): plain SGD lr 0.01, batch 32, 100 epochs per
task, beta 2e-4, buffer 15, vital ratio 0.15, stem + stages 1-3 frozen,
frozen BatchNorm statistics updating as in the reference, nf 64 (the
dataset's default, or the backbone's with ``--init-from``), evaluation on the
reference's 10% holdout of train (``--eval-split test``: the labelled val/
images), 5 seeds trained together (mean +/- std).

Targets, Table 1 of the paper (5 runs, %): LightCL CIL 12.79, TIL 37.39
(sparse 0.9: CIL 8.95, TIL 33.94); ER CIL 11.82, TIL 36.76; SGD CIL 10.63,
TIL 34.24. Memory 128.0 MB (sparse 87.1 MB), 8.6 x 10^16 FLOPs for the run.
"""

FLAGS = dict(
    strategy="lightcl", dataset="tinyimagenet", num_tasks=10, eval_split="holdout",
    epochs=100, batch_size=32, lr=0.01, freeze="stage3", frozen_bn="update", seeds=5,
    # Each strategy's hyperparameters in this setting (Table 1: buffer 15 for every method
    # with a buffer); the chosen strategy's entry applies.
    strategy_args=dict(lightcl=dict(beta=2e-4, buffer_size=15, ratio=0.15),
                       er=dict(buffer_size=15), derpp=dict(buffer_size=15),
                       agem=dict(buffer_size=15)),
)

# Table 1 (SPEC section 3): what a run of this config stands beside.
PAPER = {"lightcl": {"cil": 12.79, "til": 37.39}, "lightcl_sparse": {"cil": 8.95, "til": 33.94}}
PRETRAINED = True   # the paper's protocol starts from a pre-trained backbone (--init-from)
