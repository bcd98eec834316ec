"""End to end on real local Ray and a real S3 server process: rows out == rows in, ids unique, re-runs write
nothing new, a job killed midway and re-run ends with every id exactly once, bad rows become error rows."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_testkit import make_bucket, png_bytes, spec_dict
from flashu_batch.jobs.output import T2I_SCHEMA, VQA_SCHEMA, read_output
from flashu_batch.app.run import summary_lines
from flashu_batch.jobs.spec import StorageSpec, parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.driver import run_job

PROMPTS = ["a red circle", "a blue square", "", "a fox in the snow", "two cats"]  # one bad row (empty)


def write_inputs(storage: Storage, base: str) -> dict:
    """t2i: JSONL (5 rows, one empty prompt); vqa: Parquet (bytes, datasets struct, a URI next to the file, a
    missing image, corrupt bytes, a question of the wrong type)."""
    storage.write_bytes(join(base, "prompts.jsonl"), "".join(
        json.dumps({"prompt": p, **({"seed": i} if i == 1 else {})}) + "\n" for i, p in enumerate(PROMPTS)).encode())
    storage.write_bytes(join(base, "images", "red.png"), png_bytes())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "question": ["what color", "what shape", "what is this", "what color", "how many", "q6"],
        "image": pa.array([{"bytes": png_bytes((0, 255, 0)), "path": None},
                           {"bytes": png_bytes((0, 0, 255)), "path": "blue.png"},
                           {"bytes": None, "path": "images/red.png"}, None,
                           {"bytes": b"junk", "path": None}, {"bytes": png_bytes(), "path": None}], image_type),
        "id": ["q1", "q2", "q3", "q4", "q5", "q6"]})
    fs, path = storage.arrow_fs(join(base, "qa.parquet"))
    pq.write_table(table, path, filesystem=fs, row_group_size=4)
    return dict(t2i=join(base, "prompts.jsonl"), vqa=join(base, "qa.parquet"))


def job(job_id, checkpoint, inputs, output, endpoint=None, tasks=("t2i", "vqa")):
    specs = dict(t2i=dict(kind="t2i", input=dict(uris=inputs["t2i"], format="jsonl"), output=output,
                          params=dict(steps=2), rows_per_file=2),
                 vqa=dict(kind="vqa", input=dict(uris=inputs["vqa"], format="parquet"), output=output,
                          params=dict(max_new_tokens=3), rows_per_file=2))
    return parse_spec(spec_dict(job_id, checkpoint, [specs[t] for t in tasks], endpoint))


def data_objects(storage, root) -> list[str]:
    return [f["uri"] for f in storage.list(join(root, "data"))]


def check_outputs(storage, spec, results):
    t2i = read_output(storage, results["t2i"]["output"])
    assert t2i.schema == T2I_SCHEMA and t2i.num_rows == len(PROMPTS)
    assert len(set(t2i.column("id").to_pylist())) == len(PROMPTS)
    rows = {r["prompt"]: r for r in t2i.to_pylist()}
    assert rows[""]["error"] == "prompt is empty" and rows[""]["image"] is None
    assert rows["a blue square"]["seed"] == 1
    for prompt in ("a red circle", "a fox in the snow", "two cats"):
        assert rows[prompt]["error"] is None and rows[prompt]["image"]["bytes"][:4] == b"\x89PNG"
        assert rows[prompt]["image"]["path"] == f"{rows[prompt]['id']}.png" and rows[prompt]["width"] == 64
    vqa = read_output(storage, results["vqa"]["output"])
    assert vqa.schema == VQA_SCHEMA and sorted(vqa.column("id").to_pylist()) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    rows = {r["id"]: r for r in vqa.to_pylist()}
    assert all(rows[i]["error"] is None and isinstance(rows[i]["answer"], str) for i in ("q1", "q2", "q3", "q6"))
    assert rows["q2"]["image_path"] == "blue.png" and rows["q3"]["image_path"].endswith("images/red.png")
    assert rows["q4"]["error"] == "image is missing"
    assert rows["q5"]["error"] == "image could not be decoded (4 bytes): not a recognized image format"
    assert results["t2i"]["rows"] == 5 and results["t2i"]["errors"] == 1 and results["vqa"]["errors"] == 2


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        return Storage(), str(tmp_path), None
    url = request.getfixturevalue("s3_endpoint")
    storage = Storage(StorageSpec(endpoint_url=url, path_style=True))
    return storage, join(make_bucket(url, "jobs"), tmp_path.name), url


def test_both_tasks_end_to_end_then_a_rerun_writes_nothing(ray_session, checkpoint, place):
    storage, base, endpoint = place
    inputs = write_inputs(storage, join(base, "in"))
    spec = job("e2e", checkpoint, inputs, join(base, "out"), endpoint)
    seen = []
    results = run_job(spec, on_progress=seen.append)
    check_outputs(storage, spec, results)
    assert results["t2i"]["output"] == join(base, "out", "e2e", "t2i")
    metrics = json.loads(storage.read_bytes(join(results["vqa"]["output"], ".flashu/metrics.json")))
    assert metrics["rows"] == 6 and metrics["errors"] == 2 and metrics["seconds"] > 0 and metrics["rows_per_s"] > 0
    finals = [p for p in seen if p.finished]
    assert [(p.task, p.done, p.total) for p in finals] == [("t2i", 5, 5), ("vqa", 6, 6)]

    before = {t: data_objects(storage, results[t]["output"]) for t in results}
    again = run_job(spec)
    assert {t: data_objects(storage, again[t]["output"]) for t in again} == before  # zero new data objects
    assert again["t2i"]["metrics"]["rows_this_run"] == 0 and again["t2i"]["metrics"]["skipped"] == 5
    check_outputs(storage, spec, again)


def test_model_from_an_s3_prefix(ray_session, checkpoint, s3_endpoint, tmp_path):
    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "models")
    for root, _, files in os.walk(checkpoint):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), checkpoint)
            with open(os.path.join(root, name), "rb") as f:
                storage.write_bytes(join(bucket, "tiny", rel), f.read())
    inputs = write_inputs(Storage(), str(tmp_path / "in"))
    spec = job("from-s3", join(bucket, "tiny"), inputs, str(tmp_path / "out"), s3_endpoint, tasks=("vqa",))
    results = run_job(spec)
    assert results["vqa"]["rows"] == 6 and results["vqa"]["errors"] == 2


class Crash(Exception):
    pass


def many_prompts(storage, base, n=12) -> dict:
    storage.write_bytes(join(base, "many.jsonl"), "".join(
        json.dumps({"prompt": f"a red circle {i}"}) + "\n" for i in range(n)).encode())
    return dict(t2i=join(base, "many.jsonl"), vqa="")


def check_exactly_once(storage, root, n, results, orphans_allowed=False):
    """Every id once in what readers see; every file `_SUCCESS` lists exists; and (unless orphans_allowed) no other
    data object is left. An in-process driver "crash" leaves the crashed run's in-flight write tasks running in the
    shared test Ray (a real driver death takes them down with it): their late files are orphans no reader sees."""
    ids = read_output(storage, root).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n and results["t2i"]["rows"] == n and results["t2i"]["errors"] == 0
    listed = sorted(f["file"] for f in json.loads(storage.read_bytes(join(root, "_SUCCESS")))["files"])
    present = sorted(u.split(root.rstrip("/") + "/")[-1] for u in data_objects(storage, root))
    assert set(listed) <= set(present) if orphans_allowed else listed == present


def test_a_worker_failing_midway_then_rerun_has_every_id_exactly_once(ray_session, checkpoint, place):
    from flashu_batch.workers import T2IWorker

    class FailingT2IWorker(T2IWorker):  # defined here, so Ray ships it by value to the actor
        batches = 0

        def __call__(self, batch):
            FailingT2IWorker.batches += 1
            if FailingT2IWorker.batches > 3:
                import time
                time.sleep(3)  # the first batches' write tasks commit meanwhile
                raise RuntimeError("injected after 3 batches")  # a builtin: the test module is not importable there
            return super().__call__(batch)

    storage, base, endpoint = place
    spec = job("crash", checkpoint, many_prompts(storage, join(base, "in")), join(base, "out"), endpoint,
               tasks=("t2i",))
    with pytest.raises(Exception, match="injected after 3 batches"):
        run_job(spec, worker_classes={"t2i": FailingT2IWorker})
    root = join(base, "out", "crash", "t2i")
    assert not storage.exists(join(root, "_SUCCESS"))
    partial = read_output(storage, root)  # readers see only committed rows
    assert 0 < partial.num_rows <= 6
    results = run_job(spec)
    assert results["t2i"]["metrics"]["skipped"] == partial.num_rows
    assert results["t2i"]["metrics"]["rows_this_run"] == 12 - partial.num_rows
    check_exactly_once(storage, root, 12, results)


def test_a_driver_killed_midway_then_rerun_has_every_id_exactly_once(ray_session, checkpoint, tmp_path):
    storage = Storage()
    spec = job("driver-crash", checkpoint, many_prompts(storage, str(tmp_path / "in")), str(tmp_path / "out"),
               tasks=("t2i",))

    def crash_after_first_commit(progress):
        if progress.done > 0 and not progress.finished:
            raise Crash("injected in the driver after the first committed file")

    with pytest.raises(Crash):
        run_job(spec, on_progress=crash_after_first_commit)
    root = str(tmp_path / "out" / "driver-crash" / "t2i")
    assert not storage.exists(join(root, "_SUCCESS"))
    check_exactly_once(storage, root, 12, run_job(spec), orphans_allowed=True)


def test_repeated_ids_the_first_row_runs_later_ones_are_reported_and_a_rerun_agrees(ray_session, checkpoint,
                                                                                       tmp_path):
    lines = [{"id": "same", "prompt": "a red circle"}, None, {"id": "other", "prompt": "two cats"},
             {"id": "same", "prompt": "a blue square"}, {"id": "third", "prompt": "a fox"},
             {"id": "same", "prompt": ""}]  # None: a blank line (rows keep their line index)
    (tmp_path / "p.jsonl").write_text("".join((json.dumps(x) if x else "") + "\n" for x in lines))
    spec = job("dupes", checkpoint, dict(t2i=str(tmp_path / "p.jsonl"), vqa=""), str(tmp_path / "out"),
               tasks=("t2i",))
    seen = []
    results = run_job(spec, on_progress=seen.append)
    root = results["t2i"]["output"]
    table = read_output(Storage(), root)
    assert sorted(table.column("id").to_pylist()) == ["other", "same", "third"]  # rows out == distinct ids in
    assert {r["id"]: r["prompt"] for r in table.to_pylist()}["same"] == "a red circle"  # the first row, in read order
    metrics = json.loads((tmp_path / "out" / "dupes" / "t2i" / ".flashu/metrics.json").read_text())
    assert metrics["input_rows"] == 5 and metrics["rows"] == 3 and metrics["rows_this_run"] == 3
    repeated = metrics["repeated_ids"]
    assert repeated["rows"] == 2 and [(e["row"], e["first_row"]) for e in repeated["examples"]] == [(3, 0), (5, 0)]
    assert repeated["examples"][0]["message"] == ("id 'same' at p.jsonl row 3 (from 0) already came at p.jsonl row 0: "
                                                  "this row is skipped, the first one is processed")
    assert seen[-1].line().endswith(", 2 rows with a repeated id skipped") and seen[-1].total == 3
    assert "2 input rows skipped: their id came earlier in the input (first one: id 'same' at p.jsonl row 3" in \
        "\n".join(summary_lines(spec, results))

    before = data_objects(Storage(), root)
    again = run_job(spec)
    assert data_objects(Storage(), root) == before  # nothing redone, nothing duplicated
    assert again["t2i"]["metrics"]["skipped"] == 3 and again["t2i"]["metrics"]["repeated_ids"] == repeated
    assert read_output(Storage(), root).column("id").to_pylist() == table.column("id").to_pylist()


def test_a_bad_spec_fails_before_ray_starts(tmp_path):
    (tmp_path / "bad.yaml").write_text("job_id: j\nmodel: {checkpoint: m}\ntasks:\n"
                                       "  - {kind: t2i, input: {uris: p.jsonl, format: jsonl}, output: out,\n"
                                       "     resources: {workers: 0}}\n")
    code = ("import sys; from app.cli import main; rc = main(sys.argv[1:]); "
            "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "bad.yaml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "tasks[0].resources.workers: Input should be greater than or equal to 1 (got 0)" in result.stderr
    assert "ray not imported" in result.stdout


def test_retry_errors_runs_the_error_rows_again_and_a_success_replaces_each(ray_session, checkpoint, tmp_path):
    """A model that failed on some rows (as a timeout or a passing device error would): a plain re-run keeps their
    error rows (final), --retry-errors runs them again, and each one that succeeds replaces its error row; a row
    that fails again (here: an empty prompt) stays one error row."""
    from flashu_batch.workers import T2IWorker

    class FlakyT2IWorker(T2IWorker):  # defined here, so Ray ships it by value to the actor
        def text_to_image(self, prompts, seeds):
            if any(p.endswith((" 3", " 7")) for p in prompts):
                raise RuntimeError("injected: the device failed")  # a builtin: this module is not importable there
            return super().text_to_image(prompts, seeds)

    storage, base = Storage(), str(tmp_path)
    inputs = many_prompts(storage, base)
    storage.write_bytes(inputs["t2i"], storage.read_bytes(inputs["t2i"]) + b'{"id": "empty", "prompt": ""}\n')
    spec = job("retry", checkpoint, inputs, join(base, "out"), tasks=("t2i",))
    root = join(base, "out", "retry", "t2i")

    def errors() -> dict:
        return {r["id"]: r["error"] for r in read_output(storage, root).to_pylist() if r["error"] is not None}

    first = run_job(spec, worker_classes={"t2i": FlakyT2IWorker})
    failed = errors()
    assert len(failed) == 3 and failed["empty"] == "prompt is empty"
    assert sum("injected: the device failed" in e for e in failed.values()) == 2
    assert first["t2i"]["errors"] == 3

    again = run_job(spec)  # a plain re-run: error rows are final
    assert again["t2i"]["metrics"]["rows_this_run"] == 0 and errors() == failed

    retried = run_job(spec, retry_errors=True)
    m = retried["t2i"]["metrics"]
    assert m["retried_errors"] == 3 and m["skipped"] == 10
    assert m["rows_this_run"] == 3  # exact, retried writes included (tests/scheduler/test_exact_counts.py)
    assert errors() == {"empty": "prompt is empty"}
    assert retried["t2i"]["rows"] == 13 and retried["t2i"]["errors"] == 1
    rows = read_output(storage, root).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 13  # each id once: the replaced error rows are gone
    listed = sorted(f["file"] for f in json.loads(storage.read_bytes(join(root, "_SUCCESS")))["files"])
    assert listed == sorted(u.split(root.rstrip("/") + "/")[-1] for u in data_objects(storage, root))
    assert any("error rows retried" in line for line in summary_lines(spec, retried))
