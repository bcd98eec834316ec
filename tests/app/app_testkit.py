"""Spec builders for the application's tests: small CPU jobs of the shipped tiny-shapes model (trained, fast on
CPU: about a quarter of a second per 50-step image)."""

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SHAPES = os.path.join(REPO, "showo2", "checkpoints", "tiny-shapes")


def cpu_task(kind: str, uris, output: str, fmt: str = "jsonl", **fields) -> dict:
    """One worker, fractional CPUs, two rows per batch and per file."""
    params = dict(steps=2, guidance_scale=1.5) if kind == "t2i" else dict(max_new_tokens=4)
    task = dict(kind=kind, input=dict(uris=uris, format=fmt), output=output, params=params, rows_per_file=2,
                resources=dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=2))
    task.update(fields)
    return task


def job(job_id: str, tasks: list[dict], checkpoint: str = TINY_SHAPES) -> dict:
    return dict(job_id=job_id, model=dict(checkpoint=checkpoint, dtype="float32", device="cpu"), tasks=tasks)


def write_prompts(path, n: int, prefix: str = "r", first: int = 0) -> str:
    """A JSONL file of n prompts with ids <prefix>000, <prefix>001, ... (from `first`)."""
    path.write_text("".join(json.dumps({"id": f"{prefix}{i:03d}", "prompt": f"a red circle {i}"}) + "\n"
                            for i in range(first, first + n)))
    return str(path)


def write_spec(path, raw: dict) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
