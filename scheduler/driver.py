"""The job runner: a validated JobSpec in, one finalized output folder per task out.

Tasks run one after another, each with the whole cluster for its actor pool. Why sequential: a model load is the
expensive part of a pool's life, and two pools at once would split the GPUs and the object store between them, so
neither runs at its best batch size; one at a time also keeps failures, metrics and progress per task simple.
(A cluster much larger than one task can use is better served by submitting one job per task.)

Per task (nothing the driver holds grows with the number of rows: scheduler/bookkeeping.py):
1. The index pass, as Ray tasks over hash partitions of the ids: every read unit's ids (only the id column where
   the input has one) against every commit record. A repeated id's first row in read order is the one that runs,
   its later rows are skipped and reported (metrics.json "repeated_ids"); committed ids are skipped; what each unit
   has left is counted (for progress and ETA), and a finished task starts no actor at all. Units that an earlier
   run recorded complete (.flashu/units/) are not read.
2. Stream the pipeline (scheduler/pipeline.py) over the units with rows left; every summary row is one committed
   file. A unit whose rows are all committed is checked and recorded complete as the run goes.
3. The final pass, again over partitions: finalize (each id once: jobs/output.py recover and settle, `_SUCCESS`
   and `metrics.json`) and the check that every distinct input id has a committed row (t2i num_images_per_prompt
   n > 1: each of its n output ids). A re-run of a finished task reads no unit and writes nothing.
"""

import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace

from flashu_batch.jobs.ids import key_ordinal, key_unit
from flashu_batch.jobs.lease import JobLease, JobLeased
from flashu_batch.jobs.output import TaskOutput, task_root
from flashu_batch.jobs.settings import fix_settings
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.bookkeeping import (REPEAT_EXAMPLES, Index, UnitTracker, final_pass, forget_units,
                                                index_input, record_units)
from flashu_batch.scheduler.pipeline import (MAX_INLINE_BYTES, READ_CPUS, TASK_OOM_RETRIES, build_task_pipeline,
                                             explain_worker_deaths)
from flashu_batch.scheduler.read import plan_reads, unit_row_ids


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
             _system_config=dict(task_oom_retries=TASK_OOM_RETRIES,  # Ray's default -1 re-runs OOM kills forever
                                 max_direct_call_object_size=MAX_INLINE_BYTES),  # data objects stay out of the driver
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
    """One task of the job (module docstring: index, pipeline, finalize) -> its summary. settings_changed: the
    settings this run changed (jobs/settings.py), recorded in metrics.json. units: the read units, when the caller
    planned them already (run_job plans every task's before it writes anything)."""
    name, run_id = task.task_name, uuid.uuid4().hex[:12]
    root = task_root(task.output, spec.job_id, name)
    output = output_class(storage, root)
    start = time.perf_counter()

    # 1. The index pass: what each read unit has left to do, and the Skip of the read stage (scheduler/bookkeeping.py)
    units = plan_reads(storage, task.input) if units is None else units
    per_id = getattr(task.params, "num_images_per_prompt", 1)  # output rows per input id (t2i; ids image_id)
    index = index_input(units, task, storage, output, limit=limit, retry_errors=retry_errors, images_per_id=per_id)
    todo = int(index.todo.sum())
    progress = Progress(name, 0, todo * per_id, 0, index.done * per_id, 0.0, repeated=index.repeats)
    report = repeats_report(index, task, storage)
    record_units(index, output, index.complete, report)  # the next run does not read these
    repeated_ids = dict(rows=report["rows"], examples=[public(e) for e in report["examples"]])

    # 2. The pipeline over the units with rows to do, streamed: one summary row per committed file
    if todo:
        tracker = UnitTracker(index, output, per_id, report)
        reading = [dict(u, unit=i) for i, u in enumerate(units) if index.todo[i]]
        ds = build_task_pipeline(spec, task, units=reading, output=output, storage=storage, skip=index.skip,
                                 run_id=run_id, worker_cls=worker_cls)
        for batch in explain_worker_deaths(ds.iter_batches(batch_size=None, batch_format="pyarrow"), name):
            for row in batch.to_pylist():
                if row["this_run"]:  # committed by this write, or by its first attempt that died unreported
                    progress.done += row["rows"]
                    progress.errors += row["errors"]
                    tracker.add(row["units"], row["unit_rows"], row["record"])
                progress.elapsed_s = time.perf_counter() - start
                if on_progress:
                    on_progress(replace(progress))  # a snapshot: the callback may keep it
        del ds
    progress.elapsed_s, progress.finished = time.perf_counter() - start, True
    if on_progress:
        on_progress(replace(progress))

    # 3. Finalize and check the contract: every distinct input id committed exactly once
    seconds = round(progress.elapsed_s, 3)
    metrics = dict(job_id=spec.job_id, task=name, kind=task.kind, input_rows=index.input_rows,
                   repeated_ids=repeated_ids, rows_this_run=progress.done, errors_this_run=progress.errors,
                   skipped=progress.skipped, retried_errors=index.retried, seconds=seconds,
                   rows_per_s=round(progress.done / seconds, 4) if seconds else 0.0, run_id=run_id, limit=limit,
                   settings_changed=settings_changed or [])
    if not todo and index.unread.all() and not settings_changed:
        finished = finished_summary(output, metrics)
        if finished is not None:  # every unit recorded complete and finalized: nothing to read, nothing to write
            return dict(finished, output=root)
    records, losers, missing, check = final_pass(index, output, per_id, report)
    if missing and index.unread.any():
        forget_units(output)  # a unit recorded complete may have lost rows with the file: the next run reads all
    summary = output.settle(spec.job_id, name, task.kind, metrics, records, losers, missing)
    if check["lacking"]:
        shown = [r["id"] for r in read_back(units, check["examples"], task, storage)]
        raise RuntimeError(f"task {name!r}: {check['lacking']} input ids have no committed result (e.g. {shown}); "
                           f"run the job again to finish them.")
    if missing and index.unread.any():
        raise RuntimeError(f"task {name!r}: {missing} committed files were missing; the ids they held may have no "
                           f"result now: run the job again to finish them.")
    return dict(summary, output=root)


