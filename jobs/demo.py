"""`flashu-batch demo`: the batch system end to end on this machine, with a small model.

It runs examples/demo.yaml through the same path as a production job (spec -> local Ray -> Ray Data pipelines
with an actor pool per task -> Parquet with commit records -> `_SUCCESS` and metrics): text-to-image on
examples/t2i_prompts.jsonl and VQA on examples/vqa_questions.jsonl. With no --model it builds the tiny
seeded-random checkpoint first. Output: <out>/demo/{t2i,vqa}/. Running it again resumes the job: rows already
committed are skipped (delete <out>/demo to start over).
"""

import os

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def demo_spec(out: str, model: str):
    """examples/demo.yaml with the model and output folder of this run."""
    import yaml

    from jobs.spec import parse_spec

    path = os.path.join(EXAMPLES, "demo.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the demo needs the examples/ folder of a source checkout "
                         f"(pip install -e . from the repository).")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["model"]["checkpoint"] = os.path.abspath(model)
    for task in raw["tasks"]:
        task["output"] = os.path.abspath(out)
    return parse_spec(raw, EXAMPLES)


def run_demo(out: str, model: str | None = None) -> None:
    from jobs.output import read_output
    from jobs.run import ProgressPrinter, summary_lines
    from jobs.storage import Storage
    from scheduler.driver import run_job

    os.makedirs(out, exist_ok=True)
    if model is None:
        model = os.path.join(out, "model")
        if not os.path.isfile(os.path.join(model, "config.json")):
            from showo2.tiny import build_tiny_checkpoint

            print(f"building the tiny random-weight Show-o2 checkpoint in {model}")
            build_tiny_checkpoint(model)
    spec = demo_spec(out, model)
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
