"""One Ray Data pipeline per task, built by a plain function that reads the spec and appends stages:

    read units -> canonical rows (ids), less committed and repeated ids -> [inference stages] -> write+commit

The inference stages (validate/decode on CPU -> shape buckets -> worker pool -> output rows) are the same ones a
user's own Dataset goes through with `build_processor` (scheduler/processor.py): `flashu-batch run` is that
processor plus the exactly-once writer below.

The write is a stage, not a Datasink: each call writes one `data/part-<uuid>.parquet`, creates its commit record
and returns one small summary row. The driver streams those rows, so progress and metrics come from commits.
"""

import re
import warnings

import numpy as np
import pyarrow as pa

from flashu_batch.jobs.ids import key_unit, read_key
from flashu_batch.jobs.output import READ_KEY, SCHEMAS, TaskOutput
from flashu_batch.jobs.spec import InputSpec, ModelSpec, ResourcesSpec, StorageSpec, VQAParams
from flashu_batch.jobs.storage import Storage, StorageUnavailable
from flashu_batch.scheduler.read import ROW_SCHEMAS, carry_columns, read_units
from flashu_batch.scheduler.validate import validate_t2i, validate_vqa
from flashu_batch.showo2.config import input_resolution
from flashu_batch.workers.images import PIXELS_COLUMN

# One row per write (TaskOutput.write_and_commit): "committed" whether this write made the commit record, "this_run"
# whether its rows count for this run (also a retried write whose first attempt committed, then died unreported),
# the record holding them, and how many of them came from each read unit
SUMMARY_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                            ("committed", pa.bool_()), ("this_run", pa.bool_()), ("record", pa.string()),
                            ("units", pa.list_(pa.int64())), ("unit_rows", pa.list_(pa.int64()))])
READ_CPUS = 0.25  # CPU stages are light; small shares keep them schedulable beside the actor pool

# Fault tolerance (README, "Fault tolerance"). Ray Data's defaults retry without limit: pool actors restart forever
# and their batches are retried forever, plain tasks are re-run forever when their process dies. A row that kills
# every process that touches it (a segfault, an OOM kill) would then loop forever. Bounded instead:
ACTOR_MAX_RESTARTS = 4  # per actor over the task: lost nodes, preemptions, OOM kills (each restart reloads the model)
ACTOR_MAX_TASK_RETRIES = 2  # per batch, on its actor's death: a batch that killed 3 workers fails the job
TASK_MAX_RETRIES = 3  # read/validate/write tasks whose process died; all safe to re-run (a write commits its ids
#                       under a key derived from them, so a re-run write commits nothing twice)
# A task or batch that Ray's memory monitor killed is re-run apart from the bounds above, and forever by default
# (Ray's system config task_oom_retries = -1, read by the process that submits the task: the driver). Bounded for the
# Ray the driver starts (driver.init_ray) and on clusters by RAY_task_oom_retries on every node (ray_cluster.yaml,
# k8s/rayjob.yaml); past it the job ends with the error of explain_worker_deaths.
TASK_OOM_RETRIES = 3
# A task's return value under Ray's max_direct_call_object_size (100 KiB by default) is not put in the object store
# but sent to its owner, the driver, and kept in the driver's memory. The id bookkeeping returns thousands of data
# objects (scheduler/bookkeeping.py: per task and hash partition), tens of KiB each at millions of rows: at the
# default they would pile up in the driver, growing with the row count. Set for the Ray the driver starts and, as
# RAY_max_direct_call_object_size, on every node of a cluster (ray_cluster.yaml, k8s/rayjob.yaml).
MAX_INLINE_BYTES = 4096
CPU_STAGE = dict(num_cpus=READ_CPUS, max_retries=TASK_MAX_RETRIES)
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


