"""The parameter-specialization report (flashu/report.py, `flashu-batch specialize --report`)."""

import json
import os
import subprocess
import sys

import torch
from PIL import Image

from flashu_batch.flashu.report import top_k_overlap


def test_overlap_counts_shared_top_k_neurons():
    gen = [torch.arange(10.0), torch.arange(10.0)]
    und = [torch.arange(10.0), -torch.arange(10.0)]  # same order / reversed order
    rows = top_k_overlap(gen, und, ratio=0.5, multiple=1)
    assert [r["kept"] for r in rows] == [5, 5]
    assert rows[0]["overlap"] == 1.0 and rows[1]["overlap"] == 0.0
    assert rows[0]["random_overlap"] == 0.5


def test_report_command_writes_json_and_png(tmp_path):
    from flashu_batch.showo2.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", "specialize", "--report", str(out), "--checkpoint",
                             folder], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(out / "report.json") as f:
        report = json.load(f)
    n_layers = 3
    assert len(report["layers"]) == n_layers
    assert all(0 <= row["overlap"] <= 1 for row in report["layers"])
    assert len(report["layer_importance"]["t2i"]) == len(report["layer_importance"]["vqa"]) == n_layers
    assert all(v >= 0 for v in report["layer_importance"]["vqa"])
    with Image.open(out / "report.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300
    assert os.path.getsize(out / "report.png") > 2000
