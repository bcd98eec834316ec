"""One Ray Data pipeline per task, built by a plain function that reads the spec and appends stages:

    read units -> canonical rows (ids), less committed and repeated ids -> validate/decode (CPU) -> worker pool
    -> write+commit

The write is a stage, not a Datasink: each call writes one `data/part-<uuid>.parquet`, creates its commit record
and returns one small summary row. The driver streams those rows, so progress and metrics come from commits.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flashu_batch.jobs.ids import find, hash_ids
from flashu_batch.jobs.output import SCHEMAS, TaskOutput
from flashu_batch.jobs.spec import InputSpec, JobSpec, T2ITask, VQATask
from flashu_batch.jobs.storage import Storage, StorageUnavailable
from flashu_batch.scheduler.read import read_units
from flashu_batch.scheduler.validate import validate_t2i, validate_vqa

SUMMARY_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                            ("committed", pa.bool_())])
READ_CPUS = 0.25  # CPU stages are light; small shares keep them schedulable beside the actor pool

# Fault tolerance (README, "Fault tolerance"). Ray Data's defaults retry without limit: pool actors restart forever
# and their batches are retried forever, plain tasks are re-run forever when their process dies. A row that kills
# every process that touches it (a segfault, an OOM kill) would then loop forever. Bounded instead:
ACTOR_MAX_RESTARTS = 4  # per actor over the task: lost nodes, preemptions, OOM kills (each restart reloads the model)
ACTOR_MAX_TASK_RETRIES = 2  # per batch, on its actor's death: a batch that killed 3 workers fails the job
TASK_MAX_RETRIES = 3  # read/validate/write tasks whose process died; all safe to re-run (a write commits its ids
#                       under a key derived from them, so a re-run write commits nothing twice)
CPU_STAGE = dict(num_cpus=READ_CPUS, max_retries=TASK_MAX_RETRIES)
# (Ray 2.60 takes these three only as `**ray_remote_args` of map_batches, deprecated for removal in Ray 2.64.)
# A storage outage (an S3 server restarting, a network blip longer than the clients' own few retries) raises in a
# task: Ray Data re-runs a task whose error matches one of these, up to STORAGE_MAX_RETRIES times, with exponential
# backoff (2, 4, 8, 16, 32 s at most, jittered: an outage of about a minute). Every task is safe to re-run.
RETRIED_STORAGE_ERRORS = [
    "AWS Error NETWORK_CONNECTION", "AWS Error SERVICE_UNAVAILABLE", "AWS Error SLOW_DOWN",  # pyarrow (AWS SDK)
    "AWS Error INTERNAL_FAILURE", "AWS Error UNKNOWN (HTTP status 503)",
    "Could not connect to the endpoint URL", "Connection was closed before we received a valid response",  # botocore
    "Read timeout on endpoint URL",
    StorageUnavailable.MARKER,  # jobs/storage.py: an image fetch (or another read) that met an outage
]
STORAGE_MAX_RETRIES = 5


@dataclass
class Skip:
    """The rows the read stage drops, before any other work: ids committed by an earlier run, and every row whose id
    came earlier in read order (the repeated-id policy, README). The driver ray.puts it once for all tasks."""
    committed: np.ndarray    # (c,) jobs.ids.HASH, sorted: the input ids that have a commit record
    repeats: np.ndarray      # (r,) int64, sorted: read positions of the rows whose id came earlier
    unit_starts: np.ndarray  # (units + 1,) int64: read position of each unit's first row, then the row count (read
    #                          order: units as planned, then rows in file order)

    def keep(self, unit: int, ids: list[str]) -> np.ndarray:
        """(n,) bool over the rows of read unit `unit`, in file order."""
        committed, _ = find(self.committed, hash_ids(ids))
        repeated, _ = find(self.repeats, self.unit_starts[unit] + np.arange(len(ids)))
        return ~(committed | repeated)


def read_rows(units: list[dict], kind: str, inp: InputSpec, storage: Storage, skip=None):
    """Dataset of canonical rows (scheduler/read.py), one Ray task per read unit, less the rows that `skip` (an
    ObjectRef of a Skip, or None) drops."""
    return _units_dataset(units).map_batches(
        read_new_rows, batch_size=1, batch_format="pyarrow", **CPU_STAGE,
        fn_kwargs=dict(kind=kind, fmt=inp.format, columns=dict(inp.columns), storage=storage, skip=skip))


def read_id_hashes(units: list[dict], kind: str, inp: InputSpec, storage: Storage):
    """The driver's pre-pass: a Dataset of one row per read unit, {"unit": its index in `units`, "hashes": its rows'
    ids as jobs.ids hashes in file order, 16 bytes each}; the id strings stay in the read tasks."""
    return _units_dataset(units).map_batches(
        unit_id_hashes, batch_size=1, batch_format="pyarrow", **CPU_STAGE,
        fn_kwargs=dict(kind=kind, fmt=inp.format, columns=dict(inp.columns), storage=storage))


def _units_dataset(units: list[dict]):
    import ray

    ds = ray.data.from_items([dict(u, unit=i) for i, u in enumerate(units)], override_num_blocks=max(1, len(units)))
    # The context is the driver's current DataContext (Ray shares it, no copy): every stage of every pipeline gets it
    ds.context.retried_map_errors, ds.context.max_map_retries = RETRIED_STORAGE_ERRORS, STORAGE_MAX_RETRIES
    return ds


def read_new_rows(batch: pa.Table, kind: str, fmt: str, columns: dict, storage: Storage, skip=None) -> pa.Table:
    """Read stage: one read unit (batch_size=1) -> its canonical rows, less those `skip` drops."""
    rows = read_units(batch, kind, fmt, columns, storage)
    if skip is None:
        return rows
    import ray

    return rows.filter(pa.array(ray.get(skip).keep(batch.column("unit")[0].as_py(), rows.column("id").to_pylist())))


def unit_id_hashes(batch: pa.Table, kind: str, fmt: str, columns: dict, storage: Storage) -> pa.Table:
    ids = read_units(batch, kind, fmt, columns, storage).column("id").to_pylist()
    return pa.table({"unit": batch.column("unit"), "hashes": pa.array([hash_ids(ids).tobytes()], pa.large_binary())})


def bucket_by_question_length(batch: pa.Table) -> pa.Table:
    """Order a block's rows by question length, so each batch cut from it holds questions of similar length (the
    VQA batch is left-padded to its longest prompt; images are all resized to one resolution already). Rows
    without a question (error rows) go last."""
    import pyarrow.compute as pc

    return batch.take(pc.sort_indices(pc.utf8_length(batch.column("question"))))


def to_output_table(batch: pa.Table, kind: str) -> pa.Table:
    """Worker output -> the documented output schema (jobs/output.py); the image columns become the `datasets`
    Image struct {bytes, path}."""
    columns = {name: batch.column(name).to_pylist() for name in batch.column_names}
    if kind == "t2i":
        columns["image"] = [None if b is None else {"bytes": b, "path": p}
                            for b, p in zip(columns.pop("image_bytes"), columns.pop("image_path"))]
    schema = SCHEMAS[kind]
    return pa.table({field.name: pa.array(columns[field.name], type=field.type) for field in schema}, schema=schema)


def explain_worker_deaths(batches, task_name: str):
    """The driver's stream of summaries, with a worker death that used up its retries (above) turned into a job error
    that says what happened and what to do; Ray's own message names only an actor id."""
    from ray.exceptions import RayActorError

    try:
        yield from batches
    except RayActorError as e:
        said = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"task {task_name!r}: a worker process died and its retries are used up (a batch is retried "
            f"{ACTOR_MAX_TASK_RETRIES} times on a restarted worker, a worker restarts at most {ACTOR_MAX_RESTARTS} "
            f"times). A batch that keeps killing its worker holds a row that crashes the model process (out of "
            f"memory, a native crash): see the worker logs. Committed rows are kept; run the job again to retry the "
            f"rest. Ray: {said}") from e