def map_stage(ds, fn, **kwargs):
    """ds.map_batches(fn, **kwargs). Ray 2.60 takes the retry bounds (max_retries, max_restarts, max_task_retries)
    only as `**ray_remote_args`, which it flags as deprecated for removal in 2.64 (pyproject pins ray below it)
    without a named replacement yet; that notice is silenced here, in one place, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs)


def read_rows(units: list[dict], kind: str, inp: InputSpec, storage: Storage, skip=None):
    """Dataset of canonical rows (scheduler/read.py), then the input columns they carry (input.keep_columns), one Ray
    task per read unit, less the rows that `skip` (an ObjectRef of a Skip, or None) drops."""
    return map_stage(
        _units_dataset(units), read_new_rows, batch_size=1, batch_format="pyarrow", **CPU_STAGE,
        fn_kwargs=dict(kind=kind, fmt=inp.format, columns=dict(inp.columns), storage=storage, skip=skip,
                       keep_columns=_keep_columns(inp)))


def _keep_columns(inp: InputSpec) -> list[str] | None:
    return None if inp.keep_columns is None else list(inp.keep_columns)


def _units_dataset(units: list[dict]):
    """One row per read unit; "unit" is its index in the task's plan (given, or its place in `units`)."""
    import ray

    ds = ray.data.from_items([dict(u, unit=u.get("unit", i)) for i, u in enumerate(units)],
                             override_num_blocks=max(1, len(units)))
    # The context is the driver's current DataContext (Ray shares it, no copy): every stage of every pipeline gets it
    ds.context.retried_map_errors, ds.context.max_map_retries = RETRIED_STORAGE_ERRORS, STORAGE_MAX_RETRIES
    return ds


def read_new_rows(batch: pa.Table, kind: str, fmt: str, columns: dict, storage: Storage, skip=None,
                  keep_columns: list[str] | None = None) -> pa.Table:
    """Read stage: one read unit (batch_size=1) -> its canonical rows and carried columns, each with its read key
    (READ_KEY: the writer keeps it in the commit record), less the rows `skip` (scheduler/bookkeeping.py) drops."""
    import ray

    rows = read_units(batch, kind, fmt, columns, storage, keep_columns)
    unit = batch.column("unit")[0].as_py()
    rows = rows.append_column(READ_KEY, pa.array(read_key(unit, np.arange(rows.num_rows)), pa.int64()))
    return rows if skip is None else rows.filter(pa.array(ray.get(skip).keep(unit, rows.num_rows)))


def bucket_by_question_length(batch: pa.Table) -> pa.Table:
    """Order a block's rows by question length, so each batch cut from it holds questions of similar length (the
    VQA batch is left-padded to its longest prompt; images are all resized to one resolution already). Rows
    without a question (error rows) go last."""
    import pyarrow.compute as pc

    return batch.take(pc.sort_indices(pc.utf8_length(batch.column("question"))))


def to_output_table(batch: pa.Table, kind: str) -> pa.Table:
    """Worker output -> the documented output schema (jobs/output.py), then the passed-through input columns as they
    came; the image columns become the `datasets` Image struct {bytes, path}."""
    schema = SCHEMAS[kind]
    worker_columns = set(schema.names) | {"image_bytes", "image_path"}
    columns = {name: batch.column(name).to_pylist() for name in batch.column_names if name in worker_columns}
    if kind == "t2i":
        columns["image"] = [None if b is None else {"bytes": b, "path": p}
                            for b, p in zip(columns.pop("image_bytes"), columns.pop("image_path"))]
    table = pa.table({field.name: pa.array(columns[field.name], type=field.type) for field in schema}, schema=schema)
    return carry_columns(table, batch, worker_columns | {PIXELS_COLUMN})  # the CPU stage's pixels: never output


def validate_rows(batch: pa.Table, kind: str, storage: Storage, params, resolution: int | None = None) -> pa.Table:
    """The CPU validation stage (scheduler/validate.py) on the task's columns; any other column rides along.
    resolution (vqa): the model's input side; given, each image is also decoded and resized here, once, for the
    worker (validate_vqa)."""
    names = ROW_SCHEMAS[kind].names
    rows = batch.select(names)
    if kind == "t2i":
        checked = validate_t2i(rows)
    else:
        checked = validate_vqa(rows, storage, max_image_pixels=params.max_image_pixels,
                               max_image_bytes=params.max_image_bytes, resolution=resolution)
    return carry_columns(checked, batch, checked.column_names)


