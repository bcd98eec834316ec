"""The job runner: a validated JobSpec in, one finalized output folder per task out.

Tasks run one after another, each with the whole cluster for its actor pool. Why sequential: a model load is the
expensive part of a pool's life, and two pools at once would split the GPUs and the object store between them, so
neither runs at its best batch size; one at a time also keeps failures, metrics and progress per task simple.
(A cluster much larger than one task can use is better served by submitting one job per task.)

Per task:
1. Plan the read units and read every id once (pre-pass): a repeated id's first row in read order is the one that
   runs, its later rows are skipped and reported (metrics.json "repeated_ids"); the ids already committed by an
   earlier run are known, so the rest is counted (for progress and ETA) and a finished task starts no actor at all.
2. Stream the pipeline (scheduler/pipeline.py); every summary row is one committed file.
3. Finalize: deduplicate commits by id, write `_SUCCESS` and `metrics.json`, and check that every distinct input id
   has exactly one committed row (t2i num_images_per_prompt n > 1: one for each of its n output ids, committed_masks).

The driver's bookkeeping stays compact at millions of rows: ids are 16-byte hashes in numpy arrays (jobs/ids.py),
commit records are streamed, and what the pipeline skips is put in the object store once (bench/scale.py).
"""

import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from flashu_batch.jobs.ids import HASH, find, first_occurrences, hash_ids
from flashu_batch.jobs.lease import JobLease, JobLeased
from flashu_batch.jobs.output import TaskOutput, failed_mask, image_sources, task_root
from flashu_batch.jobs.settings import fix_settings
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.pipeline import (READ_CPUS, TASK_OOM_RETRIES, Skip, build_task_pipeline,
                                             explain_worker_deaths, read_id_hashes)
from flashu_batch.scheduler.read import InputError, plan_reads, unit_row_ids

REPEAT_EXAMPLES = 5  # repeated ids named in metrics.json and the summary (the count covers all of them)


@dataclass
class Progress:
    task: str
    done: int          # rows committed by this run
    total: int         # rows this run has to do (distinct input ids not committed before)
    errors: int        # error rows among `done`
    skipped: int       # rows committed by earlier runs
    elapsed_s: float
    finished: bool = False
    repeated: int = 0  # input rows skipped because their id came earlier in the input

    @property
    def rows_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.finished or self.done == 0:
            return 0.0 if self.finished else None
        return (self.total - self.done) / self.rows_per_s

    def line(self) -> str:
        eta = "--" if self.eta_s is None else f"{self.eta_s:.0f}s"
        skipped = f", {self.skipped} done before" if self.skipped else ""
        repeated = f", {self.repeated} rows with a repeated id skipped" if self.repeated else ""
        return (f"{self.task}: {self.done}/{self.total} rows, {self.errors} errors, {self.rows_per_s:.2f} rows/s, "
                f"ETA {eta}{skipped}{repeated}")


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1


def local_resources_problem(spec: JobSpec) -> str | None:
    """Why a local Ray cannot run the spec's pools (custom resources), or None."""
    custom = sorted({name for t in spec.tasks for name in t.resources.custom})
    if not custom:
        return None
    return (f"resources.custom asks for {custom}, which only a cluster's node types provide (see ray_cluster.yaml); "
            f"a local Ray has none. Submit the job to such a cluster (flashu-batch submit, or run --address), or drop "
            f"resources.custom to run it here.")


def init_ray(spec: JobSpec, address: str | None = None, quiet: bool = False) -> bool:
    """Connect to `address`, or start a local Ray sized for the spec. Returns True when it started Ray here."""
    if not address:
        # A local Ray binds its services to the machine's network address unless told it is not a cluster; keep a
        # single-machine run on loopback (read when ray is first imported).
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING if quiet else logging.INFO,
                  log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
        return False
    problem = local_resources_problem(spec)
    if problem:  # refused before starting a Ray that cannot have them: a pool asking for one would wait forever
        raise ValueError(problem)
    # Logical CPUs are scheduling tokens: make room for the largest pool plus its read/validate/write tasks.
    need = max(t.resources.workers * t.resources.cpus_per_worker for t in spec.tasks) + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
             _system_config=dict(task_oom_retries=TASK_OOM_RETRIES),  # Ray's default -1 re-runs OOM kills forever
             **kwargs)
    return True