def write_and_commit(batch: pa.Table, kind: str, root: str, storage: Storage, run_id: str) -> pa.Table:
    """Write stage: one Parquet file + its commit record per call -> one summary row."""
    if batch.num_rows == 0:
        return SUMMARY_SCHEMA.empty_table()
    ids = batch.column("id").to_pylist()
    if len(set(ids)) < len(ids):  # a re-executed worker task can repeat rows; one of each goes to the file
        first = {row_id: i for i, row_id in reversed(list(enumerate(ids)))}
        batch = batch.take(pa.array(sorted(first.values()), pa.int64()))
    stats = TaskOutput(storage, root).write_and_commit(to_output_table(batch, kind), run_id)
    return pa.Table.from_pylist([stats], schema=SUMMARY_SCHEMA)


def _common_tail(ds, spec: JobSpec, task, worker_cls, root: str, storage: Storage, run_id: str):
    import ray

    res = task.resources
    # Blocks of one batch each (streaming, no shuffle): a read unit is one block of a whole file or row group, and
    # a map task emits its output only when the whole block is done; without this one big file would go through
    # one actor (the others idle) and commit nothing until its last row.
    ds = ds.repartition(target_num_rows_per_block=res.batch_size)
    ds = ds.map_batches(worker_cls, fn_constructor_kwargs=dict(spec=spec, task_name=task.task_name),
                        resources=dict(res.custom),  # e.g. {"t2i": 1}: the pool goes only to t2i nodes
                        compute=ray.data.ActorPoolStrategy(size=res.workers),  # the full pool from the start
                        num_gpus=res.gpus_per_worker, num_cpus=res.cpus_per_worker, batch_size=res.batch_size,
                        batch_format="pyarrow", max_restarts=ACTOR_MAX_RESTARTS,
                        max_task_retries=ACTOR_MAX_TASK_RETRIES)
    return ds.map_batches(write_and_commit, batch_size=task.rows_per_file, batch_format="pyarrow", **CPU_STAGE,
                          fn_kwargs=dict(kind=task.kind, root=root, storage=storage, run_id=run_id))


