"""XLA's live set at a compiled step's peak, read from its dump (`benchmarks.live`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcl_jax.accounting.compiled import lowered_train_step
from benchmarks.live import parse_dump, peak_live_set, train_step_terms, value_terms
from lightcl_jax.config import Config
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.training.state import create_train_state


def test_peak_of_a_small_program_is_its_four_matrices():
    # sin(a) @ cos(a).T: at the product, a, sin(a), cos(a) and the result are all live.
    a = jnp.ones((256, 256), jnp.float32)
    live = peak_live_set(jax.jit(lambda a: jnp.sin(a) @ jnp.cos(a).T).lower(a))
    assert live.live_bytes == 4 * 256 * 256 * 4
    assert sorted(v.bytes for v in live.values) == [256 * 256 * 4] * 4
    (arg,) = [v for v in live.values if v.role == "argument"]
    assert arg.opcode == "parameter" and arg.shape == (256, 256)
    assert live.packing_bytes == live.step_bytes - live.live_bytes >= 0


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("task_index", [0, 1])
def test_train_step_terms_add_up_to_the_step_and_hold_every_weight_once(task_index):
    config = Config(strategy="lightcl", nf=4, batch_size=8,
                    strategy_args={"buffer_size": 4}).resolved()
    shape, classes = (8, 8, 3), 4
    lowered, phase = lowered_train_step(config, shape, classes, 2, task_index=task_index,
                                        pretrained=True)
    live = peak_live_set(lowered)
    terms = train_step_terms(live)
    assert sum(terms.values()) == live.step_bytes
    model = ResNet18(num_classes=classes, nf=4)
    state = jax.eval_shape(lambda: create_train_state(model, shape, jax.random.PRNGKey(0)))
    # Every weight is live in one form or another (argument, XLA's copy, or its update).
    assert terms["weights"] == _tree_bytes(state.params)
    # x and y (arguments not donated: live throughout), and perhaps the class offset.
    assert terms["training batch"] - (8 * 8 * 8 * 3 * 4 + 8 * 4) in (0, 4)
    assert phase.uses_memory == (terms["memory state"] > 0)
    for value, term in value_terms(live):
        if term == "gradients":  # a backward value with a trained weight's dimensions
            assert "transpose(" in value.op_name
            assert sorted(value.shape) in [sorted(d) for d in live.updated.values()]


def test_parse_dump_refuses_a_folder_without_a_dump(tmp_path):
    with pytest.raises(ValueError, match="no XLA dump file"):
        parse_dump(str(tmp_path), 0)
