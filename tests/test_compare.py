import csv

from experiments import compare


def test_compare_writes_both_tables(tmp_path):
    code = compare.main(["--strategies", "finetune,lightcl", "--seeds", "2", "--epochs", "1",
                         "--nf", "4", "--num-tasks", "2", "--workdir", str(tmp_path),
                         "--no-progress"])
    assert code == 0
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["finetune", "lightcl"]
    markdown = (tmp_path / "table.md").read_text()
    assert "| finetune | - |" in markdown and "| lightcl | 15 |" in markdown
    import json
    runs = [json.load(open(tmp_path / f"lightcl-seed{s}.json")) for s in (0, 1)]
    til = [r["avg_til"] for r in runs]
    lightcl = rows[1]
    assert abs(float(lightcl["til_mean"]) - sum(til) / 2) < 1e-9
    assert abs(float(lightcl["til_std"]) - abs(til[0] - til[1]) / 2) < 1e-9
    # Without pre-training LightCL's task 0 step is finetune's; from task 1 on its
    # frozen step is smaller and cheaper (XLA's figures).
    assert float(lightcl["step_mb"]) == float(rows[0]["step_mb"])
    assert float(lightcl["step_mb_later"]) < float(rows[0]["step_mb_later"])
    assert float(lightcl["train_flops"]) < float(rows[0]["train_flops"])
    for figure in ("accuracy_curve.png", "cost_vs_accuracy.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_unknown_strategies(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--strategies", "finetune,agem", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown strategies ['agem']" in capsys.readouterr().err
