"""One Ray Data pipeline per task, built by a plain function that reads the spec and appends stages:

    read units -> canonical rows (ids) -> skip committed ids -> validate/decode (CPU) -> worker pool -> write+commit

The write is a stage, not a Datasink: each call writes one `data/part-<uuid>.parquet`, creates its commit record
and returns one small summary row. The driver streams those rows, so progress and metrics come from commits.
"""

import pyarrow as pa

from jobs.output import SCHEMAS, TaskOutput
from jobs.spec import InputSpec, JobSpec, T2ITask, VQATask
from jobs.storage import Storage
from scheduler.read import read_units
from scheduler.validate import validate_t2i, validate_vqa

SUMMARY_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                            ("committed", pa.bool_())])
READ_CPUS = 0.25  # CPU stages are light; small shares keep them schedulable beside the actor pool


def read_rows(units: list[dict], kind: str, inp: InputSpec, storage: Storage):
    """Dataset of canonical rows (scheduler/read.py), one Ray task per read unit."""
    import ray

    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    return ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                          fn_kwargs=dict(kind=kind, fmt=inp.format, columns=dict(inp.columns), storage=storage))


def skip_committed(batch: pa.Table, committed: frozenset) -> pa.Table:
    if not committed:
        return batch
    keep = [row_id not in committed for row_id in batch.column("id").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


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
                        compute=ray.data.ActorPoolStrategy(size=res.workers),  # the full pool from the start
                        num_gpus=res.gpus_per_worker, num_cpus=res.cpus_per_worker, batch_size=res.batch_size,
                        batch_format="pyarrow")
    return ds.map_batches(write_and_commit, batch_size=task.rows_per_file, batch_format="pyarrow",
                          num_cpus=READ_CPUS,
                          fn_kwargs=dict(kind=task.kind, root=root, storage=storage, run_id=run_id))


def build_t2i_pipeline(spec: JobSpec, task: T2ITask, *, units: list[dict], root: str, storage: Storage,
                       committed: frozenset = frozenset(), run_id: str = "", worker_cls=None):
    """The t2i task's Dataset of commit summaries (lazy: nothing runs until the driver iterates it)."""
    from workers import T2IWorker

    ds = read_rows(units, "t2i", task.input, storage)
    ds = ds.map_batches(skip_committed, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(committed=committed))
    ds = ds.map_batches(validate_t2i, batch_format="pyarrow", num_cpus=READ_CPUS)
    return _common_tail(ds, spec, task, worker_cls or T2IWorker, root, storage, run_id)


def build_vqa_pipeline(spec: JobSpec, task: VQATask, *, units: list[dict], root: str, storage: Storage,
                       committed: frozenset = frozenset(), run_id: str = "", worker_cls=None):
    """The vqa task's Dataset of commit summaries; images are fetched and decoded in the CPU stage."""
    from workers import VQAWorker

    ds = read_rows(units, "vqa", task.input, storage)
    ds = ds.map_batches(skip_committed, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(committed=committed))
    ds = ds.map_batches(validate_vqa, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(storage=storage))
    # Shape buckets: a whole block (a file or row group) sorted by question length before it is cut into batches.
    ds = ds.map_batches(bucket_by_question_length, batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS)
    return _common_tail(ds, spec, task, worker_cls or VQAWorker, root, storage, run_id)

