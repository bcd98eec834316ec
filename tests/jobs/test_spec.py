"""jobs/spec.py: a bad spec fails at the edge with every bad field named; a good one resolves its paths."""

import json

import pytest

from flashu_batch.jobs.spec import JobSpec, SpecError, load_spec, parse_spec


def good(**overrides) -> dict:
    raw = dict(job_id="job-1", model=dict(checkpoint="ckpt"),
               tasks=[dict(kind="t2i", input=dict(uris="prompts.jsonl", format="jsonl"), output="out"),
                      dict(kind="vqa", input=dict(uris=["qa.parquet"], format="parquet",
                                                  columns=dict(question="q", image="img")), output="s3://bkt/out")])
    raw.update(overrides)
    return raw


def error_of(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "/base")
    return str(info.value)


def test_good_spec_resolves_relative_paths_and_keeps_uris(tmp_path):
    spec = parse_spec(good(), str(tmp_path))
    assert isinstance(spec, JobSpec)
    assert spec.model.checkpoint == str(tmp_path / "ckpt")
    t2i, vqa = spec.tasks
    assert t2i.input.uris == [str(tmp_path / "prompts.jsonl")] and t2i.task_name == "t2i"
    assert vqa.output == "s3://bkt/out" and vqa.input.columns == {"question": "q", "image": "img"}
    assert t2i.params.steps is None and vqa.params.max_new_tokens == 64 and t2i.resources.workers == 1
    with pytest.raises(Exception):  # frozen
        spec.job_id = "other"


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for sub in getattr(field.annotation, "__args__", (field.annotation,)):
                if isinstance(sub, type) and issubclass(sub, JobSpec.__mro__[1]):
                    walk(sub)
    from flashu_batch.jobs.spec import T2ITask, VQATask
    for model in (JobSpec, T2ITask, VQATask):
        walk(model)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "job_id: j\nmodel: {checkpoint: m, dtype: float32}\n"
        "tasks:\n  - {kind: vqa, input: {uris: data/, format: csv}, output: ../out, params: {max_new_tokens: 8}}\n")
    spec = load_spec(str(tmp_path / "job.yaml"))
    assert spec.tasks[0].output == str(tmp_path.parent / "out") and spec.tasks[0].params.max_new_tokens == 8
    (tmp_path / "job.json").write_text(json.dumps(good()))
    assert load_spec(str(tmp_path / "job.json")).job_id == "job-1"
    (tmp_path / "bad.yaml").write_text("job_id: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse job spec"):
        load_spec(str(tmp_path / "bad.yaml"))
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("change, expected", [
    (dict(job_id="has space"), "job_id: String should match pattern"),
    (dict(model=dict(checkpoint="m", dtype="fp8")), "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    (dict(model=dict(checkpoint="m", vae_path="s3://b/vae.pth")), "model.vae_path: got 's3://b/vae.pth'; this must be"),
    (dict(tasks=[]), "tasks: List should have at least 1 item"),
    (dict(storage=dict(endpoint_url="localhost:9000")), "storage.endpoint_url: got 'localhost:9000'; expected a full URL"),
])
def test_top_level_errors_name_the_field(change, expected):
    assert expected in error_of(good(**change))


@pytest.mark.parametrize("task_change, expected", [
    (dict(kind="xyz"), "tasks[0].kind: got 'xyz'; expected 't2i' or 'vqa'"),
    (dict(params=dict(steps=1)), "tasks[0].params.steps: Input should be greater than or equal to 2 (got 1)"),
    (dict(params=dict(max_new_tokens=5)), "tasks[0].params.max_new_tokens: unknown field"),
    (dict(input=dict(uris="p", format="xml")), "tasks[0].input.format: Input should be 'parquet', 'jsonl' or 'csv'"),
    (dict(input=dict(uris=[], format="csv")), "tasks[0].input.uris: List should have at least 1 item"),
    (dict(input=dict(uris="p", format="csv", columns=dict(question="q"))),
     "tasks[0]: input.columns maps ['question'], which a t2i task does not read"),
    (dict(output="gs://bucket/out"), "tasks[0].output: got 'gs://bucket/out'; expected a local path or an s3://"),
    (dict(resources=dict(cpus_per_worker=0)), "tasks[0].resources.cpus_per_worker: Input should be greater than 0"),
    (dict(resources=dict(workers=2, gpu=1)), "tasks[0].resources.gpu: unknown field"),
])
def test_task_errors_name_the_field(task_change, expected):
    raw = good()
    raw["tasks"][0] = {**raw["tasks"][0], **task_change}
    assert expected in error_of(raw)


def test_all_errors_at_once():
    raw = good(job_id="")
    raw["tasks"][1]["params"] = dict(max_new_tokens=0)
    message = error_of(raw)
    assert "job_id:" in message and "tasks[1].params.max_new_tokens:" in message


def test_cross_field_checks():
    raw = good()
    raw["tasks"].append(dict(raw["tasks"][0]))
    assert "output names ['t2i'] repeat" in error_of(raw)
    raw["tasks"][2]["name"] = "t2i-b"
    parse_spec(raw, "/base")
    raw = good(model=dict(checkpoint="m", specialization=dict(t2i="artifact")))
    raw["tasks"][0]["params"] = dict(steps=20)
    assert "tasks[0].params.steps: got 20 with a FlashU t2i specialist" in error_of(raw)


def test_credentials_are_refused_and_never_echoed():
    message = error_of(good(storage=dict(aws_secret_access_key="SUPER-SECRET-VALUE", endpoint_url="http://h:1")))
    assert "aws_secret_access_key: credentials are never read from a spec" in message
    assert "SUPER-SECRET-VALUE" not in message
    message = error_of(good(model=dict(checkpoint="m", password="SUPER-SECRET-VALUE")))
    assert "model.password: unknown field" in message and "SUPER-SECRET-VALUE" not in message
