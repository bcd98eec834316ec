"""`flashu-batch run` and `flashu-batch demo` on the session's Ray, and the shipped example specs."""

import io
import json
import os

import numpy as np
import yaml
from PIL import Image

from flashu_batch.app.cli import main
from flashu_batch.app.demo import EXAMPLES, run_demo
from flashu_batch.jobs.output import read_output
from flashu_batch.app.preview import LINE_HEIGHT, TEXT_LINES, TILE
from flashu_batch.jobs.spec import load_spec
from flashu_batch.jobs.storage import Storage


def test_example_specs_are_valid():
    demo = load_spec(os.path.join(EXAMPLES, "demo.yaml"))
    assert [t.task_name for t in demo.tasks] == ["t2i", "vqa"] and demo.tasks[0].input.uris[0].startswith(EXAMPLES)
    cluster = load_spec(os.path.join(EXAMPLES, "cluster_s3.yaml"))
    assert cluster.model.specialization.vqa.startswith("s3://") and cluster.tasks[0].resources.gpus_per_worker == 1


def test_demo_runs_both_tasks_and_resumes(ray_session, checkpoint, tmp_path, capsys):
    run_demo(str(tmp_path), model=checkpoint)
    printed = capsys.readouterr().out
    assert "job demo: done" in printed and "t2i: 6/6 rows, 1 errors" in printed and "vqa: 4/4 rows, 1 errors" in printed
    t2i = read_output(Storage(), str(tmp_path / "demo" / "t2i"))
    vqa = read_output(Storage(), str(tmp_path / "demo" / "vqa"))
    assert t2i.num_rows == 6 and vqa.num_rows == 4
    assert [r["error"] for r in vqa.to_pylist() if r["id"] == "q-missing"][0].endswith("not_there.png' does not exist")
    sheet = tmp_path / "demo" / "preview.png"
    assert f"contact sheet of the results: {sheet}" in printed
    assert Image.open(sheet).size == (4 * (TILE + 6) + 6, 3 * (TILE + TEXT_LINES * LINE_HEIGHT + 8 + 6) + 6)  # 10 tiles
    run_demo(str(tmp_path), model=checkpoint)
    assert "this run 0 rows" in capsys.readouterr().out


def test_preview_draws_the_committed_rows(ray_session, checkpoint, tmp_path, capsys):
    run_demo(str(tmp_path), model=checkpoint)
    capsys.readouterr()
    root = str(tmp_path / "demo" / "t2i")
    assert main(["preview", root, "--out", str(tmp_path / "t2i.png"), "--limit", "2"]) == 0
    assert "2 rows -> " in capsys.readouterr().out
    sheet = np.asarray(Image.open(tmp_path / "t2i.png"))
    assert sheet.shape == (TILE + TEXT_LINES * LINE_HEIGHT + 8 + 12, 2 * (TILE + 6) + 6, 3)
    # the first tile holds the first committed image, scaled up by a whole factor (nearest neighbour), centred
    first = read_output(Storage(), root).to_pylist()[0]
    image = np.asarray(Image.open(io.BytesIO(first["image"]["bytes"])).convert("RGB"))
    k = TILE // max(image.shape[:2])
    big = image.repeat(k, axis=0).repeat(k, axis=1)
    top, left = 6 + (TILE - big.shape[0]) // 2, 6 + (TILE - big.shape[1]) // 2
    assert np.array_equal(sheet[top:top + big.shape[0], left:left + big.shape[1]], big)
    # an error row's text is drawn in the error colour, the other rows' text is not
    assert main(["preview", str(tmp_path / "demo"), "--out", str(tmp_path / "all.png")]) == 0
    sheet = np.asarray(Image.open(tmp_path / "all.png")).astype(int)
    rows = [r for task in ("t2i", "vqa") for r in read_output(Storage(), str(tmp_path / "demo" / task)).to_pylist()]
    tile_height = TILE + TEXT_LINES * LINE_HEIGHT + 8

    def reddish_text(i):  # pixels near the error ink (the font is anti-aliased) in tile i's text area
        x, y = 6 + (i % 4) * (TILE + 6), 6 + (i // 4) * (tile_height + 6)
        text = sheet[y + TILE:y + tile_height, x:x + TILE]
        return ((text[..., 0] > 120) & (text[..., 1] < 90) & (text[..., 2] < 90)).any()

    assert [reddish_text(i) for i in range(len(rows))] == [bool(r["error"]) for r in rows]
    # nothing committed there: a clear error, no file
    (tmp_path / "empty").mkdir()
    assert main(["preview", str(tmp_path / "empty"), "--out", str(tmp_path / "none.png")]) == 2
    assert "holds no committed task results" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_run_command_prints_progress_and_a_summary(ray_session, checkpoint, tmp_path, capsys):
    with open(os.path.join(EXAMPLES, "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["job_id"], raw["model"]["checkpoint"] = "cli", checkpoint
    raw["tasks"] = [dict(raw["tasks"][0], output=str(tmp_path / "out"),
                         input=dict(uris=os.path.join(EXAMPLES, "t2i_prompts.jsonl"), format="jsonl"),
                         params=dict(steps=2))]
    (tmp_path / "job.json").write_text(json.dumps(raw))
    assert main(["run", str(tmp_path / "job.json")]) == 0
    out = capsys.readouterr().out
    assert "t2i: 6/6 rows, 1 errors" in out and "rows/s" in out and "ETA" in out
    assert f"t2i: 6 rows (1 errors) in 2 files -> {tmp_path / 'out' / 'cli' / 't2i'}" in out
    assert main(["run", str(tmp_path / "job.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ETA" not in out and "this run 0 rows" in out and "6 done before" in out


def test_run_command_connects_to_a_running_cluster(ray_session, checkpoint, tmp_path):
    import subprocess
    import sys

    import ray

    raw = dict(job_id="remote", model=dict(checkpoint=checkpoint, dtype="float32", device="cpu"),
               tasks=[dict(kind="t2i", input=dict(uris=os.path.join(EXAMPLES, "t2i_prompts.jsonl"), format="jsonl"),
                           output=str(tmp_path / "out"), params=dict(steps=2),
                           resources=dict(gpus_per_worker=0, cpus_per_worker=0.5, batch_size=3))])
    (tmp_path / "job.json").write_text(json.dumps(raw))
    address = ray.get_runtime_context().gcs_address
    result = subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", "run", str(tmp_path / "job.json"), "--address",
                             address, "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "t2i: 6 rows (1 errors)" in result.stdout
    assert read_output(Storage(), str(tmp_path / "out" / "remote" / "t2i")).num_rows == 6