def check_resources(spec: JobSpec, local: bool) -> None:
    """Refuse a plan the cluster cannot hold (a pool that never fills waits forever); warn on an autoscaling one."""
    import ray

    have = ray.cluster_resources()
    for task in spec.tasks:
        res = task.resources
        gpus, cpus = res.workers * res.gpus_per_worker, res.workers * res.cpus_per_worker
        problems = []
        if gpus > have.get("GPU", 0):
            problems.append(f"{res.workers} workers x {res.gpus_per_worker} GPUs = {gpus:g} GPUs, the cluster has "
                            f"{have.get('GPU', 0):g}")
        if cpus >= have.get("CPU", 0):
            problems.append(f"{res.workers} workers x {res.cpus_per_worker} CPUs = {cpus:g} CPUs, the cluster has "
                            f"{have.get('CPU', 0):g} and the read/write stages need some")
        for name, amount in res.custom.items():
            if res.workers * amount > have.get(name, 0):
                problems.append(f"{res.workers} workers x {amount:g} {name!r} = {res.workers * amount:g}, the "
                                f"cluster has {have.get(name, 0):g} (custom resources come from its node types, "
                                f"see ray_cluster.yaml; a local Ray has none: drop resources.custom to run here)")
        if problems:
            message = (f"tasks {task.task_name!r}: the actor pool does not fit: {'; '.join(problems)}. Lower "
                       f"resources.workers / gpus_per_worker / cpus_per_worker.")
            if local:
                raise ValueError(message)
            print(f"warning: {message} (waiting for the cluster to scale up)", file=sys.stderr)


def run_job(spec: JobSpec, *, address: str | None = None, quiet: bool = False, on_progress=None,
            worker_classes: dict | None = None, retry_errors: bool = False,
            output_class: type[TaskOutput] = TaskOutput, limit: int | None = None,
            allow_changed_settings: bool = False) -> dict:
    """Run every task of the spec (resuming a job with this job_id) -> {task name: summary}. on_progress(Progress)
    is called on every committed file and at the end of each task. worker_classes ({"t2i": cls}) replaces a
    task kind's worker class, output_class the writer's TaskOutput (tests inject faults with them). retry_errors:
    the ids that earlier runs committed only as error rows run again, and a row that succeeds replaces the error
    row. limit: only the first `limit` rows of each task's input (in read order) are its input; give such a run a
    job_id of its own (app/run.py limit_spec), since its output holds only those rows.

    Before Ray starts, the run takes the job's lease (jobs/lease.py: raises JobLeased while another driver runs the
    job) and checks the settings that change results against the ones the job was made with (jobs/settings.py:
    raises SettingsChanged, a ValueError, unless allow_changed_settings)."""
    import ray
    from ray.data import DataContext

    if limit is not None and limit < 1:
        raise ValueError(f"limit: got {limit}; expected a positive number of rows per task, or None for all.")

    storage = Storage(spec.storage)
    storage.check_reachable(spec.locations())  # a dead S3 endpoint fails here, in seconds
    roots = {t.task_name: task_root(t.output, spec.job_id, t.task_name) for t in spec.tasks}
    # Every task's read units, planned before anything is written: a missing input fails the job with no trace
    units = {t.task_name: plan_reads(storage, t.input) for t in spec.tasks}
    with JobLease(storage, spec.job_id, roots) as lease:  # one driver per job; released however the run ends
        changed = fix_settings(storage, spec, allow_changed_settings, run_id=lease.run_id)
        started = init_ray(spec, address, quiet)
        try:
            # The driver reports progress per committed file: Ray Data's bars, plan logs and the notice that the
            # bars are off would only interleave with it. Its warnings and errors still show.
            DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
            check_resources(spec, local=started)
            results = {}
            for task in spec.tasks:
                if lease.lost:  # another driver took the job over (this one stalled): leave the rest to it
                    raise JobLeased(lease.lost)
                results[task.task_name] = run_task(spec, task, storage, on_progress,
                                                   (worker_classes or {}).get(task.kind), retry_errors, output_class,
                                                   limit=limit, settings_changed=changed[task.task_name],
                                                   units=units[task.task_name])
            return results
        finally:
            if started:
                ray.shutdown()


