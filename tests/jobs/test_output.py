"""jobs/output.py: write-then-commit, dedupe at finalize, readers trust only committed files (local and S3)."""

import json

import pytest

from batch_testkit import task_output, vqa_rows
from flashu_batch.jobs.output import T2I_SCHEMA, VQA_SCHEMA, TaskOutput, read_output
from flashu_batch.jobs.storage import Storage, join


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return task_output(request, tmp_path, "output-test")


rows = vqa_rows  # VQA result rows, some failed


def data_files(output) -> list[str]:
    return [f["uri"] for f in output.storage.list(join(output.root, "data"))]


def test_write_commit_finalize_read(output):
    first = output.write_and_commit(rows(["a", "b"], error_ids={"b"}))
    assert first["committed"] and first["rows"] == 2 and first["errors"] == 1
    assert first["file"].startswith("data/part-") and first["file"].endswith(".parquet")
    output.write_and_commit(rows(["c"]))
    assert output.committed_ids() == {"a", "b", "c"}
    assert sorted(read_output(output.storage, output.root).column("id").to_pylist()) == ["a", "b", "c"]
    summary = output.finalize("job", "vqa", "vqa", {"seconds": 1.0})
    assert summary["rows"] == 3 and summary["errors"] == 1 and len(summary["files"]) == 2
    manifest = json.loads(output.storage.read_bytes(join(output.root, "_SUCCESS")))
    assert manifest["kind"] == "vqa" and "image_sha256: string" in manifest["schema"]
    metrics = json.loads(output.storage.read_bytes(join(output.root, ".flashu/metrics.json")))
    assert metrics["rows"] == 3 and metrics["errors"] == 1 and metrics["seconds"] == 1.0
    table = read_output(output.storage, output.root)
    assert table.schema == VQA_SCHEMA and sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    before = data_files(output)
    output.finalize("job", "vqa", "vqa", {})  # idempotent: no data object written or removed
    assert data_files(output) == before


def test_a_retried_write_of_the_same_rows_cannot_commit_twice(output):
    assert output.write_and_commit(rows(["a", "b"]))["committed"]
    again = output.write_and_commit(rows(["b", "a"]))
    assert not again["committed"]
    assert len(data_files(output)) == 1  # the loser removed its own file


def test_finalize_deduplicates_overlapping_commits(output):
    output.write_and_commit(rows(["a", "b", "c"]))
    output.write_and_commit(rows(["c", "d"]))  # e.g. a commit that landed after a re-run's snapshot
    output.write_and_commit(rows(["a"]))       # fully covered: dropped
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 4 and summary["metrics"]["duplicates_removed"] == 2
    ids = read_output(output.storage, output.root).column("id").to_pylist()
    assert sorted(ids) == ["a", "b", "c", "d"]
    assert len(output.commits()) == 2 and len(data_files(output)) == 2  # superseded files and records removed
    assert output.finalize("job", "vqa", "vqa", {})["rows"] == 4 and len(data_files(output)) == 2


def test_interrupted_rewrite_is_finished_by_the_next_finalize(output):
    output.write_and_commit(rows(["a", "b", "c"]))
    output.write_and_commit(rows(["c", "d"]))
    records = {r["key"]: r for r in output.commits()}
    smaller = next(r for r in records.values() if r["rows"] == 2)
    output._rewrite(smaller, [smaller["ids"].index("c")])  # a finalize that crashed right after rewriting it to "d"
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 4
    assert sorted(read_output(output.storage, output.root).column("id").to_pylist()) == ["a", "b", "c", "d"]


def test_uncommitted_and_missing_files(output):
    output.write_and_commit(rows(["a"]))
    output.write_data(rows(["zzz"]))  # staged, never committed (a crash before the commit)
    gone = output.write_and_commit(rows(["b"]))
    output.storage.delete(join(output.root, gone["file"]))  # a committed file that disappeared
    with pytest.raises(FileNotFoundError):  # an in-progress read never hides a lost committed file
        read_output(output.storage, output.root)
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 1 and summary["metrics"]["missing_files"] == 1
    assert output.committed_ids() == {"a"}  # "b" must run again
    assert read_output(output.storage, output.root).column("id").to_pylist() == ["a"]  # the orphan is never read


