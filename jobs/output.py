"""The output contract: Parquet schemas and the write-then-commit protocol that makes every row id appear once.

Layout of one task's output, `<output>/<job_id>/<task>/`:

    data/part-<uuid>.parquet   result rows (schema below); written first, invisible until committed
    _commits/<key>.json        create-only commit record: {"file", "ids", "rows", "errors", "error_ids", ...};
                               key = hash of the sorted ids, so a retried write of the same rows cannot commit twice
    _SUCCESS                   manifest written by the driver at the end: the committed files, deduplicated by id
    metrics.json               rows, errors, throughput, seconds of the task

Readers trust `_SUCCESS` when it exists, else the commit records (`read_output`). A data file no record names is
an orphan (a crash between write and commit, or a retry that lost the commit race) and is never read. Where one id
has several committed rows (a re-run with --retry-errors, a race), a row that succeeded wins over an error row.
"""

import hashlib
import json
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flashu_batch.jobs.ids import HASH, first_occurrences, hash_ids
from flashu_batch.jobs.storage import Storage, join

FORMAT = "flashu-batch-output/1"
ORPHAN_GRACE_S = 3600.0  # uncommitted data files younger than this may belong to a write still in flight
HOLD_BEFORE_COMMIT_ENV = "FLASHU_TEST_HOLD_BEFORE_COMMIT"  # test hook: a marker file (see hold_before_commit_hook)

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image layout
T2I_SCHEMA = pa.schema([
    ("id", pa.string()),          # row id (given, or derived from the row's content and position)
    ("prompt", pa.string()),      # the prompt as read
    ("seed", pa.int64()),         # the noise seed used (row's own, or hash of job id + row id)
    ("image", IMAGE_TYPE),        # PNG bytes + "<id>.png"; null on error rows
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model", pa.string()),       # JSON: checkpoint, dtype, specialist artifact and knobs, steps, guidance
    ("latency_s", pa.float64()),  # wall seconds of the model call that produced the row (its whole batch)
    ("error", pa.string()),       # null when the row succeeded, else what went wrong
])
VQA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("question", pa.string()),
    ("image_path", pa.string()),    # the image's URI or datasets `path` as given (null for bare bytes)
    ("image_sha256", pa.string()),  # of the image bytes the model saw
    ("answer", pa.string()),
    ("num_tokens", pa.int32()),     # generated tokens (the end-of-answer token excluded)
    ("model", pa.string()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),
])
SCHEMAS = {"t2i": T2I_SCHEMA, "vqa": VQA_SCHEMA}


def task_root(output: str, job_id: str, task_name: str) -> str:
    return join(output, job_id, task_name)


def ids_key(ids: list[str], run_id: str = "") -> str:
    """A commit record's key: a hash of the sorted ids (and of the run id, for a record of ids an earlier run
    committed)."""
    text = "\n".join(sorted(ids))
    return hashlib.sha256((f"{run_id}\0{text}" if run_id else text).encode()).hexdigest()[:32]


