"""The ResNet-18's layer groups, blocks, feature taps and freeze points, in plain Python.

Every part of the library that names layers reads the names here: the model
(`lightcl_jax.model.resnet`), freezing (`lightcl_jax.training.step`), the
LP/MS metrics and their freeze rule, the sparse variant, the paper's
accounting (`lightcl_jax.accounting.theory`) and the configuration's
validation. It imports nothing, so the configuration and the CLI can check a
freeze point before JAX loads.
"""

from __future__ import annotations

# Layer groups in network order; parameter paths start with one of these.
LAYER_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")

# Blocks whose outputs the LP/MS metrics compare (stem, every BasicBlock, head), in
# network order; each belongs to the layer group its name starts with.
LAYER_NAMES = ("stem",) + tuple(f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)) + (
    "head",)

# The four last-stage feature maps LightCL regularises (`lightcl_jax.model.resnet`).
TAP_NAMES = (
    "stage4_block1_conv1",
    "stage4_block1_out",
    "stage4_block2_conv1",
    "stage4_block2_out",
)

# Freeze points: name -> the layer groups it freezes, shallowest first. The n-th point
# freezes the first n groups, so a point's position is its depth.
FREEZE_POINTS = {
    "none": (),
    "stem": ("stem",),
    "stage1": ("stem", "stage1"),
    "stage2": ("stem", "stage1", "stage2"),
    "stage3": ("stem", "stage1", "stage2", "stage3"),  # the reference
    "all-but-head": ("stem", "stage1", "stage2", "stage3", "stage4"),
}

# The groups a freeze point may freeze (the head always trains).
FREEZABLE_GROUPS = FREEZE_POINTS["all-but-head"]

# The reference's channel-pruning sparsity per layer group (SPEC section 2, sparse variant).
REFERENCE_SPARSITY = {"stem": 0.2, "stage1": 0.2, "stage2": 0.2, "stage3": 0.7, "stage4": 0.8}


def frozen_groups(freeze: str) -> tuple[str, ...]:
    """The layer groups a freeze point freezes.

    Raises:
      ValueError: unknown freeze point.
    """
    if freeze not in FREEZE_POINTS:
        raise ValueError(f"unknown freeze point {freeze!r}; known: {', '.join(FREEZE_POINTS)}")
    return FREEZE_POINTS[freeze]


def freeze_point_at_depth(depth: int) -> str:
    """The freeze point that freezes the first ``depth`` groups of `FREEZABLE_GROUPS`."""
    return tuple(FREEZE_POINTS)[depth]


def layer_group(path: str) -> str:
    """Maps a parameter path such as ``"stage3_block2/conv1/kernel"`` to its group.

    Raises:
      ValueError: when the path belongs to no group in `LAYER_GROUPS`.
    """
    top = path.split("/", 1)[0]
    matches = [g for g in LAYER_GROUPS if top == g or top.startswith(g + "_")]
    if len(matches) != 1:
        raise ValueError(f"parameter path {path!r} belongs to {len(matches)} layer groups; "
                         f"every path must start with exactly one of {list(LAYER_GROUPS)}")
    return matches[0]
