"""Settings fixed per job (jobs/settings.py): what is recorded and compared, without Ray; then `flashu-batch run` of
a finished job with other settings: refused (exit 2) writing nothing, allowed with --allow-changed-settings
(metrics.json records the change), and resources free to change."""

import json

import pytest

from app_testkit import cpu_task, job, write_prompts, write_spec
from batch_testkit import folder_snapshot
import flashu_batch.app.submit as submit_module
from flashu_batch.app.cli import build_parser, main
from flashu_batch.jobs.output import TaskOutput
from flashu_batch.jobs.settings import (SettingsChanged, differences, fix_settings, read_settings, settings_uri,
                                        task_settings)
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage


def two_tasks(tmp_path, t2i_params=None, vqa_params=None, **model) -> dict:
    out = str(tmp_path / "out")
    raw = job("fixed", [cpu_task("t2i", "prompts.jsonl", out), cpu_task("vqa", "questions.jsonl", out)])
    raw["tasks"][0]["params"].update(t2i_params or {})
    raw["tasks"][1]["params"].update(vqa_params or {})
    raw["model"].update(model)
    return raw


def test_task_settings_hold_what_changes_results_and_nothing_else(tmp_path):
    raw = two_tasks(tmp_path, vae_path="/models/vae.pth", specialization={"t2i": "on_start"})
    del raw["tasks"][0]["params"]["steps"]  # a specialist's plan fixes the step count
    spec = parse_spec(raw, str(tmp_path))
    t2i, vqa = (task_settings(spec, task) for task in spec.tasks)
    assert t2i["kind"] == "t2i" and t2i["params"] == spec.tasks[0].params.model_dump(mode="json")
    assert t2i["model"] == dict(checkpoint=spec.model.checkpoint, dtype="float32", vae_path="/models/vae.pth",
                                tokenizer_path=None, specialization={"t2i": "on_start"})  # no device, no compile
    assert vqa["model"]["specialization"] == {"vqa": None} and vqa["params"]["max_new_tokens"] == 4
    # Hub references in one form; a revision is part of the setting
    a = task_settings(parse_spec(dict(two_tasks(tmp_path), model=dict(checkpoint="org/model@v1"))), spec.tasks[0])
    b = task_settings(parse_spec(dict(two_tasks(tmp_path), model=dict(checkpoint="hf://org/model@v1"))), spec.tasks[0])
    c = task_settings(parse_spec(dict(two_tasks(tmp_path), model=dict(checkpoint="org/model@v2"))), spec.tasks[0])
    assert a["model"]["checkpoint"] == "hf://org/model@v1" and differences(a, b) == []
    assert differences(a, c) == [dict(field="model.checkpoint", was="hf://org/model@v1", now="hf://org/model@v2")]


def test_differences_skip_fields_only_one_side_has():
    was = {"kind": "t2i", "params": {"steps": 6, "guidance_scale": 7.5}}
    now = {"kind": "t2i", "params": {"steps": 300, "guidance_scale": 7.5, "added_later": "x"}}
    assert differences(was, now) == [dict(field="params.steps", was=6, now=300)]


