"""The `accord-face` entry point runs the embedded-default smoke end to end."""

import json

from accord_face.cli import main


def test_smoke_writes_sample_and_finite_losses(tmp_path, tiny_pipeline_dir):
    assert main(["smoke", "--out", str(tmp_path), "--pretrained", tiny_pipeline_dir]) == 0
    result = json.loads((tmp_path / "loss_smoke.json").read_text())
    assert (tmp_path / "sample.png").stat().st_size > 0
    assert result["dd_loss"] >= 0 and result["pd_loss"] >= 0