def finished_summary(output: TaskOutput, metrics: dict) -> dict | None:
    """The summary of a task that an earlier run finished and finalized, when nothing was committed since (its
    records and data files are the manifest's): the re-run writes nothing. None otherwise, and also when the last
    run changed settings (metrics.json then says so; this run, which changes none, finalizes again to say it)."""
    manifest, before = output.current_manifest(), output.metrics()
    if manifest is None or before is None or before.get("settings_changed"):
        return None
    this_run = ("rows_this_run", "errors_this_run", "skipped", "retried_errors", "seconds", "rows_per_s", "run_id",
                "limit", "repeated_ids", "input_rows")
    return dict(manifest, metrics=dict(before, **{k: v for k, v in metrics.items() if k in this_run}))


def read_back(units: list[dict], keys, task, storage: Storage) -> list[dict]:
    """[{"id", "source", "row" (index in its file)}] of a few rows given by read key, in the order given. Their
    units are read again, each once, in one Ray task: a unit can be a whole JSONL file, too big for the driver."""
    import ray

    if not len(keys):  # no task for nothing (a finished job's re-run names its repeats from unit records)
        return []
    where = [(int(key_unit(k)), int(key_ordinal(k))) for k in keys]
    wanted = {}  # unit index -> (unit, ordinals of the wanted rows in it)
    for u, k in where:
        wanted.setdefault(u, (units[u], set()))[1].add(k)
    found = ray.get(ray.remote(_read_back).options(num_cpus=READ_CPUS).remote(wanted, task.kind, task.input, storage))
    return [found[u, k] for u, k in where]


def _read_back(wanted: dict, kind: str, inp, storage: Storage) -> dict:
    found = {}
    for u, (unit, ordinals) in wanted.items():
        for k, (row, row_id) in enumerate(unit_row_ids(unit, kind, inp.format, dict(inp.columns), storage, [])):
            if k in ordinals:
                found[u, k] = dict(id=row_id, source=unit["source"], row=row)
    return found


def repeats_report(index: Index, task, storage: Storage) -> dict:
    """metrics.json's "repeated_ids": how many rows were skipped for an id that came earlier, with the earliest few
    named (the policy: the first row of an id in read order is the one processed; README). Each example also holds
    the read keys of both rows ("key", "first_key"; public() leaves them out): the completion record of a unit keeps
    the examples in it, so a run that does not read the unit still names them."""
    kept = [e for record in index.before.values() for e in record.get("examples", [])]
    pending = [pair for pair in index.examples if pair[0] not in {e["key"] for e in kept}]
    shown = sorted([(e["key"], e) for e in kept] + [(pair[0], pair) for pair in pending],
                   key=lambda item: item[0])[:REPEAT_EXAMPLES]
    keys = [k for _, item in shown if isinstance(item, tuple) for k in item
            if not index.unread[key_unit(k)] or not index.dense[key_unit(k)]]
    rows = dict(zip(keys, read_back(index.units, keys, task, storage)))
    examples = []
    for _, item in shown:
        if isinstance(item, dict):
            examples.append(item)
            continue
        again_key, first_key = item
        again = rows[again_key]
        if first_key in rows:
            first = rows[first_key]
        else:  # its unit is complete and not read: its row by arithmetic (dense: read_ids)
            unit = index.units[key_unit(first_key)]
            first = dict(source=unit["source"], row=unit["first_row"] + int(key_ordinal(first_key)))
        message = (f"id {again['id']!r} at {again['source']} row {again['row']} (from 0) already came at "
                   f"{first['source']} row {first['row']}: this row is skipped, the first one is processed")
        examples.append(dict(again, first_source=first["source"], first_row=first["row"], message=message,
                             key=again_key, first_key=first_key))
    return dict(rows=index.repeats, examples=examples)


def public(example: dict) -> dict:
    return {k: v for k, v in example.items() if k not in ("key", "first_key")}