def test_empty_and_t2i_schema(tmp_path):
    output = TaskOutput(Storage(), str(tmp_path / "t2i"))
    summary = output.finalize("job", "t2i", "t2i", {})
    assert summary["rows"] == 0 and read_output(output.storage, output.root).schema == T2I_SCHEMA


def test_read_output_with_a_limit_reads_only_the_first_files(output):
    for ids in (["a", "b"], ["c", "d"], ["e", "f"]):
        output.write_and_commit(rows(ids))
    files = sorted(r["file"] for r in output.commits())
    last = join(output.root, files[-1])
    fs, path = output.storage.arrow_fs(last)
    fs.delete_file(path)  # never reached when the first two files hold the limit (a full read would fail)
    limited = read_output(output.storage, output.root, limit=3)
    assert limited.num_rows == 3 and limited.schema == VQA_SCHEMA
    with pytest.raises(FileNotFoundError):
        read_output(output.storage, output.root)


def answers(output) -> dict:
    return {r["id"]: (r["answer"], r["error"]) for r in read_output(output.storage, output.root).to_pylist()}


@pytest.mark.parametrize("old_records", [False, True], ids=["error-ids", "records-without-error-ids"])
def test_a_row_that_succeeded_wins_over_an_error_row_of_the_same_id(output, old_records):
    big = output.write_and_commit(rows(["a", "b", "c"], error_ids={"b", "c"}))  # larger: claims first, as it stands
    output.write_and_commit(rows(["b"]))  # a retry of b that succeeded
    output.write_and_commit(rows(["c"], error_ids={"c"}))  # a retry of c that failed again
    if old_records:  # commit records from before "error_ids": the error rows are found in the data files
        for f in output.storage.list(join(output.root, ".flashu/commits")):
            record = json.loads(output.storage.read_bytes(f["uri"]))
            output.storage.write_bytes(f["uri"], json.dumps({k: v for k, v in record.items()
                                                             if k != "error_ids"}).encode())
    else:
        assert [r["error_ids"] for r in output.commits() if r["file"] == big["file"]] == [["b", "c"]]
    # while the job runs (no manifest yet), readers already prefer the row that succeeded
    assert answers(output) == {"a": ("aa", None), "b": ("ab", None), "c": (None, "bad")}
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 3 and summary["errors"] == 1
    assert answers(output) == {"a": ("aa", None), "b": ("ab", None), "c": (None, "bad")}
    assert big["file"] not in {f["file"] for f in summary["files"]}  # rewritten without b
    assert sorted(i for r in output.commits() for i in r["ids"]) == ["a", "b", "c"]  # one record per id left
    assert [i for r in output.commits() for i in output.error_ids(r)] == ["c"]


def test_a_later_run_commits_the_same_ids_and_a_retried_write_in_one_run_still_cannot(output):
    assert output.write_and_commit(rows(["x", "y"], error_ids={"x", "y"}), run_id="run1")["committed"]
    assert not output.write_and_commit(rows(["y", "x"], error_ids={"x"}), run_id="run1")["committed"]  # a retry
    assert output.write_and_commit(rows(["x", "y"]), run_id="run2")["committed"]  # --retry-errors did them again
    assert not output.write_and_commit(rows(["x", "y"]), run_id="run2")["committed"]  # and retried that write
    assert len(data_files(output)) == 2
    assert answers(output) == {"x": ("ax", None), "y": ("ay", None)}
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 2 and summary["errors"] == 0 and len(data_files(output)) == 1


def test_a_commit_whose_file_a_crash_left_staged_is_read_and_then_published(output):
    rel = output.write_data(rows(["a"]))
    assert data_files(output) == []  # staged: no reader of data/ sees it
    real_move = output.storage.move
    output.storage.move = lambda src, dst: None  # the crash: the record is made, the file is never published
    try:
        assert output.commit(rel, rows(["a"]))["committed"]
    finally:
        output.storage.move = real_move
    assert data_files(output) == [] and read_output(output.storage, output.root).column("id").to_pylist() == ["a"]
    output.finalize("job", "vqa", "vqa", {})
    assert data_files(output) == [join(output.root, rel)]
    assert read_output(output.storage, output.root).column("id").to_pylist() == ["a"]
