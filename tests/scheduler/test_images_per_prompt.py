"""t2i num_images_per_prompt in jobs: n output rows per input id ('<id>#<k>', jobs/output.py image_id), and the
driver's exactly-once bookkeeping (jobs/ids.py commit_state) counting an input id as done only when all of its n
rows are committed."""

import json

import numpy as np
import pyarrow as pa

from batch_testkit import spec_dict
from flashu_batch.jobs.ids import commit_state, hash_ids
from flashu_batch.jobs.output import (T2I_SCHEMA, TaskOutput, commit_rows, image_id, image_sources, read_output,
                                      task_root)
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.driver import run_job


def test_image_ids_and_their_sources():
    assert image_id("a", 0, 1) == "a" and image_id("a#b", 2, 3) == "a#b#2"
    sources, k = image_sources(["a#0", "a#b#2", "x#3", "y", "z#01", "w#-1", "v#"], 3)
    assert sources[:2] == ["a", "a#b"] and k.tolist() == [0, 2, -1, -1, -1, -1, -1]  # others: not ours for n=3
    assert image_sources(["a#0", "b"], 1)[0] == ["a#0", "b"]  # n = 1: ids are the input ids themselves


def commit(output: TaskOutput, ids: list[str], errors: list[str] | None = None) -> None:
    columns = {f.name: pa.nulls(len(ids), f.type) for f in T2I_SCHEMA}
    columns["error"] = pa.array(errors or [None] * len(ids), pa.string())
    output.write_and_commit(pa.table(dict(columns, id=pa.array(ids, pa.string())), schema=T2I_SCHEMA))


def test_an_input_id_is_committed_once_all_its_images_are(tmp_path):
    output = TaskOutput(Storage(), str(tmp_path / "out"))
    commit(output, ["a#0", "b#0", "a#1"])  # a whole; b half; its other half in the next file, as an error row
    commit(output, ["b#1", "c#1", "d", "zz#0"], errors=["boom", None, None, None])
    hashes = np.sort(hash_ids(["a", "b", "c", "d"]))
    order = {h: i for i, h in enumerate(hash_ids(["a", "b", "c", "d"]))}
    at = lambda mask: [bool(mask[np.searchsorted(hashes, h)]) for h in order]  # noqa: E731  in a, b, c, d order
    def state(n):
        rows = [commit_rows(r, i, n, output.error_ids(r)) for i, r in enumerate(output.iter_commits())]
        return commit_state(np.concatenate(rows), hashes, n)

    committed, succeeded, _ = state(2)
    assert at(committed) == [True, True, False, False]  # c lacks c#0; a bare 'd' is no image of n=2
    assert at(succeeded) == [True, False, False, False]  # b#1 is an error row: b runs again with --retry-errors
    assert at(state(1)[0]) == [False, False, False, True]  # n = 1: the plain ids, as before


def test_a_job_with_two_images_per_prompt_commits_each_once_and_resumes(ray_session, checkpoint, tmp_path):
    prompts = [("a", "a red circle"), ("b", ""), ("c", "a fox"), ("d", "two cats")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(dict(id=i, prompt=p, seed=10 * k)) + "\n"
                                               for k, (i, p) in enumerate(prompts)))
    raw = spec_dict("many", checkpoint, [dict(kind="t2i", input=dict(uris=str(tmp_path / "in.jsonl"),
                                                                     format="jsonl"),
                                              output=str(tmp_path / "out"), rows_per_file=3,
                                              params=dict(steps=2, num_images_per_prompt=2))])
    spec, storage = parse_spec(raw), Storage()
    root = task_root(str(tmp_path / "out"), "many", "t2i")
    # an earlier run that died after committing half of c's images: c runs again, whole
    commit(TaskOutput(storage, root), ["c#0"])
    seen = []
    results = run_job(spec, on_progress=seen.append)
    table = read_output(storage, root)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["a#0", "a#1", "b#0", "b#1", "c#0", "c#1", "d#0", "d#1"] and table.num_rows == 8
    assert [rows[f"a#{k}"]["seed"] for k in (0, 1)] == [0, 1] and [rows[f"d#{k}"]["seed"] for k in (0, 1)] == [30, 31]
    assert [rows[f"d#{k}"]["image_index"] for k in (0, 1)] == [0, 1]
    assert rows["b#0"]["error"] == rows["b#1"]["error"] == "prompt is empty"
    assert rows["c#1"]["error"] is None and rows["c#1"]["image"]["path"] == "c#1.png"
    assert results["t2i"]["rows"] == 8 and results["t2i"]["errors"] == 2
    assert seen[-1].finished and seen[-1].total == 8 and seen[-1].done == 8
    again = run_job(spec)  # every input id has all its rows: nothing runs
    assert again["t2i"]["metrics"]["rows_this_run"] == 0 and again["t2i"]["metrics"]["skipped"] == 8
    assert read_output(storage, root).num_rows == 8
