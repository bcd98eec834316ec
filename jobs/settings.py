"""Settings fixed per job: what changes a task's results is recorded by its first run, and a re-run must match it.

A job's output is meant to be one result set: a re-run resumes it, skipping committed ids. If the re-run's spec
changed `params.steps` or the checkpoint, the job would end with rows made two ways and nothing saying which. So the
first run writes `<output>/<job_id>/<task>/.flashu/settings.json`, and every later run compares:

    kind                                      t2i | vqa
    model.*                                   every ModelSpec field but `device` and `compile` (checkpoint,
                                              vae_path, tokenizer_path with any @revision, dtype, fields added
                                              later)
    model.specialization.<kind>               the task's FlashU artifact ('on_start', a folder, or null)
    params.*                                  every field of the task's T2IParams / VQAParams

A difference is refused before Ray starts (SettingsChanged: a ValueError, exit 2), naming each field with both
values, e.g. `tasks[0] (t2i): params.steps was 6, now 300`. With `allow_changed` the run goes on: settings.json then
holds the new settings and appends the change to its `changes` history, and the driver puts this run's changes in
metrics.json (`settings_changed`). Free to change: resources (workers, batch size, CPUs, GPUs, timeouts),
rows_per_file, input columns, model.device (where, not what: dtype is the setting that changes results),
model.compile (compiled steps change float rounding only, as a batch size does).

Hub references are recorded in one form (hf://org/name@revision), so `org/name` and `hf://org/name` are the same
setting; a branch is recorded as written, not resolved to its commit (that needs the Hub: output rows record the
commit each worker loaded, in their `model` column). A field that only one side has is not compared: a field added
by a newer version defaults to what older versions did, so an upgrade does not refuse a re-run.
"""

import json
import time

from flashu_batch.jobs.output import SETTINGS, task_root
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.showo2.hub import HubError, parse_ref

FORMAT = "flashu-batch-settings/1"
# ModelSpec fields that choose where and how the model runs, not what it computes (compile: float rounding only)
MODEL_RESOURCE_FIELDS = {"device", "compile"}


class SettingsChanged(ValueError):
    """A re-run's settings differ from the ones the job's output was made with; the message names each field."""


def _source(value: str | None, file: bool = False) -> str | None:
    """A model source in one form: a Hub reference as hf://org/name[@revision][/file], anything else as it is."""
    if value is None:
        return None
    try:
        ref = parse_ref(value, file=file)
    except HubError:
        return value
    return str(ref) if ref is not None else value


def task_settings(spec: JobSpec, task) -> dict:
    """The settings that change the task's results (module docstring), as plain JSON data."""
    model = spec.model.model_dump(mode="json", exclude=MODEL_RESOURCE_FIELDS | {"specialization"})
    for key, file in (("checkpoint", False), ("vae_path", True), ("tokenizer_path", False)):
        if key in model:
            model[key] = _source(model[key], file)
    model["specialization"] = {task.kind: getattr(spec.model.specialization, task.kind)}
    return dict(kind=task.kind, model=model, params=task.params.model_dump(mode="json"))


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"params": {"steps": 6}} -> {"params.steps": 6}."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(was: dict, now: dict) -> list[dict]:
    """[{"field", "was", "now"}] for each field both settings have and that differs, sorted by field."""
    a, b = flatten(was), flatten(now)
    return [dict(field=k, was=a[k], now=b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def settings_uri(root: str) -> str:
    return join(root, SETTINGS)


def read_settings(storage: Storage, root: str) -> dict | None:
    """A task folder's settings.json, or None before its first run."""
    try:
        return json.loads(storage.read_bytes(settings_uri(root)))
    except FileNotFoundError:
        return None


def _shown(value) -> str:
    return json.dumps(value)


def fix_settings(storage: Storage, spec: JobSpec, allow_changed: bool = False, run_id: str = "") -> dict:
    """Check every task's settings against its settings.json, then record them -> {task name: [changes]} ([] where
    nothing changed). Raises SettingsChanged, having written nothing, when a task's settings differ and not
    allow_changed. Call it while holding the job's lease (jobs/lease.py): two first runs could each record theirs."""
    # 1. Compare every task first: a refusal names every difference and writes nothing
    found, lines = [], []
    for i, task in enumerate(spec.tasks):
        root = task_root(task.output, spec.job_id, task.task_name)
        recorded, now = read_settings(storage, root), task_settings(spec, task)
        changes = differences(recorded["settings"], now) if recorded else []
        found.append((task, root, recorded, now, changes))
        lines += [f"tasks[{i}] ({task.task_name}): {c['field']} was {_shown(c['was'])}, now {_shown(c['now'])}"
                  for c in changes]
    if lines and not allow_changed:
        raise SettingsChanged(
            f"job {spec.job_id!r} was run with other settings, and its output holds rows made with them:\n  "
            + "\n  ".join(lines) + "\nRun it with the settings it was made with (each task folder's "
            ".flashu/settings.json), give the spec a new job_id to start over, or pass --allow-changed-settings to go "
            "on with the new ones (committed rows keep the old; metrics.json records the change).")

    # 2. Record them: first runs, changed settings, and fields a newer version added
    at = time.time()
    for task, root, recorded, now, changes in found:
        if recorded is not None and flatten(recorded["settings"]) == flatten(now):
            continue
        history = (recorded or {}).get("changes", []) + [dict(c, at=at, run_id=run_id) for c in changes]
        document = dict(format=FORMAT, job_id=spec.job_id, task=task.task_name, settings=now,
                        recorded_at=(recorded or {}).get("recorded_at", at), updated_at=at, run_id=run_id,
                        changes=history)
        storage.write_bytes(settings_uri(root), json.dumps(document, indent=1).encode())
    return {task.task_name: changes for task, _, _, _, changes in found}
