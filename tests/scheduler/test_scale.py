"""The driver's compact id bookkeeping (scheduler/driver.py, jobs/ids.py): the same answers as plain Python sets on a
small multi-unit input with repeated ids, and memory per id bounded at a million ids (bench/scale.py measures 10M)."""

import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flashu_batch.jobs.ids import hash_ids
from flashu_batch.jobs.output import T2I_SCHEMA, TaskOutput
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.driver import committed_mask, index_ids, read_back, repeats_report, scan_ids
from flashu_batch.scheduler.pipeline import Skip, read_rows
from flashu_batch.scheduler.read import plan_reads, read_units


def t2i_task(uri: str, fmt: str, output: str):
    return JobSpec.model_validate(dict(
        job_id="j", model=dict(checkpoint="unused", device="cpu"),
        tasks=[dict(kind="t2i", input=dict(uris=uri, format=fmt), output=output)])).tasks[0]


def commit(output: TaskOutput, ids: list[str]) -> None:
    columns = {f.name: pa.nulls(len(ids), f.type) for f in T2I_SCHEMA}
    output.write_and_commit(pa.table(dict(columns, id=pa.array(ids, pa.string())), schema=T2I_SCHEMA))


def test_bookkeeping_matches_plain_sets_across_files_and_row_groups(ray_session, tmp_path):
    import ray

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
    rows = [r for u in units for r in read_units(pa.Table.from_pylist([u]), "t2i", "parquet", {}, storage).to_pylist()]
    all_ids = [r["id"] for r in rows]
    first_at = {}
    for k, row_id in enumerate(all_ids):
        first_at.setdefault(row_id, k)
    repeats = [k for k, row_id in enumerate(all_ids) if first_at[row_id] != k]
    assert repeats == [2, 6, 10, 12]

    ids = scan_ids(units, task, storage)
    assert ids.unit_starts.tolist() == [0, 3, 6, 9, 12, 13]
    assert ids.hashes.tolist() == sorted(hash_ids(list(first_at)).tolist())
    assert ids.first.tolist() == [first_at[i] for i in sorted(first_at, key=lambda i: hash_ids([i])[0])]
    assert ids.repeats.tolist() == repeats
    report = repeats_report(ids, units, task, storage)
    assert report["rows"] == 4 and [(e["id"], e["source"], e["row"], e["first_source"], e["first_row"])
                                    for e in report["examples"]] == [
        ("a", "in/1.parquet", 2, "in/1.parquet", 0), ("b", "in/1.parquet", 6, "in/1.parquet", 1),
        ("a", "in/2.parquet", 1, "in/1.parquet", 0), ("f", "in/2.parquet", 3, "in/2.parquet", 0)]
    assert report["examples"][3]["message"] == ("id 'f' at in/2.parquet row 3 (from 0) already came at "
                                                "in/2.parquet row 0: this row is skipped, the first one is processed")

    # Commits of earlier runs: "b" and "f" (and "zz", not in the input: ignored)
    output = TaskOutput(storage, str(tmp_path / "out"))
    commit(output, ["b", "zz"])
    commit(output, ["f"])
    done = committed_mask(output, ids.hashes)
    assert {all_ids[p] for p in ids.first[done]} == {"b", "f"}

    # The read stage with the skip set: each distinct uncommitted id once, from its first row
    skip = ray.put(Skip(committed=ids.hashes[done], repeats=ids.repeats, unit_starts=ids.unit_starts))
    read = read_rows(units, "t2i", task.input, storage, skip).take_all()
    expected = {i: rows[k]["prompt"] for i, k in first_at.items() if i not in ("b", "f")}
    assert sorted(r["id"] for r in read) == sorted(expected) and {r["id"]: r["prompt"] for r in read} == expected

    # The exactly-once check's lookup: which ids lack a commit, read back by position
    lacking = np.flatnonzero(~done)
    shown = read_back(units, ids.unit_starts, ids.first[lacking], task, storage)
    assert sorted(r["id"] for r in shown) == sorted(expected)


def traced_peak(fn):
    """(result, peak bytes Python and numpy allocated while fn ran, over what was held before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_memory_per_id_is_bounded_at_a_million_ids(tmp_path):
    n = 1_000_000
    ids = [f"row-{i}" for i in range(n)]
    hashes = hash_ids(ids)
    per_unit = [hashes[a:a + 131_072].copy() for a in range(0, n, 131_072)] + [hashes[:10].copy()]  # 10 repeats
    del hashes

    index, peak = traced_peak(lambda: index_ids(per_unit))
    assert len(index.hashes) == n and index.repeats.tolist() == list(range(n, n + 10))
    # ~41 B/id: the sorted hashes (16) and positions (8) plus one compacted copy of the hashes; a Python list of
    # the id strings alone would be ~90 B/id, and a set of them more
    assert peak < 48 * n, peak

    output = TaskOutput(Storage(), str(tmp_path / "out"))
    for a in range(0, n, 50_000):
        commit(output, ids[a:a + 50_000])
    commit(output, ids[:20_000])  # a re-executed write: 20k ids committed twice
    done, peak = traced_peak(lambda: committed_mask(output, index.hashes))
    assert done.all() and peak < n + (24 << 20), peak  # a bool per id + a window of records (8 MiB) and their ids
    summary, peak = traced_peak(lambda: output.finalize("j", "t2i", "t2i", {}))
    assert summary["rows"] == n and summary["metrics"]["duplicates_removed"] == 20_000
    assert peak < 72 * n, peak  # hashes of all commits, sorted once (the old set of strings: > 150 B/id)
    assert json.loads((tmp_path / "out" / ".flashu/metrics.json").read_text())["rows"] == n
