"""The task's id bookkeeping as Ray work over hash partitions (scheduler/bookkeeping.py, jobs/ids.py): the same
answers as plain Python sets on a small multi-file input with repeated ids, spread over many partitions and unit
groups; per-unit completion (a resume does not read finished units); and a driver whose memory does not grow with
the number of rows (bench/scale.py measures 16M)."""

import gzip
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashu_batch.jobs.ids import INPUT_ROW, hash_ids, index_partition, key_unit, read_key
from flashu_batch.jobs.output import READ_KEY, T2I_SCHEMA, UNITS, TaskOutput
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler import bookkeeping
from flashu_batch.scheduler.bookkeeping import final_pass, index_input, record_units
from flashu_batch.scheduler.driver import read_back, repeats_report
from flashu_batch.scheduler.pipeline import read_rows
from flashu_batch.scheduler.read import plan_reads, read_units


def t2i_task(uri: str, fmt: str, output: str):
    return JobSpec.model_validate(dict(
        job_id="j", model=dict(checkpoint="unused", device="cpu"),
        tasks=[dict(kind="t2i", input=dict(uris=uri, format=fmt), output=output)])).tasks[0]


def commit(output: TaskOutput, ids: list[str], keys: list[int] | None = None) -> None:
    """Commit rows of `ids`, as a pipeline's write stage does (with the read keys of their input rows, if given)."""
    columns = {f.name: pa.nulls(len(ids), f.type) for f in T2I_SCHEMA}
    table = pa.table(dict(columns, id=pa.array(ids, pa.string())), schema=T2I_SCHEMA)
    if keys is not None:
        table = table.append_column(READ_KEY, pa.array(keys, pa.int64()))
    output.write_and_commit(table)


@pytest.fixture
def many_partitions(monkeypatch):
    """A partition per 2 input rows (and as many groups of units, up to one a unit) and 2 read tasks at least: the
    tiny inputs below spread over many tasks."""
    monkeypatch.setattr(bookkeeping, "PARTITION_ROWS", 2)
    monkeypatch.setattr(bookkeeping, "MIN_TASKS", 2)


def test_bookkeeping_matches_plain_sets_across_files_partitions_and_row_groups(ray_session, tmp_path,
                                                                                many_partitions):
    # Two files, row groups of 3 rows: ids repeat within a group, across groups and across files; null ids derive
    ids_a = ["a", "b", "a", "c", None, "d", "b", "e", None]
    ids_b = ["f", "a", "g", "f"]
    (tmp_path / "in").mkdir()
    for name, ids in (("1.parquet", ids_a), ("2.parquet", ids_b)):
        table = pa.table({"id": pa.array(ids, pa.string()), "prompt": [f"{name} row {k}" for k in range(len(ids))]})
        pq.write_table(table, tmp_path / "in" / name, row_group_size=3)
    task, storage = t2i_task(str(tmp_path / "in"), "parquet", str(tmp_path / "out")), Storage()
    units = plan_reads(storage, task.input)
    assert len(units) == 5  # 3 + 2 row groups

    # The reference: every row in read order, read unit by unit without Ray
    per_unit = [read_units(pa.Table.from_pylist([u]), "t2i", "parquet", {}, storage).to_pylist() for u in units]
    keys = [read_key(u, k) for u, rows in enumerate(per_unit) for k in range(len(rows))]
    rows = [r for unit_rows in per_unit for r in unit_rows]
    all_ids = [r["id"] for r in rows]
    first_at = {}
    for k, row_id in enumerate(all_ids):
        first_at.setdefault(row_id, k)
    repeats = [k for k, row_id in enumerate(all_ids) if first_at[row_id] != k]
    assert repeats == [2, 6, 10, 12]

    output = TaskOutput(storage, str(tmp_path / "out"))
    index = index_input(units, task, storage, output)
    assert bookkeeping.partition_count(units, index.unread) == 7 and len(index.input_parts) == 7
    assert index.rows.tolist() == [3, 3, 3, 3, 1] and index.input_rows == 13
    assert index.distinct == len(first_at) and index.repeats == 4 and index.done == 0
    assert index.examples == [(keys[k], keys[first_at[all_ids[k]]]) for k in repeats]
    assert index.todo.tolist() == [2, 3, 2, 2, 0]  # the last unit holds one row: a repeat of "f"
    report = repeats_report(index, task, storage)
    assert report["rows"] == 4 and [(e["id"], e["source"], e["row"], e["first_source"], e["first_row"])
                                    for e in report["examples"]] == [
        ("a", "in/1.parquet", 2, "in/1.parquet", 0), ("b", "in/1.parquet", 6, "in/1.parquet", 1),
        ("a", "in/2.parquet", 1, "in/1.parquet", 0), ("f", "in/2.parquet", 3, "in/2.parquet", 0)]
    assert report["examples"][3]["message"] == ("id 'f' at in/2.parquet row 3 (from 0) already came at "
                                                "in/2.parquet row 0: this row is skipped, the first one is processed")

    # Commits of earlier runs: "b" and "f" (and "zz", not in the input: ignored)
    commit(output, ["b", "zz"])
    commit(output, ["f"])
    index = index_input(units, task, storage, output)
    assert index.done == 2 and index.todo.sum() == len(first_at) - 2

    # The read stage with the skip set: each distinct uncommitted id once, from its first row
    read = read_rows(units, "t2i", task.input, storage, index.skip).take_all()
    expected = {i: rows[k]["prompt"] for i, k in first_at.items() if i not in ("b", "f")}
    assert sorted(r["id"] for r in read) == sorted(expected) and {r["id"]: r["prompt"] for r in read} == expected

    # The exactly-once check: which ids lack a commit, read back by read key
    records, losers, missing, check = final_pass(index, output, 1, report)
    assert check["lacking"] == len(expected) and missing == 0 and len(losers) == 0 and len(records) == 2
    shown = read_back(units, check["examples"], task, storage)
    assert {r["id"] for r in shown} <= set(expected) and len(shown) == 3


