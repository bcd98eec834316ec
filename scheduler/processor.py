"""`build_processor`: Show-o2 (FlashU) inference as a step of a user's own Ray Dataset, the way `ray.data.llm`
processors are used:

    processor = build_processor(task="t2i", model={"checkpoint": "..."}, params={"guidance_scale": 7.5},
                                resources={"workers": 2, "batch_size": 8})
    processor(ray.data.from_items(rows)).write_parquet("s3://bucket/out")   # the user's own writer

A processor is preprocess -> canonical rows -> the inference stages of scheduler/pipeline.py (the same ones
`flashu-batch run` runs) -> postprocess. One row out per row in (t2i with `num_images_per_prompt` n > 1: n rows, ids
`<id>#<k>`, the input columns repeated): a row that fails comes back with `error` set, under the same per-row rules
as in jobs. Every input column comes out unchanged beside the task's output columns (an output column replaces an
input column of the same name). What jobs add on top (ids stable across re-runs, skipping committed rows,
exactly-once commits) belongs to `flashu-batch run`.
"""

from dataclasses import dataclass
from typing import Callable, Literal

import pyarrow as pa

from flashu_batch.jobs.spec import (ModelSpec, ResourcesSpec, SpecError, StorageSpec, T2IParams, VQAParams,
                                    format_errors)
from flashu_batch.scheduler.pipeline import CPU_STAGE, inference_stages, map_stage
from flashu_batch.scheduler.read import ROW_SCHEMAS, canonical_row, carry_columns

PARAMS = {"t2i": T2IParams, "vqa": VQAParams}
REQUIRED_COLUMNS = {"t2i": ("prompt",), "vqa": ("question", "image")}


@dataclass(frozen=True)
class Processor:
    """A built processor: call it on a Dataset (`processor(ds)`) to get the Dataset of result rows (lazy)."""

    task: Literal["t2i", "vqa"]
    model: ModelSpec
    params: T2IParams | VQAParams
    resources: ResourcesSpec
    storage: StorageSpec
    preprocess: Callable[[dict], dict] | None = None
    postprocess: Callable[[dict], dict] | None = None
    job_id: str = ""
    worker_cls: type | None = None

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = map_stage(ds, canonical_rows, batch_format="pyarrow", **CPU_STAGE, fn_kwargs=dict(kind=self.task))
        ds = inference_stages(ds, self.task, self.model, self.params, self.resources, self.storage,
                              job_id=self.job_id, worker_cls=self.worker_cls)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def _validated(cls, value, field: str):
    """A spec model from a dict (validated, errors named as in job specs) or an instance of it as it is."""
    from pydantic import ValidationError

    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SpecError(f"{field}: expected a dict or a {cls.__name__}, got {type(value).__name__}.")
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise SpecError(format_errors(e, prefix=field, what="processor argument")) from None


def build_processor(task: Literal["t2i", "vqa"], model, params=None, resources=None, *, storage=None,
                    preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None, job_id: str = "",
                    worker_cls: type | None = None) -> Processor:
    """A processor for one task. model, params, resources, storage: the fields of a job spec's `model`, the task's
    `params` and `resources`, and `storage` (jobs/spec.py describes every field), each a dict or the spec's model
    class; validated here, before Ray runs anything (SpecError names each bad field).

    Input rows need the task's columns: t2i `prompt` (and optional `id`, `seed`, `negative_prompt`); vqa `question`
    and `image` (bytes, a `datasets` Image struct {bytes, path}, or a local path / s3:// URI; and optional `id`,
    `seed`). A row without an `id` gets one derived from its content. preprocess / postprocess: functions of one
    row (dict -> dict) run before and after, as in ray.data.llm. job_id: mixed into derived seeds (a job's own id in
    `flashu-batch run`). worker_cls: a subclass of the task's worker (tests inject faults with it).
    """
    if task not in PARAMS:
        raise SpecError(f"task: got {task!r}; expected 't2i' or 'vqa'.")
    return Processor(task=task, model=_validated(ModelSpec, model, "model"),
                     params=_validated(PARAMS[task], params, "params"),
                     resources=_validated(ResourcesSpec, resources, "resources"),
                     storage=_validated(StorageSpec, storage, "storage"), preprocess=preprocess,
                     postprocess=postprocess, job_id=job_id, worker_cls=worker_cls)


def canonical_rows(batch: pa.Table, kind: str) -> pa.Table:
    """A user's rows -> the task's canonical columns (scheduler/read.py: types checked, ids derived from content when
    absent, bad values as the row's error), then every other input column unchanged."""
    import os

    required = REQUIRED_COLUMNS[kind]
    optional = ("id", "seed", "negative_prompt") if kind == "t2i" else ("id", "seed")
    names = batch.column_names
    missing = [name for name in required if name not in names]
    if missing:
        raise ValueError(f"Required input columns {missing} not found at the input of the {kind} processor. Input "
                         f"columns: {names}. It reads {list(required)} and, if present, {list(optional)}; rename "
                         f"yours in a preprocess function.")
    values = {name: batch.column(name).to_pylist() for name in (*required, *optional) if name in names}
    # A derived id depends on the row's content only: rows of a Dataset have no position that is stable across runs.
    rows = [canonical_row(kind, {name: column[i] for name, column in values.items()}, {}, None, source="",
                          position=0, base=os.getcwd(), where=f"row {i}") for i in range(batch.num_rows)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMAS[kind])
    return carry_columns(table, batch, table.column_names)
