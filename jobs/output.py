"""The output contract: Parquet schemas and the write-then-commit protocol that makes every row id appear once.

Layout of one task's output, `<output>/<job_id>/<task>/`, a folder any Parquet reader opens as it is (pandas,
pyarrow, polars and DuckDB over `**/*.parquet`, `datasets.load_dataset`, a Hub dataset upload):

    data/part-<uuid>.parquet            result rows (schema below), committed ones only
    _SUCCESS                            manifest written by the driver at the end: the committed files, deduplicated
    .flashu/commits/<key>.json          create-only commit record: {"file", "ids", "keys" (read keys), "rows", "errors",
                                        "error_ids", ...};
                                        key = hash of the sorted ids, so a retried write cannot commit twice
    .flashu/staging/<name>.staged       a data file before its commit (named so no `*.parquet` glob matches it)
    .flashu/metrics.json                rows, errors, throughput, seconds of the task
    .flashu/lease.json                  the driver running the job now (host, pid, run id, heartbeat): jobs/lease.py
    .flashu/settings.json               the settings that change results, fixed by the first run: jobs/settings.py
    .flashu/units/<unit>.json           create-only: this read unit (file, row group) is done; a resume skips it unread

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

from flashu_batch.jobs.ids import COMMIT_ROW, claim_losers, hash_ids
from flashu_batch.jobs.storage import Storage, join

FORMAT = "flashu-batch-output/1"
MANIFEST, DATA = "_SUCCESS", "data"
COMMITS, STAGING, METRICS = ".flashu/commits", ".flashu/staging", ".flashu/metrics.json"
LEASE, SETTINGS = ".flashu/lease.json", ".flashu/settings.json"  # jobs/lease.py, jobs/settings.py
UNITS = ".flashu/units"  # completion records of read units (scheduler/bookkeeping.py)
READ_KEY = "__flashu_read_key"  # a column the read stage adds and the writer keeps in the record (jobs/ids.py)
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
        for a retry. A READ_KEY column (each row's read key, jobs/ids.py: where its input row sat) goes into the
        record, not the file."""
        rel = self.write_data(table)
        return self.commit(rel, table, run_id)

    def write_data(self, table: pa.Table) -> str:
        """Stage one data file (no reader sees it) -> the path under the root it gets once committed."""
        if READ_KEY in table.column_names:
            table = table.drop_columns([READ_KEY])
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
        if READ_KEY in table.column_names:
            record["keys"] = table.column(READ_KEY).to_pylist()
        payload, key = json.dumps(record).encode(), ids_key(ids)
        committed = self.storage.create(self.record_uri(key), payload)
        owner = None if committed else self.record_run_id(key)
        if not committed and owner != run_id:  # an earlier run committed these ids: a record of this run's own
            key = ids_key(ids, run_id)
            committed = self.storage.create(self.record_uri(key), payload)
            owner = None if committed else run_id  # its key holds the run id: only this run makes that record
        if committed:
            self.publish(rel)
        else:
            self.storage.delete(self.staged(rel))
        this_run = committed or (bool(run_id) and owner == run_id)  # "": no run to tell a retry from another writer
        # record: the commit record that holds this run's rows (None when another run's does)
        return dict(file=rel, rows=len(ids), errors=errors, committed=committed, this_run=this_run,
                    record=key if this_run else None)

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
        for part in _slices(self.record_listing(), slice_bytes):
            yield from self.read_records([f["uri"] for f in part])

    def record_listing(self) -> list[dict]:
        """The commit records' listing entries ({"uri", "size", "mtime"}); no record is read."""
        return [f for f in self.storage.list(join(self.root, COMMITS)) if f["uri"].endswith(".json")]

    def read_records(self, uris: list[str]) -> list[dict]:
        """The commit records at `uris`, each with its own "key" (its name)."""
        return [dict(json.loads(data), key=json_name(uri)) for uri, data in zip(uris, self.storage.read_many(uris))]

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

    def current_manifest(self) -> dict | None:
        """The manifest when nothing was committed or staged since the finalize that wrote it (its files are all the
        commit records there are), else None. Listings only: no record is read."""
        manifest = self.manifest()
        if manifest is None:
            return None
        if len(self.record_listing()) != len(manifest["files"]) or self.storage.list(join(self.root, STAGING)):
            return None
        return manifest

    def finalize(self, job_id: str, task_name: str, kind: str, metrics: dict, images_per_id: int = 1) -> dict:
        """Deduplicate the commits by id, write `_SUCCESS` (the manifest) and `metrics.json`, remove superseded
        and orphaned files, all in this process (the driver runs the same steps with the claims spread over Ray
        tasks: scheduler/bookkeeping.py). Idempotent: on a clean state it rewrites the same manifest and writes no
        data file."""
        records, rows = [], []
        for r in self.iter_commits():
            rows.append(commit_rows(r, len(records), images_per_id, self.error_ids(r)))
            records.append(record_meta(r, len(records)))
        scanned = len(records)
        records, missing = self.recover(records)
        rows = np.concatenate([np.empty(0, COMMIT_ROW)] + rows)
        standing = np.zeros(scanned, bool)
        standing[[r["index"] for r in records]] = True
        losers = claim_losers(rows[standing[rows["record"]]], claim_ranks(records, scanned))
        return self.settle(job_id, task_name, kind, metrics, records, losers, missing)

    def recover(self, records: list[dict]) -> tuple[list[dict], int]:
        """Finalize's first steps, over the records' metas (record_meta): finish an interrupted earlier finalize
        (records that a rewrite replaced go), publish the files of records a crash left staged, and drop the records
        whose file is gone (their ids run again next time). -> (the records that stand, how many were dropped)."""
        replaced = {k for r in records for k in r.get("replaces", ())}
        for r in records:
            if r["key"] in replaced:
                self.storage.delete(self.record_uri(r["key"]))
        records = [r for r in records if r["key"] not in replaced]
        data_files = set(self._data_files())
        staged = {f["uri"] for f in self.storage.list(join(self.root, STAGING))}
        for r in records:
            if r["file"] not in data_files and self.staged(r["file"]) in staged:
                self.publish(r["file"])
                staged.discard(self.staged(r["file"]))
                data_files.add(r["file"])
        missing = [r for r in records if r["file"] not in data_files]
        for r in missing:
            self.storage.delete(self.record_uri(r["key"]))
        return [r for r in records if r["file"] in data_files], len(missing)

    def settle(self, job_id: str, task_name: str, kind: str, metrics: dict, records: list[dict],
               losers: np.ndarray, missing: int = 0) -> dict:
        """Finalize's last steps: each id once (the rows `losers`, COMMIT_ROWs from claim_losers, leave: a file
        that loses some rows is rewritten without them, as a new file and a record that `replaces` the old one; a
        file that loses all of them is dropped), then the manifest, the metrics and the cleanup (a crash before the
        cleanup is finished by `recover` next time)."""
        lost = {}  # record index -> its rows that lose
        if len(losers):
            losers = losers[np.argsort(losers["record"], kind="stable")]
            at, start = np.unique(losers["record"], return_index=True)
            for index, part in zip(at.tolist(), np.split(losers["row"], start[1:])):
                lost[index] = part
        keep, superseded = [], []
        for r in records:
            gone = lost.get(r["index"])
            if gone is None:
                keep.append(r)
                continue
            superseded.append(r)
            if len(gone) < r["rows"]:
                keep.append(self._rewrite(r, gone))

        files = sorted(({"file": r["file"], "rows": r["rows"], "errors": r["errors"]} for r in keep),
                       key=lambda f: f["file"])
        manifest = dict(format=FORMAT, job_id=job_id, task=task_name, kind=kind, rows=sum(f["rows"] for f in files),
                        errors=sum(f["errors"] for f in files), files=files,
                        schema=[f"{field.name}: {field.type}" for field in SCHEMAS[kind]])
        self.storage.write_bytes(join(self.root, MANIFEST), json.dumps(manifest, indent=1).encode())
        metrics = dict(metrics, rows=manifest["rows"], errors=manifest["errors"], files=len(files),
                       duplicates_removed=sum(r["rows"] for r in records) - manifest["rows"], missing_files=missing)
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

    def _rewrite(self, record: dict, lost: np.ndarray) -> dict:
        """A new file and record of `record`'s rows but those at the indices `lost`; the new record `replaces` it."""
        fs, path = self.storage.arrow_fs(join(self.root, record["file"]))
        table = pq.read_table(path, filesystem=fs)
        kept = np.ones(table.num_rows, bool)
        kept[lost] = False
        table = table.filter(pa.array(kept))
        rel = self.write_data(table)
        ids, error_ids = table.column("id").to_pylist(), error_ids_of(table)
        new = dict(format=FORMAT, file=rel, ids=ids, rows=len(ids), errors=len(error_ids), error_ids=error_ids,
                   run_id="finalize", created_unix=time.time(), replaces=[record["key"]])
        keys = json.loads(self.storage.read_bytes(self.record_uri(record["key"]))).get("keys")
        if keys is not None:
            new["keys"] = [k for k, m in zip(keys, kept) if m]
        key = ids_key(ids)
        self.storage.create(self.record_uri(key), json.dumps(new).encode())
        self.publish(rel)
        return record_meta(dict(new, key=key), -1)