def test_index_partition_matches_plain_sets_on_random_ids():
    rng = np.random.default_rng(0)
    ids = [f"id{v}" for v in rng.integers(0, 300, 1000)]
    rows = np.empty(len(ids), INPUT_ROW)
    rows["hash"], rows["key"] = hash_ids(ids), read_key(rng.integers(0, 3), np.arange(len(ids)))
    rows = rows[rng.permutation(len(rows))]  # the parts of a partition come in any order
    found = index_partition(rows, np.empty(0, bookkeeping.COMMIT_ROW))
    first = {}
    for k, i in enumerate(ids):
        first.setdefault(i, k)
    base = int(rows["key"].min())
    assert found["distinct"] == len(first) and found["repeats"] == len(ids) - len(first)
    assert sorted(found["todo_keys"] - base) == sorted(first.values())
    assert found["examples"] == [(base + k, base + first[i]) for k, i in enumerate(ids) if first[i] != k][:5]


def write_jsonl_gz(path, ids: list[str]) -> None:
    path.write_bytes(gzip.compress("".join(json.dumps(dict(id=i, prompt=f"p {i}")) + "\n" for i in ids).encode()))


def test_a_resume_skips_the_units_it_finds_complete_without_reading_them(ray_session, tmp_path, many_partitions):
    (tmp_path / "in").mkdir()
    files = {"1.jsonl.gz": ["a", "b", "c"], "2.jsonl.gz": ["d", "a", "e"], "3.jsonl.gz": ["f", "g"]}
    for name, ids in files.items():
        write_jsonl_gz(tmp_path / "in" / name, ids)
    task, storage = t2i_task(str(tmp_path / "in"), "jsonl", str(tmp_path / "out")), Storage()
    output = TaskOutput(storage, str(tmp_path / "out"))
    # an earlier run finished file 1 and most of file 2 ("a" there repeats)
    commit(output, ["a", "b", "c", "d"], [read_key(0, 0), read_key(0, 1), read_key(0, 2), read_key(1, 0)])
    units = plan_reads(storage, task.input)
    index = index_input(units, task, storage, output)
    assert index.todo.tolist() == [0, 1, 2] and index.complete == [0]
    record_units(index, output, index.complete, repeats_report(index, task, storage))
    assert len(storage.list(str(tmp_path / "out" / UNITS))) == 1

    # File 1 is now unreadable (same size, not gzip): a run that read it would fail the job
    size = (tmp_path / "in" / "1.jsonl.gz").stat().st_size
    (tmp_path / "in" / "1.jsonl.gz").write_bytes(b"\0" * size)
    units = plan_reads(storage, task.input)
    index = index_input(units, task, storage, output)
    assert index.unread.tolist() == [True, False, False] and index.todo.tolist() == [0, 1, 2]
    assert index.done == 4 and index.input_rows == 8  # "d" (file 2) and the 3 ids of file 1, from its record
    assert index.repeats == 1 and index.examples == [(read_key(1, 1), read_key(0, 0))]  # "a": its first is file 1's
    report = repeats_report(index, task, storage)
    assert [(e["id"], e["source"], e["row"], e["first_source"]) for e in report["examples"]] == [
        ("a", "in/2.jsonl.gz", 1, "in/1.jsonl.gz")]
    read = read_rows([dict(u, unit=i) for i, u in enumerate(units) if index.todo[i]], "t2i", task.input, storage,
                     index.skip).take_all()
    assert sorted(r["id"] for r in read) == ["e", "f", "g"]

    # A file rewritten since (another size) is another unit: read again
    write_jsonl_gz(tmp_path / "in" / "1.jsonl.gz", ["a", "b", "c", "h"])
    index = index_input(plan_reads(storage, task.input), task, storage, output)
    assert index.unread.tolist() == [False, False, False] and index.todo.tolist() == [1, 1, 2]