def validate_in_blocks(batch: pa.Table, rows_per_block: int, **kwargs):
    """validate_rows over `batch` in slices of rows_per_block rows, each yielded as soon as it is done: a read block
    (a whole Parquet row group, 100k+ rows) never holds all its pixels at once (R*R*3 bytes a row: 560 KB at
    432 px). A generator rather than the stage's batch_size: a batch_size would also bundle that many read units into
    one task of the fused read stage (Ray Data fuses the CPU stages, with the largest batch size as every input's)."""
    for start in range(0, batch.num_rows, rows_per_block):
        yield validate_rows(batch.slice(start, rows_per_block), **kwargs)


class WorkerStartError(RuntimeError):
    """A task's workers could not be built (the model, its files, the device): the first line of the real error and
    the spec field to look at, instead of Ray's actor-death report."""

    # The spec field to look at, by words in the worker's own error (first match wins)
    FIELDS = (("artifact", "model.specialization"), ("flashu", "model.specialization"),
              ("tokenizer", "model.tokenizer_path"), ("vae", "model.vae_path"), ("cuda", "model.device and "
              "resources.gpus_per_worker"), ("checkpoint", "model.checkpoint"), ("weights", "model.checkpoint"))

    def __init__(self, task_name: str, ray_message: str):
        errors = [line.strip() for line in ray_message.splitlines()
                  if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*?:", line)]
        first = errors[-1] if errors else ray_message.strip().splitlines()[0]  # the innermost: the worker's own
        field = next((f for word, f in self.FIELDS if word in first.lower()), "model")
        super().__init__(f"task {task_name!r}: its workers could not start: {first[:500]} (check {field} in the "
                         f"spec; nothing was run, committed rows are kept)")


def explain_worker_deaths(batches, task_name: str):
    """The driver's stream of summaries, with a worker death that used up its retries (above) turned into a job error
    that says what happened and what to do; Ray's own message names only an actor id."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    try:
        yield from batches
    except RayActorError as e:
        if "creation task" in str(e):  # the actor never started: a setup problem, not a row
            raise WorkerStartError(task_name, str(e)) from e
        said = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"task {task_name!r}: a worker process died and its retries are used up (a batch is retried "
            f"{ACTOR_MAX_TASK_RETRIES} times on a restarted worker, a worker restarts at most {ACTOR_MAX_RESTARTS} "
            f"times). A batch that keeps killing its worker holds a row that crashes the model process (out of "
            f"memory, a native crash): see the worker logs. Committed rows are kept; run the job again to retry the "
            f"rest. Ray: {said}") from e
    except OutOfMemoryError as e:  # killed by its node's memory monitor, TASK_OOM_RETRIES re-runs used up
        said = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        stage = re.search(r"task name=([^,]+),", str(e))  # Ray names the killed task: the stage (fused) it ran
        raise RuntimeError(
            f"task {task_name!r}: the {stage.group(1) if stage else 'pipeline'} stage ran out of memory: Ray's memory "
            f"monitor killed its process and the retries are used up (a task killed for memory is re-run at most "
            f"{TASK_OOM_RETRIES} times, Ray's task_oom_retries). Give its nodes more memory or lower "
            f"resources.batch_size / rows_per_file. Committed rows are kept; run the job again to retry the rest. "
            f"Ray: {said}") from e


def write_and_commit(batch: pa.Table, output: TaskOutput, run_id: str) -> pa.Table:
    """Write stage: one Parquet file + its commit record per call -> one summary row."""
    if batch.num_rows == 0:
        return SUMMARY_SCHEMA.empty_table()
    ids = batch.column("id").to_pylist()
    if len(set(ids)) < len(ids):  # a re-executed worker task can repeat rows; one of each goes to the file
        first = {row_id: i for i, row_id in reversed(list(enumerate(ids)))}
        batch = batch.take(pa.array(sorted(first.values()), pa.int64()))
    stats = output.write_and_commit(batch, run_id)
    units, counts = [], []
    if READ_KEY in batch.column_names:
        units, counts = np.unique(key_unit(batch.column(READ_KEY).to_numpy()), return_counts=True)
    return pa.Table.from_pylist([dict(stats, units=list(units), unit_rows=list(counts))], schema=SUMMARY_SCHEMA)


def worker_kwargs(model: ModelSpec, params, resources: ResourcesSpec, storage: StorageSpec | None,
                  job_id: str = "") -> dict:
    """What a worker is built from: the model, the task's params, and from the resources only its GPU share and its
    batch deadline (workers/t2i.py, workers/vqa.py), and for a VQA worker its batch size (its warm-up compiles the
    decode graphs of a full batch, model.compile). Small: Ray sends it to every actor it starts."""
    kwargs = dict(model=model, params=params, storage=storage, gpus=resources.gpus_per_worker,
                  batch_timeout_s=resources.batch_timeout_s, job_id=job_id)
    if isinstance(params, VQAParams):
        kwargs["batch_size"] = resources.batch_size
    return kwargs


def inference_stages(ds, kind: str, model: ModelSpec, params, resources: ResourcesSpec, storage: StorageSpec | None,
                     *, job_id: str = "", worker_cls=None):
    """Canonical rows (scheduler/read.py ROW_SCHEMAS, plus any other columns) -> output rows (jobs/output.py SCHEMAS,
    plus the other columns): validate and decode on CPU, bucket VQA rows by question length, the worker pool."""
    import ray

    from flashu_batch.workers import T2IWorker, VQAWorker

    worker_cls = worker_cls or (T2IWorker if kind == "t2i" else VQAWorker)
    checks = dict(kind=kind, storage=Storage(storage), params=params)
    if kind == "t2i":
        ds = map_stage(ds, validate_rows, batch_format="pyarrow", **CPU_STAGE, fn_kwargs=checks)
    else:
        # Shape buckets: a whole read block sorted by question length before it is cut into batches (before the
        # pixels exist: sorting moves only the rows as read). Then each image decoded and resized once, here, at the
        # model's resolution (None where the checkpoint's config cannot be read cheaply: the workers resize), in
        # slices of a batch, so that a block holds at most a batch of pixels.
        ds = map_stage(ds, bucket_by_question_length, batch_size=None, batch_format="pyarrow", **CPU_STAGE)
        ds = map_stage(ds, validate_in_blocks, batch_size=None, batch_format="pyarrow", **CPU_STAGE,
                       fn_kwargs=dict(checks, rows_per_block=resources.batch_size,
                                      resolution=input_resolution(model.checkpoint)))
    # Blocks of one batch each (streaming, no shuffle): a read unit is one block of a whole file or row group, and
    # a map task emits its output only when the whole block is done; without this one big file would go through
    # one actor (the others idle) and commit nothing until its last row.
    ds = ds.repartition(target_num_rows_per_block=resources.batch_size)
    ds = map_stage(ds, worker_cls, fn_constructor_kwargs=worker_kwargs(model, params, resources, storage, job_id),
                   resources=dict(resources.custom),  # e.g. {"t2i": 1}: the pool goes only to t2i nodes
                   compute=ray.data.ActorPoolStrategy(size=resources.workers),  # the full pool from the start
                   num_gpus=resources.gpus_per_worker, num_cpus=resources.cpus_per_worker,
                   batch_size=resources.batch_size, batch_format="pyarrow", max_restarts=ACTOR_MAX_RESTARTS,
                   max_task_retries=ACTOR_MAX_TASK_RETRIES)
    return map_stage(ds, to_output_table, batch_format="pyarrow", **CPU_STAGE, fn_kwargs=dict(kind=kind))


def build_task_pipeline(spec, task, *, units: list[dict], output: TaskOutput, storage: Storage, skip=None,
                        run_id: str = "", worker_cls=None):
    """A job task's Dataset of commit summaries (lazy: nothing runs until the driver iterates it): its read units,
    the inference stages, and the exactly-once writer."""
    ds = read_rows(units, task.kind, task.input, storage, skip)
    ds = inference_stages(ds, task.kind, spec.model, task.params, task.resources, spec.storage, job_id=spec.job_id,
                          worker_cls=worker_cls)
    return map_stage(ds, write_and_commit, batch_size=task.rows_per_file, batch_format="pyarrow", **CPU_STAGE,
                     fn_kwargs=dict(output=output, run_id=run_id))