def build_t2i_pipeline(spec: JobSpec, task: T2ITask, *, units: list[dict], root: str, storage: Storage,
                       skip=None, run_id: str = "", worker_cls=None):
    """The t2i task's Dataset of commit summaries (lazy: nothing runs until the driver iterates it)."""
    from flashu_batch.workers import T2IWorker

    ds = read_rows(units, "t2i", task.input, storage, skip)
    ds = ds.map_batches(validate_t2i, batch_format="pyarrow", **CPU_STAGE)
    return _common_tail(ds, spec, task, worker_cls or T2IWorker, root, storage, run_id)


def build_vqa_pipeline(spec: JobSpec, task: VQATask, *, units: list[dict], root: str, storage: Storage,
                       skip=None, run_id: str = "", worker_cls=None):
    """The vqa task's Dataset of commit summaries; images are fetched and decoded in the CPU stage."""
    from flashu_batch.workers import VQAWorker

    ds = read_rows(units, "vqa", task.input, storage, skip)
    ds = ds.map_batches(validate_vqa, batch_format="pyarrow", **CPU_STAGE,
                        fn_kwargs=dict(storage=storage, max_image_pixels=task.params.max_image_pixels,
                                       max_image_bytes=task.params.max_image_bytes))
    # Shape buckets: a whole block (a file or row group) sorted by question length before it is cut into batches.
    ds = ds.map_batches(bucket_by_question_length, batch_size=None, batch_format="pyarrow", **CPU_STAGE)
    return _common_tail(ds, spec, task, worker_cls or VQAWorker, root, storage, run_id)

