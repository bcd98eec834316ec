"""The output contract: Parquet schemas and the write-then-commit protocol that makes every row id appear once.

Layout of one task's output, `<output>/<job_id>/<task>/`, a folder any Parquet reader opens as it is (pandas,
pyarrow, polars and DuckDB over `**/*.parquet`, `datasets.load_dataset`, a Hub dataset upload):

    data/part-<uuid>.parquet            result rows (schema below), committed ones only
    _SUCCESS                            manifest written by the driver at the end: the committed files, deduplicated
    .flashu/commits/<key>.json          create-only commit record: {"file", "ids", "rows", "errors", "error_ids", ...};
                                        key = hash of the sorted ids, so a retried write cannot commit twice
    .flashu/staging/<name>.staged       a data file before its commit (named so no `*.parquet` glob matches it)
    .flashu/metrics.json                rows, errors, throughput, seconds of the task
    .flashu/lease.json                  the driver running the job now (host, pid, run id, heartbeat): jobs/lease.py
    .flashu/settings.json               the settings that change results, fixed by the first run: jobs/settings.py

A write stages its file, creates the commit record, then publishes the file under data/ (a rename, or an S3 copy):
so data/ never holds a file without a record, even after a crash, and a record whose file a crash left staged is
published by the next finalize. Bookkeeping stays under names readers skip (a leading '.' or '_'). Readers of our
own trust `_SUCCESS` when it exists, else the commit records (`read_output`). Where one id has several committed rows
(a re-run with --retry-errors, a race), a row that succeeded wins over an error row; finalize keeps one.
"""

import hashlib
import json
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flashu_batch.jobs.ids import HASH, first_occurrences, hash_ids
from flashu_batch.jobs.storage import Storage, join

FORMAT = "flashu-batch-output/1"
MANIFEST, DATA = "_SUCCESS", "data"
COMMITS, STAGING, METRICS = ".flashu/commits", ".flashu/staging", ".flashu/metrics.json"
LEASE, SETTINGS = ".flashu/lease.json", ".flashu/settings.json"  # jobs/lease.py, jobs/settings.py
ORPHAN_GRACE_S = 3600.0  # uncommitted data files younger than this may belong to a write still in flight

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image layout
T2I_SCHEMA = pa.schema([
    ("id", pa.string()),          # row id (given, or derived from the row's content and position)
    ("prompt", pa.string()),      # the prompt as read
    ("negative_prompt", pa.string()),  # the uncond caption used (the row's own, else params'); null: the empty one
    ("seed", pa.int64()),         # the noise seed used (row's own, or hash of job id + row id; + image_index)
    ("image_index", pa.int32()),  # k of the input row's num_images_per_prompt images (0 when one); see image_id
    ("image", IMAGE_TYPE),        # params.image_format bytes (PNG by default) + "<id>.png|.webp|.jpg"; null on errors
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
    ("seed", pa.int64()),           # the sampling seed (row's own, or hash of job id + row id); null when greedy
    ("model", pa.string()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),
])
SCHEMAS = {"t2i": T2I_SCHEMA, "vqa": VQA_SCHEMA}


def image_id(row_id: str, k: int, n: int) -> str:
    """Output id of image k of an input row's n (t2i params.num_images_per_prompt): the row's own id when n is 1
    (so a default job keeps its ids), else '<id>#<k>'."""
    return row_id if n == 1 else f"{row_id}#{k}"


def image_sources(ids: list[str], n: int) -> tuple[list[str], np.ndarray]:
    """image_id's inverse -> (input ids, image indices (len(ids),) int64). An id that image_id cannot have made
    for this n (no '#<k>' with 0 <= k < n, written without leading zeros) gets index -1."""
    if n == 1:
        return list(ids), np.zeros(len(ids), np.int64)
    sources, index = [], np.full(len(ids), -1, np.int64)
    for j, image in enumerate(ids):
        source, sep, k = image.rpartition("#")
        sources.append(source)
        if sep and k.isdecimal() and k.isascii() and str(int(k)) == k and int(k) < n:
            index[j] = int(k)
    return sources, index


def task_root(output: str, job_id: str, task_name: str) -> str:
    return join(output, job_id, task_name)


def ids_key(ids: list[str], run_id: str = "") -> str:
    """A commit record's key: a hash of the sorted ids (and of the run id, for a record of ids an earlier run
    committed)."""
    text = "\n".join(sorted(ids))
    return hashlib.sha256((f"{run_id}\0{text}" if run_id else text).encode()).hexdigest()[:32]