def json_name(uri: str) -> str:
    """The name of a `<name>.json` object (a commit record's key, a unit record's id)."""
    return uri.rsplit("/", 1)[-1][: -len(".json")]


def record_meta(record: dict, index: int) -> dict:
    """What finalize keeps of a commit record besides its rows (no ids: a task has millions); index: its place in
    the scan (COMMIT_ROW "record"). "replaces" only where the record has one (a rewrite's): one dict per committed
    file, kept small."""
    meta = dict(key=record["key"], file=record["file"], rows=record["rows"], errors=record["errors"], index=index)
    if record.get("replaces"):
        meta["replaces"] = record["replaces"]
    return meta


def commit_rows(record: dict, index: int, images_per_id: int, error_ids: list[str]) -> np.ndarray:
    """One commit record's rows as jobs.ids COMMIT_ROWs (record index `index`)."""
    ids = record["ids"]
    rows = np.empty(len(ids), COMMIT_ROW)
    sources, image = image_sources(ids, images_per_id)
    rows["out"] = hash_ids(ids)
    rows["hash"] = rows["out"] if images_per_id == 1 else hash_ids(sources)
    rows["image"], rows["record"], rows["row"] = image, index, np.arange(len(ids))
    rows["failed"] = failed_mask(ids, error_ids)
    rows["key"] = record["keys"] if "keys" in record else -1
    return rows


def claim_ranks(records: list[dict], size: int) -> np.ndarray:
    """(size,) int64: each record's rank in finalize's claim order (larger files first, then by key), by index."""
    rank = np.zeros(size, np.int64)
    for k, r in enumerate(sorted(records, key=lambda r: (-r["rows"], r["key"]))):
        rank[r["index"]] = k
    return rank


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
