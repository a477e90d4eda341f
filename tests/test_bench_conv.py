"""benchmarks.bench_conv: the flat-matmul weight gradient against NumPy, the shapes, the CLI."""

import json

import numpy as np
import pytest

from benchmarks import bench_conv


def _numpy_weight_gradient(x, g):
    """dW[i, j, c, o] = sum over n, h, w of x_padded[n, h + i, w + j, c] * g[n, h, w, o]."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((3, 3, c, g.shape[-1]))
    for i in range(3):
        for j in range(3):
            window = padded[:, i:i + h, j:j + w, :].reshape(-1, c)
            out[i, j] = window.T.astype(np.float64) @ g.reshape(-1, g.shape[-1])
    return out


def test_flat_weight_gradient_is_the_convolution_weight_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    g = rng.normal(size=(2, 5, 4, 2)).astype(np.float32)
    got = np.asarray(bench_conv.flat_weight_gradient(x, g))
    np.testing.assert_allclose(got, _numpy_weight_gradient(x, g), rtol=1e-5, atol=1e-5)


def test_the_shapes_are_resnet18s_3x3_convolutions():
    assert bench_conv.shapes(64) == [(32, 3, 64, 1), (32, 64, 64, 1), (32, 64, 128, 2),
                                     (16, 128, 128, 1),
                                     (16, 128, 256, 2), (8, 256, 256, 1), (8, 256, 512, 2),
                                     (4, 512, 512, 1)]


def test_the_cli_prints_and_writes_every_way(tmp_path, capsys):
    path = tmp_path / "conv.json"
    assert bench_conv.main(["--rounds", "1", "--batch-size", "1", "--nf", "2",
                            "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("jax weight grad, 9 flat matmuls") == 5  # the stride-1 shapes
    payload = json.loads(path.read_text())
    assert [r["size"] for r in payload["results"]] == [32, 32, 32, 16, 16, 8, 8, 4]
    for row in payload["results"]:
        assert {"jax forward", "jax input grad", "jax weight grad"} <= set(row["ms"])
        if row["stride"] == 1:
            assert row["flat_weight_grad_rel_diff"] < 1e-5
        else:
            assert row["flat_weight_grad_rel_diff"] is None


def test_the_cli_refuses_a_bad_setting(capsys):
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench_conv.main(["--rounds", "0"])
