"""Per-unit completion in real jobs (scheduler/bookkeeping.py): a run records each read unit whose rows are all
committed as it goes, a resume does not read those units at all, and a re-run of a finished job reads nothing,
starts no model actor and writes nothing."""

import gzip
import json
import os
import time

import pytest

from batch_testkit import folder_snapshot, spec_dict
from flashu_batch.jobs.output import UNITS, read_output, task_root
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.driver import run_job

# Two rows to do in each file ("b" repeats in the last): with batches and files of 2 rows, each committed file holds
# the rows of one read unit, so the interrupted run below completes whole units
FILES = {"1.jsonl.gz": ["a", "b"], "2.jsonl.gz": ["c", "d"], "3.jsonl.gz": ["e", "f"], "4.jsonl.gz": ["g", "b", "h"]}


class Interrupted(Exception):
    pass


def unit_records(root: str) -> list[dict]:
    storage = Storage()
    return [json.loads(storage.read_bytes(f["uri"])) for f in storage.list(join(root, UNITS))]


class NoActor:
    """A worker that must never be built."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a model actor was started for a finished job")


def test_a_resume_does_not_read_the_units_a_crashed_run_finished(ray_session, checkpoint, tmp_path):
    (tmp_path / "in").mkdir()
    for name, ids in FILES.items():
        lines = "".join(json.dumps(dict(id=i, prompt=f"a red circle {name} {i}")) + "\n" for i in ids)
        (tmp_path / "in" / name).write_bytes(gzip.compress(lines.encode()))
    task = dict(kind="t2i", input=dict(uris=str(tmp_path / "in"), format="jsonl"), output=str(tmp_path / "out"),
                params=dict(steps=2), rows_per_file=2)
    spec = parse_spec(spec_dict("units", checkpoint, [task]))
    root = task_root(str(tmp_path / "out"), "units", "t2i")

    def crash_after_two_files(progress):  # the driver dies (as on Ctrl-C) once two files are committed
        if progress.done >= 4 and not progress.finished:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run_job(spec, on_progress=crash_after_two_files)
    deadline = time.monotonic() + 60  # the checks the run started finish on the cluster without it
    while len(unit_records(root)) < 2:
        assert time.monotonic() < deadline, unit_records(root)
        time.sleep(0.2)
    done = {r["uri"] for r in unit_records(root)}
    assert len(done) >= 2 and all(r["rows"] == len(FILES[os.path.basename(r["uri"])]) for r in unit_records(root))

    # Those files become unreadable (same size, not gzip): a run that read one would fail the job
    for uri in done:
        size = os.path.getsize(uri)
        with open(uri, "wb") as f:
            f.write(b"\0" * size)
    results = run_job(spec)
    metrics = results["t2i"]["metrics"]
    rows = read_output(Storage(), root).to_pylist()
    assert sorted(r["id"] for r in rows) == list("abcdefgh")  # each id once, "b" from file 1
    assert next(r for r in rows if r["id"] == "b")["prompt"] == "a red circle 1.jsonl.gz b"
    # (writes in flight when the driver died may have committed more than the two files: they count as skipped)
    assert metrics["skipped"] >= 4 and metrics["skipped"] + metrics["rows_this_run"] == 8
    assert metrics["input_rows"] == 9
    assert metrics["repeated_ids"]["rows"] == 1 and len(unit_records(root)) == 4

    # The job is finished: running it again reads no unit, starts no actor, and leaves every byte as it was
    before = folder_snapshot(root)
    again = run_job(spec, worker_classes={"t2i": NoActor})
    assert folder_snapshot(root) == before
    assert again["t2i"]["metrics"]["rows_this_run"] == 0 and again["t2i"]["metrics"]["skipped"] == 8
    assert again["t2i"]["metrics"]["repeated_ids"] == metrics["repeated_ids"]
    assert again["t2i"]["rows"] == 8
