"""`flashu-batch demo`: the batch system end to end on this machine, with a small model.

It runs examples/demo.yaml through the same path as a production job (spec -> local Ray -> Ray Data pipelines
with an actor pool per task -> Parquet with commit records -> `_SUCCESS` and metrics): text-to-image on
examples/t2i_prompts.jsonl and VQA on examples/vqa_questions.jsonl, with tiny-shapes (the small trained Show-o2
shipped in showo2/checkpoints/) unless --model names another checkpoint. Output: <out>/demo/{t2i,vqa}/ and a contact
sheet <out>/demo/preview.png. Running it again resumes the job: rows already committed are skipped (delete
<out>/demo to start over).
"""

import os

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def demo_spec(out: str, model: str | None = None):
    """examples/demo.yaml with the output folder (and the model, unless None: the shipped tiny-shapes) of this run."""
    import yaml

    from flashu_batch.jobs.spec import parse_spec

    path = os.path.join(EXAMPLES, "demo.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the demo needs the examples/ folder of a source checkout "
                         f"(pip install -e . from the repository).")
    with open(path) as f:
        raw = yaml.safe_load(f)
    if model is not None:
        raw["model"]["checkpoint"] = os.path.abspath(model)
    for task in raw["tasks"]:
        task["output"] = os.path.abspath(out)
    return parse_spec(raw, EXAMPLES)


def run_demo(out: str, model: str | None = None) -> None:
    from flashu_batch.jobs.output import read_output
    from flashu_batch.app.preview import write_preview
    from flashu_batch.app.run import ProgressPrinter, summary_lines
    from flashu_batch.jobs.storage import Storage
    from flashu_batch.scheduler.driver import run_job

    os.makedirs(out, exist_ok=True)
    spec = demo_spec(out, model)
    local_model = not spec.model.checkpoint.startswith("s3://")
    if local_model and not os.path.isfile(os.path.join(spec.model.checkpoint, "config.json")):
        raise ValueError(f"no checkpoint at {spec.model.checkpoint!r} (config.json missing): the shipped tiny-shapes "
                         f"model comes with a source checkout; or pass --model DIR.")
    results = run_job(spec, quiet=True, on_progress=ProgressPrinter())

    for name, result in results.items():
        table = read_output(Storage(), result["output"])
        for row in table.to_pylist()[:4]:
            if row["error"]:
                shown = f"error: {row['error']}"
            elif name == "t2i":
                shown = f"{row['width']}x{row['height']} PNG ({len(row['image']['bytes'])} bytes), seed {row['seed']}"
            else:
                shown = f"{row['answer']!r} ({row['num_tokens']} tokens)"
            text = row.get("prompt") if name == "t2i" else row.get("question")
            print(f"{name}  {row['id'][:12]:12}  {text!r} -> {shown}")
    print("\n".join(summary_lines(spec, results)))
    sheet = os.path.join(out, spec.job_id, "preview.png")
    write_preview(os.path.join(out, spec.job_id), sheet)
    print(f"contact sheet of the results: {sheet}")