class TaskOutput:
    """One task's output folder and its commit protocol."""

    def __init__(self, storage: Storage, root: str):
        self.storage, self.root = storage, root

    # ---- write side (runs in Ray tasks) ---------------------------------------------------------------------------

    def write_and_commit(self, table: pa.Table, run_id: str = "") -> dict:
        """Write one data file, then create its commit record. Returns {"file", "rows", "errors", "committed",
        "this_run"}: committed=False when the ids had a record already, and then the new file is removed.
        this_run says whether the rows count as committed by run `run_id` (rows_this_run): True when this call
        committed them, and also when this run had (a retried write: Ray re-ran the task after its first attempt
        committed and died before its summary reached the driver, so the rows were never counted). Where an earlier
        run committed the ids (error rows that a --retry-errors run did again), the rows get a record of their own,
        keyed with the run id, and finalize keeps the better row of each id. Without a run_id no write is taken
        for a retry."""
        rel = self.write_data(table)
        return self.commit(rel, table, run_id)

    def write_data(self, table: pa.Table) -> str:
        """Stage one data file (no reader sees it) -> the path under the root it gets once committed."""
        ids = table.column("id").to_pylist()
        assert len(set(ids)) == len(ids) and None not in ids, f"a data file needs unique non-null ids, got {ids[:5]}"
        rel = f"{DATA}/part-{uuid.uuid4().hex}.parquet"
        fs, path = self.storage.arrow_fs(self.staged(rel))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(with_features(table), path, filesystem=fs, compression="zstd")
        return rel

    def staged(self, rel: str) -> str:
        """Where data file `rel` waits for its commit."""
        return join(self.root, STAGING, rel.rsplit("/", 1)[-1] + ".staged")

    def publish(self, rel: str) -> None:
        """Move committed data file `rel` from staging to data/: readers see it from now on. Only after its record."""
        self.storage.move(self.staged(rel), join(self.root, rel))

    def record_uri(self, key: str) -> str:
        return join(self.root, COMMITS, f"{key}.json")

    def commit(self, rel: str, table: pa.Table, run_id: str = "") -> dict:
        """Create the commit record of data file `rel` (holding `table`); see write_and_commit."""
        ids = table.column("id").to_pylist()
        error_ids = error_ids_of(table)
        errors = len(error_ids)
        record = dict(format=FORMAT, file=rel, ids=ids, rows=len(ids), errors=errors, error_ids=error_ids,
                      run_id=run_id, created_unix=time.time())
        payload, key = json.dumps(record).encode(), ids_key(ids)
        committed = self.storage.create(self.record_uri(key), payload)
        owner = None if committed else self.record_run_id(key)
        if not committed and owner != run_id:  # an earlier run committed these ids: a record of this run's own
            committed = self.storage.create(self.record_uri(ids_key(ids, run_id)), payload)
            owner = None if committed else run_id  # its key holds the run id: only this run makes that record
        if committed:
            self.publish(rel)
        else:
            self.storage.delete(self.staged(rel))
        this_run = committed or (bool(run_id) and owner == run_id)  # "": no run to tell a retry from another writer
        return dict(file=rel, rows=len(ids), errors=errors, committed=committed, this_run=this_run)

    def record_run_id(self, key: str) -> str | None:
        """The run that created commit record `key` (None if it is gone)."""
        try:
            return json.loads(self.storage.read_bytes(self.record_uri(key))).get("run_id", "")
        except FileNotFoundError:
            return None

    # ---- driver side ----------------------------------------------------------------------------------------------

    def commits(self) -> list[dict]:
        """Every commit record, each with its own "key"."""
        return list(self.iter_commits())

    def iter_commits(self, slice_bytes: int = 8 << 20):
        """The commit records one at a time, read about `slice_bytes` of them at once: all of them together hold
        every id of the task, gigabytes as Python strings at millions of rows."""
        listing = [f for f in self.storage.list(join(self.root, COMMITS)) if f["uri"].endswith(".json")]
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
            return json.loads(self.storage.read_bytes(join(self.root, MANIFEST)))
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
                self.storage.delete(self.record_uri(r["key"]))
        records = [r for r in records if r["key"] not in replaced]

        # 2. A record whose file a crash left staged is published now; one whose file is gone cannot be trusted:
        #    it goes (its ids run again on the next run)
        data_files = self._data_files()
        staged = {f["uri"] for f in self.storage.list(join(self.root, STAGING))}
        for r in records:
            if r["file"] not in data_files and self.staged(r["file"]) in staged:
                self.publish(r["file"])
                staged.discard(self.staged(r["file"]))
                data_files[r["file"]] = dict(uri=join(self.root, r["file"]), mtime=time.time())
        missing = [r for r in records if r["file"] not in data_files]
        for r in missing:
            self.storage.delete(self.record_uri(r["key"]))
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
                ids = json.loads(self.storage.read_bytes(self.record_uri(r["key"])))["ids"]
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
        self.storage.write_bytes(join(self.root, MANIFEST), json.dumps(manifest, indent=1).encode())
        metrics = dict(metrics, rows=manifest["rows"], errors=manifest["errors"], files=len(files),
                       duplicates_removed=sum(r["rows"] for r in records) - manifest["rows"],
                       missing_files=len(missing))
        self.storage.write_bytes(join(self.root, METRICS), json.dumps(metrics, indent=1).encode())
        for r in superseded:
            self.storage.delete(self.record_uri(r["key"]))
        # data/ keeps exactly the manifest's files: a file there without a record can only be one a rewrite
        # superseded (files are published after their record is made). Staged files without a record are writes
        # that lost a race or died before committing; young ones may still be in flight.
        kept_files, now = {f["file"] for f in files}, time.time()
        for rel, f in self._data_files().items():
            if rel not in kept_files:
                self.storage.delete(f["uri"])
        for f in self.storage.list(join(self.root, STAGING)):
            if f["mtime"] is None or now - f["mtime"] > ORPHAN_GRACE_S:
                self.storage.delete(f["uri"])
        return dict(manifest, metrics=metrics)

    def _data_files(self) -> dict:
        """{path under the root: listing entry} of the published data files."""
        return {f["uri"].split(self.root.rstrip("/") + "/", 1)[-1]: f for f in self.storage.list(join(self.root, DATA))
                if f["uri"].endswith(".parquet")}

    def metrics(self) -> dict | None:
        """metrics.json of the last finalize, or None."""
        try:
            return json.loads(self.storage.read_bytes(join(self.root, METRICS)))
        except FileNotFoundError:
            return None

    def has_output(self) -> bool:
        """Whether anything was committed here (a finished or a running task)."""
        return self.storage.exists(join(self.root, MANIFEST)) or bool(self.storage.list(join(self.root, COMMITS)))

    def _rewrite(self, record: dict, fresh: set[str]) -> dict:
        fs, path = self.storage.arrow_fs(join(self.root, record["file"]))
        table = pq.read_table(path, filesystem=fs)
        table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(fresh), pa.string())))
        rel = self.write_data(table)
        ids, error_ids = table.column("id").to_pylist(), error_ids_of(table)
        new = dict(format=FORMAT, file=rel, ids=ids, rows=len(ids), errors=len(error_ids), error_ids=error_ids,
                   run_id="finalize", created_unix=time.time(), replaces=[record["key"]])
        key = ids_key(ids)
        self.storage.create(self.record_uri(key), json.dumps(new).encode())
        self.publish(rel)
        return dict(new, key=key)


