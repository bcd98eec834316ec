"""`flashu-batch run --limit N`: the first N rows of each task, as job `<job_id>-limit<N>`; the real job's output is
never touched. The cut itself (scheduler/bookkeeping.py cut_key) is checked without Ray first."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app_testkit import cpu_task, job, write_prompts, write_spec
from flashu_batch.app.cli import main
from flashu_batch.jobs.ids import INPUT_ROW, NO_KEY, hash_ids, key_unit, read_key
from flashu_batch.jobs.output import TaskOutput, read_output
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.bookkeeping import cut_key, partition_pass, rows_inside


def input_rows(unit: int, ids: list[str]) -> np.ndarray:
    rows = np.empty(len(ids), INPUT_ROW)
    rows["hash"], rows["key"] = hash_ids(ids), read_key(unit, np.arange(len(ids)))
    return rows


def test_the_limit_cut_keeps_the_first_read_positions_and_drops_the_rest_of_the_last_unit():
    # three units of 3, 0 and 4 rows; "a" repeats at position 2 and "c" (first at 4) at 6
    per_unit = [input_rows(0, ["a", "b", "a"]), input_rows(1, []), input_rows(2, ["c", "d", "c", "e"])]
    rows = np.array([3, 0, 4])
    unread, groups = np.zeros(3, bool), np.zeros(3, np.int64)

    def cut(limit):
        key = cut_key(rows, limit)
        summary, drops = partition_pass(3, 1, False, unread, key, groups, 1, None, None, *per_unit)
        return key, summary, drops

    key, summary, drops = cut(5)  # positions 0..4: a b a | c d
    assert key == read_key(2, 2) and [rows_inside(key, u, int(n)) for u, n in enumerate(rows)] == [3, 0, 2]
    assert summary["distinct"] == 4 and summary["repeats"] == 1 and summary["todo"].tolist() == [2, 0, 2]
    assert [key_unit(k) for k, _ in summary["examples"]] == [0] and drops["key"].tolist() == [read_key(0, 2)]
    key, summary, _ = cut(3)  # a unit boundary: the empty unit and the last do no row
    assert key == read_key(1, 0) and [rows_inside(key, u, int(n)) for u, n in enumerate(rows)] == [3, 0, 0]
    assert summary["distinct"] == 2 and summary["todo"].tolist() == [2, 0, 0]
    key, summary, _ = cut(7)  # the whole input: nothing is cut
    assert key == NO_KEY and summary["distinct"] == 5 and summary["repeats"] == 2


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