def run_task(spec: JobSpec, task, storage: Storage, on_progress=None, worker_cls=None,
             retry_errors: bool = False, output_class: type[TaskOutput] = TaskOutput,
             limit: int | None = None, settings_changed: list[dict] | None = None,
             units: list[dict] | None = None) -> dict:
    """One task of the job (module docstring: pre-pass, pipeline, finalize) -> its summary. settings_changed: the
    settings this run changed (jobs/settings.py), recorded in metrics.json. units: the read units, when the caller
    planned them already (run_job plans every task's before it writes anything)."""
    import ray

    name, run_id = task.task_name, uuid.uuid4().hex[:12]
    root = task_root(task.output, spec.job_id, name)
    output = output_class(storage, root)
    start = time.perf_counter()

    # 1. Every input id once (the pre-pass), what earlier runs committed, and what is left
    units = plan_reads(storage, task.input) if units is None else units
    ids = scan_ids(units, task, storage)
    beyond = np.empty(0, np.int64)  # read positions past `limit` in the units still read: skipped like repeats
    if limit is not None:
        ids, units, beyond = limit_ids(ids, units, limit)
    per_id = getattr(task.params, "num_images_per_prompt", 1)  # output rows per input id (t2i; ids image_id)
    if retry_errors:  # ids whose committed rows are all error rows run again
        committed, done = committed_masks(output, ids.hashes, images_per_id=per_id)
        retried_errors = int((committed & ~done).sum())
        del committed
    else:
        done, retried_errors = committed_mask(output, ids.hashes, images_per_id=per_id), 0
    skipped = int(done.sum())
    progress = Progress(name, 0, (len(done) - skipped) * per_id, 0, skipped * per_id, 0.0,
                        repeated=len(ids.repeats))
    repeated_ids = repeats_report(ids, units, task, storage)

    # 2. The pipeline, streamed: one summary row per committed file. What it skips goes to the object store once.
    if progress.total:
        skip = None
        if skipped or len(ids.repeats) or len(beyond):
            skip = ray.put(Skip(committed=ids.hashes[done], repeats=np.union1d(ids.repeats, beyond),
                                unit_starts=ids.unit_starts))
        del done
        ds = build_task_pipeline(spec, task, units=units, output=output, storage=storage, skip=skip, run_id=run_id,
                                 worker_cls=worker_cls)
        for batch in explain_worker_deaths(ds.iter_batches(batch_size=None, batch_format="pyarrow"), name):
            for row in batch.to_pylist():
                if row["this_run"]:  # committed by this write, or by its first attempt that died unreported
                    progress.done += row["rows"]
                    progress.errors += row["errors"]
                progress.elapsed_s = time.perf_counter() - start
                if on_progress:
                    on_progress(replace(progress))  # a snapshot: the callback may keep it
        del ds, skip
    progress.elapsed_s, progress.finished = time.perf_counter() - start, True
    if on_progress:
        on_progress(replace(progress))

    # 3. Finalize and check the contract: every distinct input id committed exactly once
    seconds = round(progress.elapsed_s, 3)
    metrics = dict(job_id=spec.job_id, task=name, kind=task.kind, input_rows=int(ids.unit_starts[-1]),
                   repeated_ids=repeated_ids, rows_this_run=progress.done, errors_this_run=progress.errors,
                   skipped=progress.skipped, retried_errors=retried_errors, seconds=seconds,
                   rows_per_s=round(progress.done / seconds, 4) if seconds else 0.0, run_id=run_id, limit=limit,
                   settings_changed=settings_changed or [])
    summary = output.finalize(spec.job_id, name, task.kind, metrics)
    lacking = np.flatnonzero(~committed_mask(output, ids.hashes, images_per_id=per_id))
    if len(lacking):
        shown = [r["id"] for r in read_back(units, ids.unit_starts, ids.first[lacking[:3]], task, storage)]
        raise RuntimeError(f"task {name!r}: {len(lacking)} of {len(ids.hashes)} input ids have no committed result "
                           f"(e.g. {shown}); run the job again to finish them.")
    return dict(summary, output=root)