# The `datasets` features of the documented columns, kept in each data file's schema metadata: `datasets` then
# decodes `image` as an Image (PIL), and the folder uploads to the Hub as a dataset as it is. Other columns (a
# user's own, carried from the input) are typed from their Arrow types by `datasets` itself.
HF_FEATURES = {"image": {"_type": "Image"}}
_HF_VALUES = {pa.string(): "string", pa.int64(): "int64", pa.int32(): "int32", pa.float64(): "float64"}


def with_features(table: pa.Table) -> pa.Table:
    """The table with the `datasets` features of its documented columns in its schema metadata."""
    features = {}
    for field in table.schema:
        if field.name in HF_FEATURES and field.type == IMAGE_TYPE:
            features[field.name] = HF_FEATURES[field.name]
        elif field.name in T2I_SCHEMA.names + VQA_SCHEMA.names and field.type in _HF_VALUES:
            features[field.name] = {"dtype": _HF_VALUES[field.type], "_type": "Value"}
    metadata = dict(table.schema.metadata or {}, huggingface=json.dumps({"info": {"features": features}}))
    return table.replace_schema_metadata(metadata)


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
        uri = join(root, rel)
        if manifest is None and not storage.exists(uri):
            uri = out.staged(rel)  # committed, and a crash came before it was published: finalize publishes it
        fs, path = storage.arrow_fs(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    if not tables:
        return SCHEMAS[kind].empty_table() if kind else pa.table({"id": pa.array([], pa.string())})
    table = pa.concat_tables(tables, promote_options="permissive")  # files may carry different input columns
    if manifest is None:  # an in-progress read may meet a duplicate that finalize would remove: as finalize, a row
        #                     that succeeded wins over an error row, else the first one
        keep: dict[str, int] = {}
        ok = table.column("error").is_null().to_pylist()
        for i, row_id in enumerate(table.column("id").to_pylist()):
            if row_id not in keep or (ok[i] and not ok[keep[row_id]]):
                keep[row_id] = i
        table = table.take(pa.array(sorted(keep.values()), pa.int64()))
    return table if limit is None else table.slice(0, limit)
