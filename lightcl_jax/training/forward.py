"""The model's forward passes as strategies see them: training mode, chaining BatchNorm.

The reference keeps BatchNorm in training mode, so every forward pass -- of
the training batch, of LightCL's buffer, of the batch that scores vital
channels -- folds its batch statistics into the running ones, in call order.
`make_forward` threads them through a `BatchStatsChain`; `make_eval_forward`
runs in evaluation mode and changes nothing. Their ``jitted_`` twins serve the
host (task boundaries, benchmarks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lightcl_jax.model.layers import LAYER_GROUPS, layer_group
from lightcl_jax.model.resnet import fold_statistics


class BatchStatsChain:
    """BatchNorm running statistics threaded through successive train-mode forwards.

    `make_forward` reads ``latest`` and replaces it with what its forward pass
    writes. Layer groups in ``fixed_bn`` are never changed. Use a chain within
    one trace (or on the host); do not let it carry tracers out.
    """

    def __init__(self, batch_stats):
        self.latest = batch_stats


def make_forward(model, chain: BatchStatsChain, fixed_bn: tuple[str, ...]):
    """``forward(params, x, *, start="stem", stop=None, prefix_stats=None)`` in training mode.

    Each call folds its batch statistics into ``chain`` (layer groups in
    ``fixed_bn`` excepted). It returns ``(logits, taps)``, or with ``stop``
    ``(features entering stop, increments)``: ``increments`` are the
    statistics the call folded in, per top-level module. A later call that
    starts at ``stop`` on those features with ``prefix_stats=increments``
    folds the same statistics again for the layers it skips, so together the
    two calls update the running statistics as one forward from the images
    would, without running the prefix again (see `fold_statistics`).
    """
    def forward(params, x, *, start="stem", stop=None, prefix_stats=None):
        stats = chain.latest
        if prefix_stats is not None:
            stats = fold_statistics(stats, prefix_stats)
        if stop is not None:
            # Zeroed running statistics make the update write (1 - momentum) x batch
            # statistic: the increment itself.
            ran = LAYER_GROUPS[LAYER_GROUPS.index(start):LAYER_GROUPS.index(stop)]
            skipped = tuple(k for k in stats
                            if layer_group(k) in ran and layer_group(k) not in fixed_bn)
            zeroed = {k: jax.tree_util.tree_map(jnp.zeros_like, stats[k]) for k in skipped}
            out, updated = model.apply({"params": params, "batch_stats": {**stats, **zeroed}}, x,
                                       train=True, fixed_bn=fixed_bn, start=start, stop=stop,
                                       mutable=["batch_stats"])
            increments = {k: updated["batch_stats"][k] for k in skipped}
            chain.latest = fold_statistics(stats, increments)
            return out, increments
        out, updated = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                   fixed_bn=fixed_bn, start=start, mutable=["batch_stats"])
        chain.latest = updated["batch_stats"]
        return out
    return forward


def make_eval_forward(model):
    """``eval_forward(params, batch_stats, x) -> (logits, taps)`` in evaluation mode."""
    def eval_forward(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return eval_forward


@functools.partial(jax.jit, static_argnames=("model", "fixed_bn", "start", "stop"))
def _train_forward(model, params, batch_stats, x, fixed_bn, start, stop, prefix_stats):
    chain = BatchStatsChain(batch_stats)
    out = make_forward(model, chain, fixed_bn)(params, x, start=start, stop=stop,
                                               prefix_stats=prefix_stats)
    return out, chain.latest


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_forward(model, params, batch_stats, x):
    return make_eval_forward(model)(params, batch_stats, x)


def jitted_eval_forward(model):
    """`make_eval_forward`'s jitted twin for the host."""
    def eval_forward(params, batch_stats, x):
        return _eval_forward(model, params, batch_stats, jnp.asarray(x))
    return eval_forward


def jitted_forward(model, chain: BatchStatsChain, fixed_bn: tuple[str, ...]):
    """`make_forward`'s jitted twin for the host: task boundaries and benchmarks.

    Compiled once per (model, fixed_bn, input shape), whichever chain it serves.
    """
    def forward(params, x, *, start="stem", stop=None, prefix_stats=None):
        out, chain.latest = _train_forward(model, params, chain.latest, jnp.asarray(x), fixed_bn,
                                           start, stop, prefix_stats)
        return out
    return forward
