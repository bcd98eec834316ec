"""`flashu-batch schema`: the job spec's JSON Schema, every field described (jobs/spec.py)."""

import json

from flashu_batch.app.cli import main


def test_schema_prints_the_spec_schema_as_json_with_descriptions(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "JobSpec" and schema["additionalProperties"] is False
    top = schema["properties"]
    assert set(top) == {"job_id", "model", "storage", "tasks"} and set(schema["required"]) == {"job_id", "model",
                                                                                                 "tasks"}
    for name in ("job_id", "model", "storage", "tasks"):
        assert len(top[name]["description"]) > 20, name
    assert {"T2ITask", "VQATask", "ModelSpec", "ResourcesSpec"} <= set(schema["$defs"])
    batch_size = schema["$defs"]["ResourcesSpec"]["properties"]["batch_size"]
    assert "Rows per model call" in batch_size["description"] and batch_size["minimum"] == 1
