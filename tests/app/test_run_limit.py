"""`flashu-batch run --limit N`: the first N rows of each task, as job `<job_id>-limit<N>`; the real job's output is
never touched. The cut itself (scheduler/driver.py limit_ids) is checked without Ray first."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app_testkit import cpu_task, job, write_prompts, write_spec
from flashu_batch.app.cli import main
from flashu_batch.jobs.ids import hash_ids
from flashu_batch.jobs.output import TaskOutput, read_output
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.driver import index_ids, limit_ids


def test_limit_ids_keeps_the_first_read_positions_and_names_the_rest_of_the_last_unit():
    # three units of 3, 0 and 4 rows; "a" repeats at position 2 and "c" (first at 4) at 6
    per_unit = [hash_ids(["a", "b", "a"]), hash_ids([]), hash_ids(["c", "d", "c", "e"])]
    units = [dict(unit=i) for i in range(3)]
    ids = index_ids(list(per_unit))
    cut, kept, beyond = limit_ids(ids, units, 5)  # positions 0..4: a b a | c d
    assert kept == units and beyond.tolist() == [5, 6]
    assert np.array_equal(cut.hashes, np.sort(hash_ids(["a", "b", "c", "d"])))
    assert sorted(cut.first.tolist()) == [0, 1, 3, 4] and cut.repeats.tolist() == [2]
    assert cut.unit_starts.tolist() == [0, 3, 3, 5] and [pair[0] for pair in cut.examples] == [2]
    cut, kept, beyond = limit_ids(ids, units, 3)  # a unit boundary: the empty unit and the last are not read
    assert kept == units[:1] and beyond.tolist() == [] and cut.unit_starts.tolist() == [0, 3]
    assert np.array_equal(cut.hashes, np.sort(hash_ids(["a", "b"])))
    cut, kept, beyond = limit_ids(ids, units, 7)  # the whole input: nothing changes
    assert cut is ids and kept is units and len(beyond) == 0


def test_limit_runs_the_first_rows_under_a_job_id_of_its_own(ray_module, tmp_path, capsys):
    raw = job("lim", [cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", 5), str(tmp_path / "out"))])
    path = write_spec(tmp_path / "job.json", raw)
    assert main(["run", path, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "out" / "lim-limit2" / "t2i"
    assert "job lim-limit2: done" in out and f"t2i: 2 rows (0 errors) in 1 files -> {root}" in out
    assert sorted(read_output(Storage(), str(root)).column("id").to_pylist()) == ["r000", "r001"]
    metrics = TaskOutput(Storage(), str(root)).metrics()
    assert (metrics["input_rows"], metrics["limit"], metrics["rows_this_run"]) == (2, 2, 2)
    assert os.listdir(tmp_path / "out") == ["lim-limit2"]  # the real job's folder: never made
    # the smoke test resumes as a job of its own; the real job then runs every row, starting over
    assert main(["run", path, "--limit", "2", "--quiet"]) == 0
    assert "this run 0 rows" in capsys.readouterr().out
    assert main(["run", path, "--quiet"]) == 0
    assert "t2i: 5 rows (0 errors)" in capsys.readouterr().out
    assert len(read_output(Storage(), str(root)).column("id")) == 2


def test_limit_cuts_inside_a_unit_and_counts_repeats_before_the_limit(ray_module, tmp_path, capsys):
    folder = tmp_path / "prompts"
    folder.mkdir()  # read order: a.jsonl (a0, a1, a0 again), then b.jsonl
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"p {i}"}) + "\n" for i in
                                            ("a0", "a1", "a0")))
    write_prompts(folder / "b.jsonl", 3, prefix="b")
    table = pa.table({"id": [f"q{i}" for i in range(6)], "prompt": [f"q {i}" for i in range(6)]})
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=3)  # units: rows 0-2, 3-5
    out = str(tmp_path / "out")
    raw = job("cut", [cpu_task("t2i", str(folder), out),
                      cpu_task("t2i", str(tmp_path / "prompts.parquet"), out, fmt="parquet", name="pq")])
    assert main(["run", write_spec(tmp_path / "job.json", raw), "--limit", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 input rows skipped: their id came earlier in the input" in printed
    storage = Storage()
    jsonl_ids = read_output(storage, os.path.join(out, "cut-limit4", "t2i")).column("id").to_pylist()
    assert sorted(jsonl_ids) == ["a0", "a1", "b000"]
    pq_ids = read_output(storage, os.path.join(out, "cut-limit4", "pq")).column("id").to_pylist()
    assert sorted(pq_ids) == ["q0", "q1", "q2", "q3"]
    metrics = TaskOutput(storage, os.path.join(out, "cut-limit4", "t2i")).metrics()
    assert (metrics["input_rows"], metrics["repeated_ids"]["rows"], metrics["rows_this_run"]) == (4, 1, 3)