@dataclass
class InputIds:
    """The pre-pass over a task's input: each distinct row id once, as a hash (jobs/ids.py), and where the rows of
    repeated ids sit. A row's read position is its index over the whole input in read order (read units as
    planned, then rows in file order): the same in every run over the same input."""
    hashes: np.ndarray       # (u,) jobs.ids.HASH, sorted: the distinct ids
    first: np.ndarray        # (u,) int64: read position of each one's first row
    repeats: np.ndarray      # (r,) int64, sorted: read positions of the rows whose id came earlier
    examples: list           # [(read position of a repeat, of its id's first row)] for the earliest few repeats
    unit_starts: np.ndarray  # (units + 1,) int64: read position of each unit's first row, then the row count


def scan_ids(units: list[dict], task, storage: Storage) -> InputIds:
    """The pre-pass: every row id, hashed in the read tasks (16 bytes per row reach the driver, no strings). Where
    the input has an id column only the ids are read (Parquet: that column alone, no image bytes); rows without a
    valid id need their content for a derived id (read.unit_row_ids). A JSONL or CSV file that does not decompress, or
    lacks a column that input.keep_columns names, fails the job here, before any model work."""
    per_unit, problems = [np.empty(0, HASH)] * len(units), {}
    if units:
        ds = read_id_hashes(units, task.kind, task.input, storage)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for unit, blob, problem in zip(*(batch.column(c).to_pylist() for c in ("unit", "hashes", "problem"))):
                per_unit[unit] = np.frombuffer(blob, HASH)
                if problem:
                    problems[unit] = problem
    if problems:  # the first in read order, whichever task ended first
        more = f" ({len(problems) - 1} more read units cannot be read either)" if len(problems) > 1 else ""
        raise InputError(f"task {task.task_name!r}: {problems[min(problems)]}{more}")
    return index_ids(per_unit)


def index_ids(per_unit: list[np.ndarray]) -> InputIds:
    """Each read unit's id hashes, in read order -> InputIds: one sort finds the distinct ids and the repeats. The
    list is emptied as it is used (one copy of the hashes at a time)."""
    unit_starts = np.cumsum([0] + [len(h) for h in per_unit], dtype=np.int64)
    hashes = np.concatenate([np.empty(0, HASH)] + per_unit)
    per_unit.clear()
    order, first = first_occurrences(hashes)  # hashes is sorted now
    later = np.flatnonzero(~first)  # sorted-array indices of the rows whose id came earlier
    shown = later[np.argsort(order[later], kind="stable")[:REPEAT_EXAMPLES]]  # the earliest of them in read order
    examples = [(int(order[j]), int(order[np.searchsorted(hashes, hashes[j])])) for j in shown]
    repeats = np.sort(order[later])
    if len(later):  # one array at a time: the old one goes before the next copy
        hashes = hashes[first]
        order = order[first]
    return InputIds(hashes, order, repeats, examples, unit_starts)


def limit_ids(ids: InputIds, units: list[dict], limit: int) -> tuple[InputIds, list[dict], np.ndarray]:
    """(ids, units) cut to the first `limit` read positions (`run --limit`), and the read positions at or past
    `limit` that the kept units still hold. The ids and the final check then cover those rows only; units that
    start at or past `limit` are not read at all."""
    total = int(ids.unit_starts[-1])
    if limit >= total:
        return ids, units, np.empty(0, np.int64)
    kept = int(np.searchsorted(ids.unit_starts[:-1], limit))  # the units that start before the limit
    inside = ids.first < limit
    cut = InputIds(hashes=ids.hashes[inside], first=ids.first[inside], repeats=ids.repeats[ids.repeats < limit],
                   examples=[pair for pair in ids.examples if pair[0] < limit],
                   unit_starts=np.append(ids.unit_starts[:kept], np.int64(limit)))
    return cut, units[:kept], np.arange(limit, ids.unit_starts[kept], dtype=np.int64)


def committed_mask(output: TaskOutput, hashes: np.ndarray, images_per_id: int = 1) -> np.ndarray:
    """(u,) bool: which of the ids `hashes` (sorted) have a commit record, streamed record by record (commit records
    of ids not in the input are ignored)."""
    return committed_masks(output, hashes, succeeded_too=False, images_per_id=images_per_id)[0]