def hold_before_commit_hook(hold_s: float = 600.0) -> None:
    """Fault injection for tests, inert unless FLASHU_TEST_HOLD_BEFORE_COMMIT names a marker file: the first write
    to get here creates the marker and stops between its data file and its commit record, so the test can kill the
    job (driver and Ray) in exactly that window. It never commits: after hold_s it hard-exits. Writes that find the
    marker go on."""
    marker = os.environ.get(HOLD_BEFORE_COMMIT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    time.sleep(hold_s)
    os._exit(75)


class TaskOutput:
    """One task's output folder and its commit protocol."""

    def __init__(self, storage: Storage, root: str):
        self.storage, self.root = storage, root

    # ---- write side (runs in Ray tasks) ---------------------------------------------------------------------------

    def write_and_commit(self, table: pa.Table, run_id: str = "") -> dict:
        """Write one data file, then create its commit record. Returns {"file", "rows", "errors", "committed"};
        committed=False when this run committed the same ids before (a retried write): the new file is removed.
        Where an earlier run committed them (error rows that a --retry-errors run did again), the rows get a record
        of their own, keyed with the run id, and finalize keeps the better row of each id."""
        ids = table.column("id").to_pylist()
        assert len(set(ids)) == len(ids) and None not in ids, f"a data file needs unique non-null ids, got {ids[:5]}"
        rel = f"data/part-{uuid.uuid4().hex}.parquet"
        fs, path = self.storage.arrow_fs(join(self.root, rel))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        hold_before_commit_hook()  # tests only: inert unless FLASHU_TEST_HOLD_BEFORE_COMMIT is set
        error_ids = error_ids_of(table)
        errors = len(error_ids)
        record = dict(format=FORMAT, file=rel, ids=ids, rows=len(ids), errors=errors, error_ids=error_ids,
                      run_id=run_id, created_unix=time.time())
        payload, key = json.dumps(record).encode(), ids_key(ids)
        committed = self.storage.create(join(self.root, "_commits", f"{key}.json"), payload)
        if not committed and self.record_run_id(key) != run_id:
            committed = self.storage.create(join(self.root, "_commits", f"{ids_key(ids, run_id)}.json"), payload)
        if not committed:
            self.storage.delete(join(self.root, rel))
        return dict(file=rel, rows=len(ids), errors=errors, committed=committed)

    def record_run_id(self, key: str) -> str | None:
        """The run that created commit record `key` (None if it is gone)."""
        try:
            return json.loads(self.storage.read_bytes(join(self.root, "_commits", f"{key}.json"))).get("run_id", "")
        except FileNotFoundError:
            return None

    # ---- driver side ----------------------------------------------------------------------------------------------

    def commits(self) -> list[dict]:
        """Every commit record, each with its own "key"."""
        return list(self.iter_commits())

    def iter_commits(self, slice_bytes: int = 8 << 20):
        """The commit records one at a time, read about `slice_bytes` of them at once: all of them together hold
        every id of the task, gigabytes as Python strings at millions of rows."""
        listing = [f for f in self.storage.list(join(self.root, "_commits")) if f["uri"].endswith(".json")]
        for part in _slices(listing, slice_bytes):
            for f, data in zip(part, self.storage.read_many([f["uri"] for f in part])):
                record = json.loads(data)
                record["key"] = f["uri"].rsplit("/", 1)[-1][: -len(".json")]
                yield record

    def committed_ids(self) -> set[str]:
        return {i for record in self.commits() for i in record["ids"]}

    def error_ids(self, record: dict) -> list[str]:
        """The ids of a commit record's error rows. Records written before "error_ids" existed name only their
        count: those are read from the data file (its id and error columns), and a file that is gone has none."""
        if "error_ids" in record:
            return record["error_ids"]
        if not record["errors"]:
            return []
        fs, path = self.storage.arrow_fs(join(self.root, record["file"]))
        try:
            return error_ids_of(pq.read_table(path, filesystem=fs, columns=["id", "error"]))
        except FileNotFoundError:
            return []

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(join(self.root, "_SUCCESS")))
        except FileNotFoundError:
            return None

    def finalize(self, job_id: str, task_name: str, kind: str, metrics: dict) -> dict:
        """Deduplicate the commits by id, write `_SUCCESS` (the manifest) and `metrics.json`, remove superseded
        and orphaned files. Idempotent: on a clean state it rewrites the same manifest and writes no data file."""
        # 1. Finish an interrupted earlier finalize: records replaced by a rewrite go away. Each record keeps its ids
        #    as 16-byte hashes (jobs/ids.py), not strings: a task may have millions.
        records = [dict(r, ids=None, error_ids=None, hashes=hash_ids(r["ids"]),
                        failed=failed_mask(r["ids"], self.error_ids(r))) for r in self.iter_commits()]
        replaced = {k for r in records for k in r.get("replaces", [])}
        for r in records:
            if r["key"] in replaced:
                self.storage.delete(join(self.root, "_commits", f"{r['key']}.json"))
        records = [r for r in records if r["key"] not in replaced]

        # 2. A record whose data file is gone cannot be trusted: drop it (its ids run again on the next run)
        data_files = {f["uri"].split(self.root.rstrip("/") + "/", 1)[-1]: f for f in
                      self.storage.list(join(self.root, "data"))}
        missing = [r for r in records if r["file"] not in data_files]
        for r in missing:
            self.storage.delete(join(self.root, "_commits", f"{r['key']}.json"))
        records = [r for r in records if r["file"] in data_files]

        # 3. Each id once: rows that succeeded claim their ids before error rows, and within each, larger files
        #    first; a file with some ids claimed elsewhere is rewritten without them (new file + record that
        #    `replaces` the old one), a file with all of them claimed is dropped
        records.sort(key=lambda r: (-r["rows"], r["key"]))
        claims, at = np.empty(sum(len(r["hashes"]) for r in records), HASH), 0  # all ids, in claiming order
        failed = np.concatenate([np.zeros(0, bool)] + [r.pop("failed") for r in records])
        for r in records:  # each record's hashes go as they are copied: one copy of them at a time
            hashes = r.pop("hashes")
            claims[at:at + len(hashes)], at = hashes, at + len(hashes)
        claim_order = None
        if failed.any():  # error rows claim last (a stable reordering: the first claim is the earliest position)
            claim_order = np.concatenate([np.flatnonzero(~failed), np.flatnonzero(failed)])
            claims = claims[claim_order]
        order, first = first_occurrences(claims)
        fresh = np.empty_like(first)
        fresh[order] = first  # True where the id's first claim is this one
        if claim_order is not None:
            fresh[claim_order] = fresh.copy()  # back to the records' order
        del claims, order, first, failed, claim_order
        keep, superseded, at = [], [], 0
        for r in records:
            mine, at = fresh[at:at + r["rows"]], at + r["rows"]
            if mine.all():
                keep.append(r)
            elif mine.any():
                ids = json.loads(self.storage.read_bytes(join(self.root, "_commits", f"{r['key']}.json")))["ids"]
                keep.append(self._rewrite(r, {i for i, m in zip(ids, mine) if m}))
                superseded.append(r)
            else:
                superseded.append(r)

        # 4. The manifest, then the metrics, then cleanup (a crash before cleanup is finished by step 1 next time)
        files = sorted(({"file": r["file"], "rows": r["rows"], "errors": r["errors"]} for r in keep),
                       key=lambda f: f["file"])
        manifest = dict(format=FORMAT, job_id=job_id, task=task_name, kind=kind, rows=sum(f["rows"] for f in files),
                        errors=sum(f["errors"] for f in files), files=files,
                        schema=[f"{field.name}: {field.type}" for field in SCHEMAS[kind]])
        self.storage.write_bytes(join(self.root, "_SUCCESS"), json.dumps(manifest, indent=1).encode())
        metrics = dict(metrics, rows=manifest["rows"], errors=manifest["errors"], files=len(files),
                       duplicates_removed=sum(r["rows"] for r in records) - manifest["rows"],
                       missing_files=len(missing))
        self.storage.write_bytes(join(self.root, "metrics.json"), json.dumps(metrics, indent=1).encode())
        for r in superseded:
            self.storage.delete(join(self.root, "_commits", f"{r['key']}.json"))
        kept_files, superseded_files = {f["file"] for f in files}, {r["file"] for r in superseded}
        now = time.time()
        for rel, f in data_files.items():
            stale = f["mtime"] is None or now - f["mtime"] > ORPHAN_GRACE_S
            if rel not in kept_files and (rel in superseded_files or stale):
                self.storage.delete(f["uri"])
        return dict(manifest, metrics=metrics)

    def _rewrite(self, record: dict, fresh: set[str]) -> dict:
        fs, path = self.storage.arrow_fs(join(self.root, record["file"]))
        table = pq.read_table(path, filesystem=fs)
        table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(fresh), pa.string())))
        rel = f"data/part-{uuid.uuid4().hex}.parquet"
        fs, path = self.storage.arrow_fs(join(self.root, rel))
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        ids, error_ids = table.column("id").to_pylist(), error_ids_of(table)
        new = dict(format=FORMAT, file=rel, ids=ids, rows=len(ids), errors=len(error_ids), error_ids=error_ids,
                   run_id="finalize", created_unix=time.time(), replaces=[record["key"]])
        key = ids_key(ids)
        self.storage.create(join(self.root, "_commits", f"{key}.json"), json.dumps(new).encode())
        return dict(new, key=key)