def test_fix_settings_records_refuses_naming_every_field_and_allows(tmp_path):
    storage = Storage()
    first = parse_spec(two_tasks(tmp_path), str(tmp_path))
    assert fix_settings(storage, first, run_id="run1") == {"t2i": [], "vqa": []}
    root = str(tmp_path / "out" / "fixed" / "t2i")
    recorded = read_settings(storage, root)
    assert recorded["settings"] == task_settings(first, first.tasks[0]) and recorded["changes"] == []

    # resources, rows_per_file, input columns, device and compile change freely
    free = two_tasks(tmp_path, device="auto", compile="on")
    free["tasks"][0].update(rows_per_file=5, resources=dict(workers=2, batch_size=1, gpus_per_worker=0,
                                                            batch_timeout_s=30), input=dict(
        uris="prompts.jsonl", format="jsonl", columns={"prompt": "caption"}))
    assert fix_settings(storage, parse_spec(free, str(tmp_path))) == {"t2i": [], "vqa": []}

    changed = parse_spec(two_tasks(tmp_path, t2i_params=dict(steps=300), vqa_params=dict(layout="training"),
                                   dtype="bfloat16"), str(tmp_path))
    before = {t: open(settings_uri(str(tmp_path / "out" / "fixed" / t)), "rb").read() for t in ("t2i", "vqa")}
    with pytest.raises(SettingsChanged) as refused:
        fix_settings(storage, changed)
    message = str(refused.value)
    for line in ('tasks[0] (t2i): model.dtype was "float32", now "bfloat16"', "tasks[0] (t2i): params.steps was 2, "
                 "now 300", 'tasks[1] (vqa): model.dtype was "float32", now "bfloat16"',
                 'tasks[1] (vqa): params.layout was "demo", now "training"', "--allow-changed-settings"):
        assert line in message, message
    assert before == {t: open(settings_uri(str(tmp_path / "out" / "fixed" / t)), "rb").read() for t in before}

    allowed = fix_settings(storage, changed, allow_changed=True, run_id="run2")
    assert allowed["t2i"] == [dict(field="model.dtype", was="float32", now="bfloat16"),
                              dict(field="params.steps", was=2, now=300)]
    recorded = read_settings(storage, root)
    assert recorded["settings"]["params"]["steps"] == 300 and recorded["run_id"] == "run2"
    assert [(c["field"], c["run_id"]) for c in recorded["changes"]] == [("model.dtype", "run2"),
                                                                       ("params.steps", "run2")]
    assert fix_settings(storage, changed) == {"t2i": [], "vqa": []}  # the new settings are the job's now


def test_a_rerun_with_other_settings_is_refused_writing_nothing_unless_allowed(ray_module, tmp_path, capsys):
    raw = job("steps", [cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", 4), str(tmp_path / "out"))])
    path = write_spec(tmp_path / "job.json", raw)
    assert main(["run", path, "--quiet"]) == 0
    capsys.readouterr()
    root = str(tmp_path / "out" / "steps" / "t2i")
    before = folder_snapshot(root)
    assert ".flashu/settings.json" in before and ".flashu/lease.json" not in before

    raw["tasks"][0]["params"]["steps"] = 3
    write_spec(tmp_path / "job.json", raw)
    assert main(["run", path]) == 2
    out, err = capsys.readouterr()
    assert "tasks[0] (t2i): params.steps was 2, now 3" in err and err.startswith("flashu-batch run: error: ")
    assert "rows" not in out  # no progress: nothing ran
    assert folder_snapshot(root) == before  # no data file, commit record, metrics or settings change

    resources = json.loads(json.dumps(raw))  # the recorded steps, other resources: allowed
    resources["tasks"][0]["params"]["steps"] = 2
    resources["tasks"][0]["resources"]["batch_size"] = 1
    assert main(["run", write_spec(tmp_path / "resources.json", resources), "--quiet"]) == 0
    assert TaskOutput(Storage(), root).metrics()["settings_changed"] == []

    assert main(["run", path, "--quiet", "--allow-changed-settings"]) == 0
    out = capsys.readouterr().out
    assert "settings changed by this run (--allow-changed-settings): params.steps 2 -> 3" in out
    metrics = TaskOutput(Storage(), root).metrics()
    assert metrics["settings_changed"] == [dict(field="params.steps", was=2, now=3)]
    assert metrics["rows"] == 4 and metrics["rows_this_run"] == 0
    assert read_settings(Storage(), root)["settings"]["params"]["steps"] == 3
    assert main(["run", path, "--quiet"]) == 0  # the job's settings now: no refusal, no change recorded
    assert TaskOutput(Storage(), root).metrics()["settings_changed"] == []


def test_submit_passes_allow_changed_settings_to_the_cluster_run(monkeypatch):
    sent = {}

    class Client:  # the Jobs API client, as far as submit uses it
        def list_jobs(self):
            return []

        def submit_job(self, **kwargs):
            sent.update(kwargs)

    monkeypatch.setattr(submit_module, "connect", lambda address: Client())
    spec = parse_spec(job("sub", [cpu_task("t2i", "/data/prompts.jsonl", "/data/out")]))
    assert submit_module.submit(spec, "http://head:8265", allow_changed_settings=True) == "sub"
    assert sent["entrypoint"] == "flashu-batch run job.json --address auto --allow-changed-settings"
    assert build_parser().parse_args(sent["entrypoint"].split()[1:]).allow_changed_settings  # the cluster's run
    assert build_parser().parse_args(["submit", "job.yaml", "--allow-changed-settings"]).allow_changed_settings