def committed_masks(output: TaskOutput, hashes: np.ndarray, succeeded_too: bool = True, images_per_id: int = 1):
    """(committed, succeeded): (u,) bool each over the ids `hashes` (sorted): which have a committed row, and which
    a committed row that is not an error row (None unless succeeded_too), in one pass over the commit records.
    images_per_id: output rows per input id (t2i num_images_per_prompt); when > 1, an input id is committed
    (succeeded) only once each of its n rows, ids jobs.output.image_id, is."""
    if images_per_id > 1:
        return _image_masks(output, hashes, succeeded_too, images_per_id)
    committed = np.zeros(len(hashes), bool)
    succeeded = np.zeros(len(hashes), bool) if succeeded_too else None
    for record in output.iter_commits():
        found, index = find(hashes, hash_ids(record["ids"]))
        committed[index[found]] = True
        if succeeded_too:
            failed = failed_mask(record["ids"], output.error_ids(record))
            succeeded[index[found & ~failed]] = True
    return committed, succeeded


def _image_masks(output: TaskOutput, hashes: np.ndarray, succeeded_too: bool, n: int):
    """committed_masks for n > 1 output rows per input id: one bit per image k of each input id (n <= 64), set by a
    committed row '<id>#<k>'. A file may hold only some of an id's rows (the writer cuts files by row count), so an
    id whose rows are partly committed runs again; finalize then keeps one row per output id."""
    full = np.uint64((1 << n) - 1)
    committed = np.zeros(len(hashes), np.uint64)
    succeeded = np.zeros(len(hashes), np.uint64) if succeeded_too else None
    for record in output.iter_commits():
        sources, k = image_sources(record["ids"], n)
        found, index = find(hashes, hash_ids(sources))
        found &= k >= 0
        bits = np.left_shift(np.uint64(1), k[found].astype(np.uint64))
        np.bitwise_or.at(committed, index[found], bits)
        if succeeded_too:
            ok = ~failed_mask(record["ids"], output.error_ids(record))[found]
            np.bitwise_or.at(succeeded, index[found][ok], bits[ok])
    return committed == full, (succeeded == full if succeeded_too else None)


def read_back(units: list[dict], unit_starts: np.ndarray, positions, task, storage: Storage) -> list[dict]:
    """[{"id", "source", "row" (index in its file)}] of a few rows given by read position, in the order given. Their
    units are read again, each once, in one Ray task: a unit can be a whole JSONL file, too big for the driver."""
    import ray

    where = [(int(np.searchsorted(unit_starts, p, side="right")) - 1, int(p)) for p in positions]
    wanted = {}  # unit index -> (unit, ordinals of the wanted rows in it)
    for u, p in where:
        wanted.setdefault(u, (units[u], set()))[1].add(p - int(unit_starts[u]))
    found = ray.get(ray.remote(_read_back).options(num_cpus=READ_CPUS).remote(wanted, task.kind, task.input, storage))
    return [found[u, p - int(unit_starts[u])] for u, p in where]


def _read_back(wanted: dict, kind: str, inp, storage: Storage) -> dict:
    found = {}
    for u, (unit, ordinals) in wanted.items():
        for k, (row, row_id) in enumerate(unit_row_ids(unit, kind, inp.format, dict(inp.columns), storage, [])):
            if k in ordinals:
                found[u, k] = dict(id=row_id, source=unit["source"], row=row)
    return found


def repeats_report(ids: InputIds, units: list[dict], task, storage: Storage) -> dict:
    """metrics.json's "repeated_ids": how many rows were skipped for an id that came earlier, with the earliest few
    named (the policy: the first row of an id in read order is the one processed; README)."""
    report = dict(rows=len(ids.repeats), examples=[])
    if ids.examples:
        rows = read_back(units, ids.unit_starts, [p for pair in ids.examples for p in pair], task, storage)
        for again, first in zip(rows[0::2], rows[1::2]):
            message = (f"id {again['id']!r} at {again['source']} row {again['row']} (from 0) already came at "
                       f"{first['source']} row {first['row']}: this row is skipped, the first one is processed")
            report["examples"].append(dict(again, first_source=first["source"], first_row=first["row"],
                                           message=message))
    return report
