"""benchmarks.profile_step: op kinds, the shapes it names, a tiny profile, its refusals."""

import pytest

from benchmarks import profile_step

HLO = """
  %p.1 = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %k.2 = f32[3,3,3,8]{3,2,1,0} parameter(1)
  %conv_general_dilated.7 = f32[2,4,4,8]{3,2,1,0} convolution(%p.1, %k.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(ResNet)/stage1_block1/conv1/conv_general_dilated" stack_frame_id=3}
  %transpose_copy_fusion.3 = f32[8,4,4,2]{3,2,1,0} fusion(%conv_general_dilated.7), kind=kLoop, calls=%fused_computation.1
"""


def test_op_kind_and_what_an_op_is():
    assert profile_step.op_kind("transpose_copy_fusion.12") == "transpose_copy_fusion"
    assert profile_step.op_kind("convolution") == "convolution"
    assert profile_step.describe("conv_general_dilated.7", HLO) == (
        "f32[2,4,4,8] <- f32[2,4,4,3] x f32[3,3,3,8]  stage1_block1/conv1")
    assert profile_step.describe("transpose_copy_fusion.3", HLO) == "f32[8,4,4,2]"
    assert profile_step.describe("no_such_op.1", HLO) == ""


def test_a_tiny_profile_has_the_steps_convolutions(capsys):
    assert profile_step.main(["--task", "1", "--nf", "2", "--steps", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "LightCL's frozen-phase step (task 1), nf 2" in out
    assert "the 5 largest ops:" in out and out.count(" ms  ") >= 5
    result = profile_step.profile(0, 2, 1)
    assert result["step_ms"] > 0 and "convolution(" in result["hlo"]
    assert any(name.startswith(("conv", "convolution")) for name in result["ops_ms"])


@pytest.mark.parametrize("argv", [["--nf", "0"], ["--steps", "0"], ["--top", "0"]])
def test_the_cli_refuses_a_bad_setting(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(argv)
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
