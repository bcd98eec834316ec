"""The job runner: a validated JobSpec in, one finalized output folder per task out.

Tasks run one after another, each with the whole cluster for its actor pool. Why sequential: a model load is the
expensive part of a pool's life, and two pools at once would split the GPUs and the object store between them, so
neither runs at its best batch size; one at a time also keeps failures, metrics and progress per task simple.
(A cluster much larger than one task can use is better served by submitting one job per task.)

Per task:
1. Plan the read units and read every id once (pre-pass): duplicates fail the task before any model work, and the
   ids already committed by an earlier run are known, so the rest is counted (for progress and ETA) and a finished
   task starts no actor at all.
2. Stream the pipeline (scheduler/pipeline.py); every summary row is one committed file.
3. Finalize: deduplicate commits by id, write `_SUCCESS` and `metrics.json`, and check that every input id has
   exactly one committed row.
"""

import collections
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace

from jobs.output import TaskOutput, task_root
from jobs.spec import JobSpec
from jobs.storage import Storage
from scheduler.pipeline import build_t2i_pipeline, build_vqa_pipeline, read_rows
from scheduler.read import plan_reads


@dataclass
class Progress:
    task: str
    done: int          # rows committed by this run
    total: int         # rows this run has to do (input rows not committed before)
    errors: int        # error rows among `done`
    skipped: int       # rows committed by earlier runs
    elapsed_s: float
    finished: bool = False

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
        return (f"{self.task}: {self.done}/{self.total} rows, {self.errors} errors, {self.rows_per_s:.2f} rows/s, "
                f"ETA {eta}{skipped}")


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1


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
    # Logical CPUs are scheduling tokens: make room for the largest pool plus its read/validate/write tasks.
    need = max(t.resources.workers * t.resources.cpus_per_worker for t in spec.tasks) + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), **kwargs)
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
        if problems:
            message = (f"tasks {task.task_name!r}: the actor pool does not fit: {'; '.join(problems)}. Lower "
                       f"resources.workers / gpus_per_worker / cpus_per_worker.")
            if local:
                raise ValueError(message)
            print(f"warning: {message} (waiting for the cluster to scale up)", file=sys.stderr)


def run_job(spec: JobSpec, *, address: str | None = None, quiet: bool = False, on_progress=None,
            worker_classes: dict | None = None) -> dict:
    """Run every task of the spec (resuming a job with this job_id) -> {task name: summary}. on_progress(Progress)
    is called on every committed file and at the end of each task. worker_classes ({"t2i": cls}) replaces a
    task kind's worker class (tests inject failures with it)."""
    import ray
    from ray.data import DataContext

    started = init_ray(spec, address, quiet)
    try:
        # The driver reports progress per committed file: Ray Data's bars, plan logs and the notice that the bars
        # are off would only interleave with it. Its warnings and errors still show.
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        check_resources(spec, local=started)
        storage = Storage(spec.storage)
        return {task.task_name: run_task(spec, task, storage, on_progress, (worker_classes or {}).get(task.kind))
                for task in spec.tasks}
    finally:
        if started:
            ray.shutdown()


def run_task(spec: JobSpec, task, storage: Storage, on_progress=None, worker_cls=None) -> dict:
    name, run_id = task.task_name, uuid.uuid4().hex[:12]
    root = task_root(task.output, spec.job_id, name)
    output = TaskOutput(storage, root)
    start = time.perf_counter()

    # 1. Every input id once (the pre-pass), what earlier runs committed, and what is left
    units = plan_reads(storage, task.input)
    ids = input_ids(units, task, storage)
    committed = frozenset(output.committed_ids())
    pending = sum(1 for i in ids if i not in committed)
    progress = Progress(name, 0, pending, 0, len(ids) - pending, 0.0)

    # 2. The pipeline, streamed: one summary row per committed file
    if pending:
        build = build_t2i_pipeline if task.kind == "t2i" else build_vqa_pipeline
        ds = build(spec, task, units=units, root=root, storage=storage, committed=committed, run_id=run_id,
                   worker_cls=worker_cls)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["committed"]:
                    progress.done += row["rows"]
                    progress.errors += row["errors"]
                progress.elapsed_s = time.perf_counter() - start
                if on_progress:
                    on_progress(replace(progress))  # a snapshot: the callback may keep it
    progress.elapsed_s, progress.finished = time.perf_counter() - start, True
    if on_progress:
        on_progress(replace(progress))

    # 3. Finalize and check the contract: every input id committed exactly once
    seconds = round(progress.elapsed_s, 3)
    metrics = dict(job_id=spec.job_id, task=name, kind=task.kind, input_rows=len(ids), rows_this_run=progress.done,
                   errors_this_run=progress.errors, skipped=progress.skipped, seconds=seconds,
                   rows_per_s=round(progress.done / seconds, 4) if seconds else 0.0, run_id=run_id)
    summary = output.finalize(spec.job_id, name, task.kind, metrics)
    lacking = set(ids) - output.committed_ids()
    if lacking:
        raise RuntimeError(f"task {name!r}: {len(lacking)} of {len(ids)} input rows have no committed result (e.g. "
                           f"{sorted(lacking)[:3]}); run the job again to finish them.")
    return dict(summary, output=root)


def input_ids(units: list[dict], task, storage: Storage) -> list[str]:
    """All row ids of the task's input (ids derive from content and position, so this reads the input once).
    Raises ValueError when an id repeats: exactly-once output needs one row per id."""
    ids = []
    if units:
        ds = read_rows(units, task.kind, task.input, storage).select_columns(["id"])
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids.extend(batch.column("id").to_pylist())
    counts = collections.Counter(ids)
    repeated = [(i, n) for i, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(f"{i!r} x{n}" for i, n in sorted(repeated)[:5])
        raise ValueError(f"task {task.task_name!r}: {len(repeated)} row ids repeat in the input ({shown}). Ids must "
                         f"be unique within a task: fix the input's id column, or drop it to derive ids from each "
                         f"row's content and position.")
    return ids