def driver_peak(tmp_path, rows: int) -> int:
    """Peak bytes the driver allocates (Python and numpy) for the index pass and the final pass of a t2i task of
    `rows` rows in 4 Parquet files, half of its ids committed."""
    folder = tmp_path / f"in-{rows}"
    folder.mkdir()
    ids = [f"row-{i}" for i in range(rows)]
    for k in range(4):
        part = ids[k * rows // 4:(k + 1) * rows // 4]
        pq.write_table(pa.table({"id": part, "prompt": ["p"] * len(part)}), folder / f"{k}.parquet",
                       row_group_size=rows // 16)
    task, storage = t2i_task(str(folder), "parquet", str(tmp_path / f"out-{rows}")), Storage()
    output = TaskOutput(storage, str(tmp_path / f"out-{rows}"))
    for a in range(0, rows // 2, 5000):
        commit(output, ids[a:a + 5000])
    units = plan_reads(storage, task.input)
    tracemalloc.start()
    try:
        index = index_input(units, task, storage, output)
        records, losers, missing, check = final_pass(index, output, 1, dict(rows=0, examples=[]))
        assert index.done == rows // 2 and check["lacking"] == rows - rows // 2 and len(records) == rows // 10000
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_driver_holds_nothing_per_row(ray_session, tmp_path):
    small, large = driver_peak(tmp_path, 20_000), driver_peak(tmp_path, 200_000)
    # 10x the rows (and commit records): the driver's own allocations stay within a small constant; the old design
    # held 16-24 bytes per id (3-5 MB more at 200k rows)
    assert large < small + (512 << 10) and large < 4 << 20, (small, large)


def test_partition_work_per_row_is_bounded_at_a_million_ids():
    n = 1_000_000
    rows = np.empty(n + 10, INPUT_ROW)
    rows["hash"] = np.concatenate([hash_ids([f"row-{i}" for i in range(n)]), hash_ids([f"row-{i}" for i in range(10)])])
    rows["key"] = read_key(0, np.arange(n + 10))
    tracemalloc.start()
    try:
        found = index_partition(rows, np.empty(0, bookkeeping.COMMIT_ROW))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found["distinct"] == n and found["repeats"] == 10 and key_unit(found["todo_keys"]).max() == 0
    assert peak < 120 * n, peak  # one partition task's memory: a few copies of its 24-byte rows
