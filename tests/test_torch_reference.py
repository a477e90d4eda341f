"""The PyTorch reference LightCL step: model size, frozen layers, and its loss."""

import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_reference import (build_lightcl_step, make_resnet18,  # noqa: E402
                                         vital_channel_count)

TINY = dict(nf=4, image_size=8, batch_size=8, buffer_size=4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, OpenMP barriers make tiny ops crawl under load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_resnet18_parameter_count():
    model = make_resnet18(nf=64, channels=3, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def _expected_loss(step, x, y):
    """CE + regulation recomputed with plain torch ops, without the step's own code."""
    model = step.model
    lo = step.task_index * step.classes_per_task
    with torch.no_grad():
        logits_b, taps_b = model(step.buffer_x)
        reg = 0.0
        for mask, tap, ref in zip(step.masks, taps_b, step.ref_taps):
            reg += float(((tap - ref)[:, mask] ** 2).sum())  # the vital channels only
        reg += float(((logits_b - step.ref_logits) ** 2).sum())
        logits = model(x)[0][:, lo:lo + step.classes_per_task].double()
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        ce = float(-log_p[torch.arange(len(y)), y - lo].mean())
    return ce + step.beta * reg


def test_step_freezes_stem_to_stage3_and_matches_recomputed_loss():
    step, x, y = build_lightcl_step(**TINY)
    model = step.model
    assert model.training
    assert all(int(m.sum()) == vital_channel_count(m.numel()) for m in step.masks)
    assert ((y >= 2) & (y < 4)).all()
    frozen = {n for n, _ in model.named_parameters() if not n.startswith(("layer4.", "linear."))}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and frozen and trained.isdisjoint(frozen)
    assert trained | frozen == {n for n, _ in model.named_parameters()}
    optimized = {id(p) for g in step.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trained}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(2):  # the 1st step has zero drift; the 2nd has a nonzero regulation term
        expected = _expected_loss(step, x, y)
        loss = step(x, y)
        assert loss == pytest.approx(expected, rel=1e-5), i
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


def test_torch_device_is_checked_before_anything_is_built():
    from benchmarks.torch_reference import torch_device
    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown PyTorch device 'gpu0'"):
        torch_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            torch_device("cuda")
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            build_lightcl_step(**TINY, device="cuda")


def test_steps_built_for_a_device_live_there():
    step, x, y = build_lightcl_step(**TINY, device="cpu")
    assert x.device.type == y.device.type == step.buffer_x.device.type == "cpu"
    assert all(m.device.type == "cpu" for m in step.masks)


def test_bench_vs_torch_refuses_a_device_pytorch_cannot_use(capsys):
    from benchmarks import bench_vs_torch
    with pytest.raises(SystemExit) as exit_info:
        bench_vs_torch.main(["--torch-device", "tpu9"])
    assert exit_info.value.code == 2
    assert "--torch-device: unknown PyTorch device 'tpu9'" in capsys.readouterr().err


def test_bench_vs_torch_report_names_the_environment_and_the_ratios():
    from benchmarks.bench_vs_torch import report
    side = {"median_s": 0.5, "flops": 2e9, "gflop_per_s": 4.0}
    out = {"device": "cpu (cpu)", "torch_version": "9.9", "torch_device": "cpu", "threads": 2,
           "steps": {"full": {"jax": side, "torch": {**side, "median_s": 0.25},
                              "jax_over_torch": 2.0}},
           "matmul_gflop_per_s": {"jax": 100.0, "torch": 90.0}}
    lines = report(out).splitlines()
    assert not any("GLIBC_TUNABLES" in line for line in lines)
    assert lines[3].split() == ["full", "500.0", "250.0", "2.00", "2.0", "4", "2.0", "4"]
    lines = report({**out, "glibc_tunables": "glibc.malloc.hugetlb=1"}).splitlines()
    assert lines[1] == "both ran with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
    assert lines[-1].endswith("JAX 100 GFLOP/s, PyTorch 90 GFLOP/s")


def test_accelerator_check_needs_an_outdir_and_refuses_a_cpu_only_jax(tmp_path):
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accelerator_check.sh")
    usage = subprocess.run(["bash", script], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True,
                            text=True, env=env, cwd=os.path.join(os.path.dirname(script), ".."))
    assert result.returncode != 0
    log = (tmp_path / "out" / "check.log").read_text()
    assert "JAX sees no accelerator" in log
    assert not (tmp_path / "out" / "bench.json").exists()
