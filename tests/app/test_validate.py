"""`flashu-batch validate` (app/validate.py): every problem a run would meet before model work, one line each, and the
plan; `run` refuses the same problems before Ray starts. No Ray here."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app_testkit import TINY_SHAPES, cpu_task, job, write_prompts, write_spec
from batch_testkit import make_bucket, png_bytes
from flashu_batch.app.cli import main
from flashu_batch.app.validate import check_job, file_rows, plan_lines, review_job
from flashu_batch.jobs.output import SCHEMAS, TaskOutput
from flashu_batch.jobs.spec import StorageSpec, load_spec, parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.read import plan_reads, unit_rows


def reader_rows(storage: Storage, task) -> int:
    """Rows the scheduler's reader yields for a task's input (what file_rows must agree with)."""
    return sum(1 for unit in plan_reads(storage, task.input)
               for _ in unit_rows(unit, task.kind, task.input.format, dict(task.input.columns), storage))


def write_inputs(tmp_path) -> dict:
    """One input of each format, each with something a naive count gets wrong."""
    jsonl = tmp_path / "prompts.jsonl"  # a BOM, blank lines, a line of non-ASCII space, a last line without "\n"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\n".join([json.dumps({"prompt": "a"}).encode(), b"", b"  ",
                                                     "\u00a0".encode(), json.dumps({"prompt": "b"}).encode(),
                                                     b"not json", json.dumps({"prompt": "c"}).encode()]))
    csv = tmp_path / "csv"
    csv.mkdir()  # a folder of two files; a quoted field holds a newline
    (csv / "a.csv").write_text('id,prompt\nx1,"a red\ncircle"\nx2,a square\n')
    (csv / "b.csv").write_text("prompt\na blue circle\n")
    images = pa.table({"question": [f"what is {i}?" for i in range(5)], "image": [png_bytes()] * 5})
    pq.write_table(images, tmp_path / "vqa.parquet", row_group_size=2)  # 3 row groups
    return dict(jsonl=str(jsonl), csv=str(csv), parquet=str(tmp_path / "vqa.parquet"))


def good_spec(tmp_path) -> dict:
    inputs, out = write_inputs(tmp_path), str(tmp_path / "out")
    return job("checked", [cpu_task("t2i", inputs["jsonl"], out),
                           cpu_task("t2i", inputs["csv"], out, fmt="csv", name="csv-prompts"),
                           cpu_task("vqa", inputs["parquet"], out, fmt="parquet")])


def test_a_good_job_has_no_problems_and_its_plan_counts_rows_as_the_reader_does(tmp_path, capsys):
    raw = good_spec(tmp_path)
    spec, storage = parse_spec(raw), Storage()
    review = review_job(spec)
    assert review.problems == []
    counted = {name: [rows for _, _, rows in inputs] for name, inputs in review.inputs.items()}
    assert counted == {"t2i": [4], "csv-prompts": [3], "vqa": [5]}  # 4: three prompts and the line that is not JSON
    for task in spec.tasks:
        files = sorted({unit["uri"] for unit in plan_reads(storage, task.input)})
        assert counted[task.task_name] == [reader_rows(storage, task)]
        assert sum(file_rows(storage, uri, task.input.format) for uri in files) == reader_rows(storage, task)
    opened = review_job(spec, count_rows=False)  # what `run` checks: every file opens, none is counted
    assert opened.problems == [] and opened.inputs["csv-prompts"] == [(str(tmp_path / "csv"), 2, None)]
    # rows committed by an earlier run show in the plan
    table = pa.Table.from_pylist([dict(id=i, prompt=i) for i in "abc"], schema=SCHEMAS["t2i"])  # the rest null
    TaskOutput(storage, join(str(tmp_path / "out"), "checked", "t2i")).write_and_commit(table)
    lines = plan_lines(spec, review)
    text = "\n".join(lines)
    assert lines[0] == "job checked: 3 task(s), run in this order"
    assert f"model: {TINY_SHAPES} (float32, device cpu); FlashU: none (the exact baseline)" in text
    assert "  task t2i (t2i):" in lines and "  task csv-prompts (t2i):" in lines and "  task vqa (vqa):" in lines
    assert f"input {tmp_path / 'prompts.jsonl'} (jsonl, 1 file): 4 rows" in text
    assert f"input {tmp_path / 'csv'} (csv, 2 files): 3 rows" in text
    assert f"input {tmp_path / 'vqa.parquet'} (parquet, 1 file): 5 rows" in text
    assert f"output {tmp_path / 'out' / 'checked' / 't2i'}: 3 rows committed by earlier runs (skipped)" in text
    assert f"output {tmp_path / 'out' / 'checked' / 'vqa'}: nothing committed yet; 2 rows per file" in text
    assert "params: steps=2, guidance_scale=1.5, seed_policy=row, truncate=False" in text
    assert "params: max_new_tokens=4, layout=demo" in text
    assert "resources: 1 worker x batch 2, 0 GPUs and 0.5 CPUs per worker" in text

    assert main(["validate", write_spec(tmp_path / "job.json", raw)]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "job checked: ready to run" in printed.out and "4 rows" in printed.out
    assert not os.path.exists(tmp_path / "out" / "checked" / "vqa")  # validate writes nothing


def test_every_problem_is_one_line_on_stderr_and_exit_2(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "empty-model"
    not_a_checkpoint.mkdir()
    no_meta = tmp_path / "vqa-artifact"
    no_meta.mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "no-jsonl").mkdir()
    (tmp_path / "no-jsonl" / "notes.txt").write_text("x")
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    t2i = cpu_task("t2i", [prompts, str(tmp_path / "missing.jsonl")], str(tmp_path / "out"))
    t2i["params"] = dict(guidance_scale=1.5)  # a specialist fixes the steps
    raw = job("broken", [t2i, cpu_task("vqa", str(tmp_path / "no-jsonl"), str(tmp_path / "a-file" / "out"))],
              checkpoint=str(not_a_checkpoint))
    raw["model"]["specialization"] = dict(t2i=str(tmp_path / "no-artifact"), vqa=str(no_meta))
    problems = check_job(parse_spec(raw))
    assert all("\n" not in p for p in problems)
    starts = [f"model.checkpoint: {str(not_a_checkpoint)!r} has no config.json; point it at a Show-o2 checkpoint",
              f"model.specialization.t2i: artifact folder {str(tmp_path / 'no-artifact')!r} does not exist; make "
              f"one with `flashu-batch specialize --task t2i --checkpoint ... --out {tmp_path / 'no-artifact'}`",
              f"model.specialization.vqa: {str(no_meta)!r} has no flashu_vqa.json, so it is not a vqa artifact",
              f"task 't2i': input {str(tmp_path / 'missing.jsonl')!r} does not exist",
              f"task 'vqa': input {str(tmp_path / 'no-jsonl')!r}: no jsonl file there",
              f"task 'vqa': output {str(tmp_path / 'a-file' / 'out')!r} cannot be created: "
              f"{str(tmp_path / 'a-file')!r} is a file."]
    assert len(problems) == len(starts), problems
    for line, start in zip(problems, starts):
        assert line.startswith(start), line
    # the same job through the command line: the plan still prints, the problems go to stderr, one line each
    path = write_spec(tmp_path / "job.json", raw)
    assert main(["validate", path]) == 2
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [f"flashu-batch validate: error: {p}" for p in problems]
    assert f"input {prompts} (jsonl, 1 file): 3 rows" in printed.out and "ready to run" not in printed.out


def test_a_checkpoint_without_vae_or_tokenizer_and_an_output_under_a_file(tmp_path, writable_copy):
    model = writable_copy(TINY_SHAPES, str(tmp_path / "model"))
    os.remove(os.path.join(model, "Wan2.1_VAE.pth"))
    os.remove(os.path.join(model, "tokenizer.json"))
    os.remove(os.path.join(model, "tokenizer_config.json"))
    (tmp_path / "a-file").write_text("x")
    raw = job("no-vae", [cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 2), str(tmp_path / "a-file" / "o"))],
              checkpoint=model)
    problems = check_job(parse_spec(raw))  # HF_HUB_OFFLINE=1 and an empty Hub cache (tests/conftest.py)
    assert problems[0].startswith(
        f"model.vae_path (unset, and {model!r} has no Wan2.1_VAE.pth: the default): file 'Wan2.1_VAE.pth' of Hub "
        f"model 'Wan-AI/Wan2.1-T2V-14B' (revision 'main') is not in the local Hub cache")
    assert "HF_HUB_OFFLINE is set" in problems[0]
    assert problems[1:] == [
        f"model.checkpoint: no tokenizer.json or tokenizer_config.json in {[model, os.path.join(model, 'tokenizer')]}; "
        f"set model.tokenizer_path to a Qwen2.5 tokenizer folder or Hub id.",
        f"task 't2i': output {str(tmp_path / 'a-file' / 'o')!r} cannot be created: {str(tmp_path / 'a-file')!r} is a "
        f"file. Choose another output folder."]


def test_s3_inputs_are_counted_and_a_missing_bucket_is_named_once(s3_endpoint, tmp_path):
    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "validate-in")
    storage.write_bytes(f"{bucket}/in/prompts.jsonl", b"".join(
        json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(7)))
    for name in ("config.json", "Wan2.1_VAE.pth", "tokenizer.json"):  # only looked up, never loaded
        storage.write_bytes(f"{bucket}/model/{name}", b"{}")
    raw = job("s3", [cpu_task("t2i", f"{bucket}/in/prompts.jsonl", "s3://no-such-bucket/out"),
                     cpu_task("t2i", f"{bucket}/in/", "s3://no-such-bucket/out", name="folder")],
              checkpoint=f"{bucket}/model")
    raw["storage"] = dict(endpoint_url=s3_endpoint, path_style=True)
    spec = parse_spec(raw)
    review = review_job(spec)
    assert review.problems == [f"task 't2i' output, task 'folder' output: bucket 'no-such-bucket' does not exist at "
                               f"S3 endpoint {s3_endpoint}. Check the bucket names in the spec and "
                               f"storage.endpoint_url."]
    assert review.inputs == {"t2i": [(f"{bucket}/in/prompts.jsonl", 1, 7)], "folder": [(f"{bucket}/in/", 1, 7)]}
    plan = "\n".join(plan_lines(spec, review))
    assert "output s3://no-such-bucket/out/s3/t2i: committed rows unknown (its S3 bucket is missing or unreachable)" \
        in plan


def test_an_unreachable_endpoint_is_one_line_and_nothing_else_is_tried(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = job("down", [cpu_task("t2i", "s3://in/prompts.jsonl", "s3://out/o")], checkpoint="s3://models/m")
    raw["storage"] = dict(endpoint_url=f"http://127.0.0.1:{port}", path_style=True)
    start = time.monotonic()
    problems = check_job(parse_spec(raw))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"S3 endpoint http://127.0.0.1:{port} is unreachable"), problems
    assert time.monotonic() - start < 30


def test_run_refuses_a_job_with_problems_before_starting_ray(tmp_path, capsys, monkeypatch):
    import flashu_batch.app.run as run_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("run_and_report was called for a job with problems")

    monkeypatch.setattr(run_module, "run_and_report", must_not_run)
    raw = job("refused", [cpu_task("t2i", str(tmp_path / "missing.jsonl"), str(tmp_path / "out"))])
    assert main(["run", write_spec(tmp_path / "job.json", raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-batch run: error: task 't2i': input ") and len(err.splitlines()) == 1
    # --limit checks the smoke test's own job (its id) the same way
    assert main(["run", write_spec(tmp_path / "job.json", raw), "--limit", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_run_limit_must_be_positive(tmp_path, capsys, limit):
    raw = job("limits", [cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 2), str(tmp_path / "out"))])
    assert main(["run", write_spec(tmp_path / "job.json", raw), "--limit", limit]) == 2
    assert f"--limit: got {limit}; expected a positive number of rows per task." in capsys.readouterr().err


def test_the_shipped_demo_spec_validates(capsys):
    from flashu_batch.app.demo import EXAMPLES

    spec = load_spec(os.path.join(EXAMPLES, "demo.yaml"))
    assert check_job(spec) == []
    text = "\n".join(plan_lines(spec))
    assert "(jsonl, 1 file): 6 rows" in text and "(jsonl, 1 file): 4 rows" in text


def test_custom_resources_are_a_problem_only_for_a_local_run(tmp_path):
    task = cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 2), str(tmp_path / "out"))
    task["resources"]["custom"] = {"t2i": 1}
    spec = parse_spec(job("custom", [task]))
    assert check_job(spec) == []  # a cluster's node types may provide them
    assert [p[:49] for p in check_job(spec, local=True)] == ["resources.custom asks for ['t2i'], which only a c"]
    assert "custom resources {'t2i': 1.0} per worker (a cluster's node types)" in "\n".join(plan_lines(spec))


def test_an_artifact_is_checked_by_its_meta_file(tmp_path):
    from flashu_batch.flashu.artifact import FORMAT

    good, wrong = tmp_path / "t2i-artifact", tmp_path / "vqa-artifact"
    good.mkdir()
    wrong.mkdir()
    (good / "flashu_t2i.json").write_text(json.dumps(dict(format=FORMAT, task="t2i")))
    (wrong / "flashu_vqa.json").write_text(json.dumps(dict(format=FORMAT, task="t2i")))  # copied from a t2i one
    task = cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 2), str(tmp_path / "out"))
    task["params"] = dict(guidance_scale=1.5)  # a specialist fixes the steps
    raw = job("artifacts", [task])
    raw["model"]["specialization"] = dict(t2i=str(good), vqa=str(wrong))
    spec = parse_spec(raw)
    assert check_job(spec) == [
        f"model.specialization.vqa: {str(wrong / 'flashu_vqa.json')!r} is not a {FORMAT} 'vqa' artifact (format, "
        f"task: ('{FORMAT}', 't2i')); make one with `flashu-batch specialize --task vqa --checkpoint ... --out "
        f"{wrong}`."]
    assert f"FlashU: t2i {good}, vqa {wrong}" in "\n".join(plan_lines(spec))


def test_an_artifact_made_for_another_checkpoint_is_refused_before_ray(tmp_path, writable_copy):
    """A real artifact (flashu-batch specialize) against its own checkpoint passes; against a checkpoint whose
    weights differ it is a problem naming the field."""
    import torch
    from safetensors.torch import load_file, save_file

    from flashu_batch.app.specialize import run_specialize

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "flashu.json").write_text(json.dumps({"num_inference_steps": 5, "guidance_schedule": [[2, 3.0], [2, 5.0]],
                                                     "full_network_calls": 2, "calibration_steps": 2}))
    artifact = str(tmp_path / "artifact")
    run_specialize("t2i", TINY_SHAPES, artifact, str(tmp_path / "flashu.json"), str(tmp_path / "prompts.txt"))
    task = cpu_task("t2i", write_prompts(tmp_path / "p.jsonl", 2), str(tmp_path / "out"))
    task["params"] = dict(guidance_scale=1.5)
    raw = job("made-for", [task])
    raw["model"]["specialization"] = dict(t2i=artifact)
    assert check_job(parse_spec(raw)) == []

    other = writable_copy(TINY_SHAPES, str(tmp_path / "other"))  # the same model, one more tensor in its weights
    weights = load_file(os.path.join(other, "model.safetensors"))
    save_file({**weights, "extra": torch.zeros(8)}, os.path.join(other, "model.safetensors"))
    raw["model"]["checkpoint"] = other
    problems = check_job(parse_spec(raw))
    assert len(problems) == 1 and problems[0].startswith(
        f"model.specialization.t2i: the artifact {artifact!r} was made for another checkpoint than {other!r} (its "
        f"model.safetensors differ")
