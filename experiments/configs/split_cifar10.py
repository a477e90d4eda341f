"""Split CIFAR-10 as in the paper: 5 tasks x 2 classes, ResNet-18 pre-trained on ImageNet32.

Command (BACKBONE from ``experiments.pretrain`` or ``experiments.convert_torch``;
TFDS_DIR holding ``cifar10`` prepared as array_record)::

    python -m experiments.run --config split_cifar10 --init-from BACKBONE --data-dir TFDS_DIR

The sparse row: add ``--sparse``. Baselines: add ``--strategy er`` (or
``derpp``, ``ewc``, ``finetune``, ``joint``, ...).

Hyperparameters (SPEC section 2): plain SGD lr 0.01, batch 32, 50 epochs per
task, beta 2e-4, buffer 15, vital ratio 0.15, stem + stages 1-3 frozen,
frozen BatchNorm statistics updating as in the reference, nf 64 (the
dataset's default, or the backbone's with ``--init-from``), evaluation on the
reference's 10% holdout, 5 seeds trained together (mean +/- std).

Targets, Table 1 of the paper (5 runs, %): LightCL CIL 55.53, TIL 96.28
(sparse 0.9: CIL 38.31, TIL 86.88); ER CIL 54.44, TIL 92.25; SGD CIL 34.21,
TIL 86.19. Memory 92.8 MB (sparse 25.0 MB), 5.4 x 10^15 FLOPs for the run.
"""

FLAGS = dict(
    strategy="lightcl", dataset="cifar10", num_tasks=5, eval_split="holdout",
    epochs=50, batch_size=32, lr=0.01, freeze="stage3", frozen_bn="update", seeds=5,
    # Each strategy's hyperparameters in this setting (Table 1: buffer 15 for every method
    # with a buffer); the chosen strategy's entry applies.
    strategy_args=dict(lightcl=dict(beta=2e-4, buffer_size=15, ratio=0.15),
                       er=dict(buffer_size=15), derpp=dict(buffer_size=15),
                       agem=dict(buffer_size=15)),
)

# Table 1 (SPEC section 3): what a run of this config stands beside.
PAPER = {"lightcl": {"cil": 55.53, "til": 96.28}, "lightcl_sparse": {"cil": 38.31, "til": 86.88}}
PRETRAINED = True   # the paper's protocol starts from a pre-trained backbone (--init-from)
