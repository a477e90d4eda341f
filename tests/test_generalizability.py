import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import analyze_layers
from lightcl_jax.config import Config
from lightcl_jax.metrics.generalizability import layer_similarities
from lightcl_jax.metrics.similarity import SIMILARITIES, register_similarity
from lightcl_jax.model.layers import FREEZE_POINTS, LAYER_NAMES
from lightcl_jax.model.resnet import ResNet18, layer_features
from lightcl_jax.training.loop import train_and_evaluate
from test_similarity import _numpy_cka
from test_training import TINY, _tiny_stream, with_strategy


def test_layer_similarities_against_numpy_cka():
    model = ResNet18(num_classes=4, nf=4)
    old = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    new = jax.tree_util.tree_map(
        lambda v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(1), v.shape), old)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(20, 8, 8, 1)).astype(np.float32))
    values = layer_similarities(model, old, new, x, "linear_cka")
    assert list(values) == list(LAYER_NAMES)
    f_old, f_new = layer_features(model, old, x), layer_features(model, new, x)
    for layer in ("stem", "stage3_block2", "head"):
        expected = _numpy_cka(np.asarray(f_old[layer], np.float64),
                              np.asarray(f_new[layer], np.float64))
        np.testing.assert_allclose(values[layer], expected, rtol=1e-3)
    same = layer_similarities(model, old, old, x, "linear_cka")
    np.testing.assert_allclose(list(same.values()), 1.0, rtol=1e-5)
    params_sim = layer_similarities(model, old, old, x, "param_similarity")
    assert set(params_sim.values()) == {1.0}


@pytest.fixture
def constant_similarities():
    register_similarity("always_half", lambda a, b: jnp.asarray(0.5, jnp.float32))
    register_similarity("always_one", lambda a, b: jnp.asarray(1.0, jnp.float32))
    yield
    for name in ("always_half", "always_one"):
        SIMILARITIES.pop(name, None)


def test_registered_metric_flows_through_to_results_and_auto_freeze(constant_similarities):
    stream = _tiny_stream(num_tasks=2)
    config = dataclasses.replace(TINY, layer_metrics="always_half", freeze="auto",
                                 similarity="always_one", freeze_threshold=0.9)
    results = train_and_evaluate(config, stream=stream)
    assert [entry["task"] for entry in results["layer_metrics"]] == [1]
    for entry in results["layer_metrics"]:
        assert entry["layers"] == {layer: {"lp": 0.5, "ms": 0.5} for layer in LAYER_NAMES}
    # Every layer "similar": auto freezes everything but the head, from task 1.
    assert results["freeze_auto"]["chosen"] == "all-but-head"
    assert results["freeze_auto"]["task"] == 1
    assert results["phases"][1]["frozen"] == list(FREEZE_POINTS["all-but-head"])
    assert results["config"]["freeze"] == "auto"
    # Nothing similar enough: auto freezes nothing.
    low = dataclasses.replace(config, similarity="always_half", layer_metrics=None)
    results = train_and_evaluate(low, stream=stream)
    assert results["freeze_auto"]["chosen"] == "none"
    assert results["phases"][1]["frozen"] == [] and "layer_metrics" not in results


def test_auto_freeze_with_cka_picks_a_prefix_and_finetune_never_probes():
    stream = _tiny_stream(num_tasks=2)
    results = train_and_evaluate(dataclasses.replace(TINY, freeze="auto"), stream=stream)
    auto = results["freeze_auto"]
    assert auto["chosen"] in FREEZE_POINTS and auto["similarity"] == "linear_cka_debiased"
    assert results["phases"][1]["frozen"] == list(FREEZE_POINTS[auto["chosen"]])
    lp = [auto["metrics"][layer]["lp"] for layer in LAYER_NAMES]
    assert all(-0.2 <= v <= 1.0 + 1e-6 for v in lp)  # debiased CKA may dip below 0
    finetune = train_and_evaluate(dataclasses.replace(with_strategy(TINY, "finetune"), freeze="auto"),
                                  stream=stream)
    assert finetune["freeze_auto"] is None


def test_bad_similarity_settings_are_refused():
    with pytest.raises(ValueError, match="layer_metrics: unknown similarity 'nope'"):
        Config(layer_metrics="nope").validate()
    with pytest.raises(ValueError, match="freeze_threshold must lie in"):
        Config(freeze_threshold=1.5).validate()


def test_analyze_layers_writes_json_and_figure(tmp_path):
    code = analyze_layers.main(["--epochs", "1", "--nf", "4", "--workdir", str(tmp_path),
                                "--no-progress"])
    assert code == 0
    with open(tmp_path / "layer_metrics.json") as f:
        out = json.load(f)
    assert [e["task"] for e in out["layer_metrics"]] == [1, 2, 3, 4]
    assert set(out["layer_metrics"][0]["layers"]) == set(LAYER_NAMES)
    assert out["auto"]["chosen"] in FREEZE_POINTS
    assert set(out["rule_by_task"].values()) <= set(FREEZE_POINTS)
    with open(tmp_path / "layer_metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