def error_ids_of(table: pa.Table) -> list[str]:
    """The ids of a result table's error rows, in order."""
    return table.filter(pc.is_valid(table.column("error"))).column("id").to_pylist()


def failed_mask(ids: list[str], error_ids: list[str]) -> np.ndarray:
    """(len(ids),) bool: True at the ids that are error rows."""
    if not error_ids:
        return np.zeros(len(ids), bool)
    failed = set(error_ids)
    return np.fromiter((i in failed for i in ids), bool, len(ids))


def _slices(files: list[dict], max_bytes: int):
    """Consecutive runs of a listing, each of at most `max_bytes` (or a single larger file)."""
    part, size = [], 0
    for f in files:
        if part and size + (f["size"] or 0) > max_bytes:
            yield part
            part, size = [], 0
        part.append(f)
        size += f["size"] or 0
    if part:
        yield part


def read_output(storage: Storage, root: str, limit: int | None = None) -> pa.Table:
    """A task's committed rows: the files `_SUCCESS` lists, or (for a job still running or interrupted) the files
    the commit records name, deduplicated by id. Orphan data files are never read. With `limit`, only the first
    files, until they hold that many rows, are read, and the first `limit` rows returned."""
    out = TaskOutput(storage, root)
    manifest = out.manifest()
    if manifest is not None:
        files = [f["file"] for f in manifest["files"]]
        kind = manifest["kind"]
    else:
        files = sorted({r["file"] for r in out.commits()})
        kind = None
    tables = []
    for rel in files:
        if limit is not None and sum(t.num_rows for t in tables) >= limit:
            break
        fs, path = storage.arrow_fs(join(root, rel))
        tables.append(pq.read_table(path, filesystem=fs))
    if not tables:
        return SCHEMAS[kind].empty_table() if kind else pa.table({"id": pa.array([], pa.string())})
    table = pa.concat_tables(tables)
    if manifest is None:  # an in-progress read may meet a duplicate that finalize would remove: as finalize, a row
        #                     that succeeded wins over an error row, else the first one
        keep: dict[str, int] = {}
        ok = table.column("error").is_null().to_pylist()
        for i, row_id in enumerate(table.column("id").to_pylist()):
            if row_id not in keep or (ok[i] and not ok[keep[row_id]]):
                keep[row_id] = i
        table = table.take(pa.array(sorted(keep.values()), pa.int64()))
    return table if limit is None else table.slice(0, limit)
