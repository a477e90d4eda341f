import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcl_jax import compiler
from lightcl_jax.model import resnet
from lightcl_jax.model.layers import LAYER_GROUPS, TAP_NAMES, layer_group
from lightcl_jax.model.resnet import ResNet18, fresh_head, materialised
from lightcl_jax.training.state import random_variables


def _init(model, shape):
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape), jnp.float32), train=False)


def test_logits_and_tap_shapes():
    model = ResNet18(num_classes=10, nf=4)
    variables = _init(model, (8, 8, 1))
    x = jnp.ones((3, 8, 8, 1), jnp.float32)
    (logits, taps), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_shape(logits, (3, 10))
    assert tuple(taps) == TAP_NAMES
    # 8x8 input, strides 1/2/2/2: last stage at 1x1 with 8*nf channels.
    chex.assert_tree_shape_prefix(taps, (3, 1, 1, 32))
    for tap in taps.values():
        chex.assert_shape(tap, (3, 1, 1, 32))


def test_paper_shapes_at_32x32_and_parameter_count():
    model = ResNet18(num_classes=10, nf=64)
    variables = jax.eval_shape(lambda: _init(model, (32, 32, 3)))
    shapes = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False), variables)
    logits, taps = shapes
    assert logits.shape == (2, 10)
    assert {k: v.shape for k, v in taps.items()} == {k: (2, 4, 4, 512) for k in TAP_NAMES}
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    assert count == 11_173_962  # SPEC: 11.17M parameters at 10 classes


def test_parameter_paths_read_by_stage_and_block():
    params = _init(ResNet18(num_classes=4, nf=4), (8, 8, 3))["params"]
    expected = {"stem_conv", "stem_bn", "head"} | {
        f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)}
    assert set(params) == expected
    assert set(params["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv",
                                            "shortcut_bn"}
    assert set(params["stage1_block1"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert layer_group("stage3_block2/conv1/kernel") == "stage3"
    assert layer_group("stem_bn/scale") == "stem"
    assert layer_group("head/bias") == "head"
    with pytest.raises(ValueError, match="exactly one of"):
        layer_group("decoder/kernel")


def test_fixed_bn_uses_running_statistics_and_rejects_unknown_groups():
    model = ResNet18(num_classes=4, nf=4)
    variables = _init(model, (8, 8, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    _, updated = model.apply(variables, x, train=True, fixed_bn=("stem", "stage1"),
                             mutable=["batch_stats"])
    old, new = variables["batch_stats"], updated["batch_stats"]
    chex.assert_trees_all_equal(old["stem_bn"], new["stem_bn"])
    chex.assert_trees_all_equal(old["stage1_block2"], new["stage1_block2"])
    assert not np.allclose(old["stage2_block1"]["bn1"]["mean"], new["stage2_block1"]["bn1"]["mean"])
    with pytest.raises(ValueError, match="unknown layer groups"):
        model.apply(variables, x, train=True, fixed_bn=("stage9",), mutable=["batch_stats"])
    assert set(LAYER_GROUPS) == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}


def test_random_head_follows_pytorch_default_linear_init():
    params = _init(ResNet18(num_classes=10, nf=4), (8, 8, 1))["params"]
    bound = 1.0 / np.sqrt(32)  # fan_in = 8 * nf
    for leaf in (params["head"]["kernel"], params["head"]["bias"]):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound


def test_fresh_head_is_xavier_uniform_with_zero_bias():
    params = _init(ResNet18(num_classes=10, nf=4), (8, 8, 1))["params"]
    new = fresh_head(params, 10, jax.random.PRNGKey(5))
    kernel = np.asarray(new["head"]["kernel"])
    limit = np.sqrt(6.0 / (32 + 10))  # Xavier-uniform bound for fan_in 32, fan_out 10
    assert kernel.shape == (32, 10) and np.abs(kernel).max() <= limit
    assert not np.allclose(kernel, params["head"]["kernel"])
    np.testing.assert_array_equal(new["head"]["bias"], np.zeros(10))
    chex.assert_trees_all_equal(new["stage4_block2"], params["stage4_block2"])


def test_materialised_is_the_identity_bit_for_bit_and_so_is_its_gradient():
    x = np.array([1.5, -0.0, 0.0, np.inf, -np.inf, np.nan, 3.4e38, -2.0, 1.2e-38], np.float32)
    for fn in (materialised, jax.jit(materialised)):
        got = np.asarray(fn(jnp.asarray(x)))
        np.testing.assert_array_equal(got.view(np.uint32), x.view(np.uint32))
        # a subnormal: XLA:CPU flushes it to zero in any arithmetic (so does the
        # BatchNorm that produces the maps); other backends may keep it
        assert float(fn(jnp.float32(1e-45))) in (0.0, float(np.float32(1e-45)))
    w = np.arange(9, dtype=np.float32) - 4.0
    grad = jax.jit(jax.grad(lambda v: (materialised(v) * w).sum()))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), w)


class _ResNetInits(nn.Module):
    """ResNet18's initialisers (conv kernels, the head's kernel and bias), few layers. The
    head's bias bound, 1/sqrt(12), is no power of two: at LLVM's level 0 that bias comes
    out differently in the last bit (so does ResNet18's), which this test catches."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = resnet._Conv(8, (3, 3), name="conv")(x)
        x = resnet._Conv(12, (3, 3), strides=2, name="conv2")(x)
        return nn.Dense(10, kernel_init=resnet._torch_conv_init,
                        bias_init=resnet._torch_linear_bias_init(12), name="head")(x.mean((1, 2)))


def test_random_variables_cheaper_compile_gives_xla_defaults_values_bit_for_bit():
    # random_variables compiles with LLVM's level 1 (compiler.RUN_ONCE); XLA's default
    # is 3. The tests' XLA_FLAGS set level 0, so the default is asked for explicitly.
    model, key = _ResNetInits(), jax.random.PRNGKey(3)
    got = random_variables(model, (8, 8, 3), key)
    default = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3), jnp.float32), train=False),
                      compiler_options={**compiler.COMPILER_OPTIONS,
                                        "xla_backend_optimization_level": 3})(key)
    chex.assert_trees_all_equal(got, default)  # exactly
    assert np.ptp(np.asarray(got["params"]["head"]["bias"])) > 0  # random, not constant
    # Inside another trace too (JAX refuses compiler options on nested programs), with the
    # key from outside it and made inside it.
    for shapes in (jax.eval_shape(lambda: random_variables(model, (8, 8, 3), key)),
                   jax.eval_shape(lambda: random_variables(model, (8, 8, 3),
                                                           jax.random.PRNGKey(3)))):
        chex.assert_trees_all_equal_shapes_and_dtypes(shapes, got)

