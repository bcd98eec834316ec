"""`flashu-batch run` with a Hub model id, offline (HF_HUB_OFFLINE=1, a Hub cache in HF_HOME), and with a
checkpoint that does not exist: refused with exit 2 within seconds, before Ray starts."""

import json
import os
import subprocess
import sys
import time

from app_testkit import TINY_SHAPES, cpu_task, job, write_prompts, write_spec
from batch_testkit import hub_cache
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.storage import Storage

CLI = [sys.executable, "-m", "flashu_batch.app.cli"]


def offline_env(hf_home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1")
    return env


def test_a_job_runs_from_a_hub_id_in_an_offline_cache(tmp_path):
    hf_home, commit = hub_cache(str(tmp_path / "hf"), "test-org/tiny-shapes", TINY_SHAPES)
    raw = job("hub", [cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 3), str(tmp_path / "out"))],
              checkpoint="test-org/tiny-shapes")
    spec = write_spec(tmp_path / "job.json", raw)
    result = subprocess.run(CLI + ["run", spec, "--quiet"], env=offline_env(hf_home), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_output(Storage(), str(tmp_path / "out" / "hub" / "t2i")).to_pylist()
    assert sorted(r["id"] for r in rows) == ["r000", "r001", "r002"] and all(r["error"] is None for r in rows)
    settings = json.loads(rows[0]["model"])
    assert settings["checkpoint"] == "test-org/tiny-shapes" and settings["checkpoint_revision"] == commit


def test_a_missing_checkpoint_exits_2_in_seconds_without_starting_ray(tmp_path):
    for checkpoint in (str(tmp_path / "no-such-model"), "test-org/not-in-the-cache"):
        raw = job("gone", [cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 1), str(tmp_path / "out"))],
                  checkpoint=checkpoint)
        spec = write_spec(tmp_path / "job.json", raw)
        start = time.monotonic()
        result = subprocess.run(CLI + ["run", spec], env=offline_env(str(tmp_path / "empty-hf")), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert time.monotonic() - start < 15
        assert "model.checkpoint" in result.stderr and "Traceback" not in result.stderr
        assert "Ray" not in result.stdout + result.stderr.replace("Ray starts", "")  # no Ray was started
        assert not (tmp_path / "out").exists()
