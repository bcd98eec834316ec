"""Scheduler overhead: the whole batch pipeline with a no-op T2I worker of the real interface.

    python -m bench.scheduler [--rows 2000] [--workers 2] [--batch-size 32] [--work-ms 0]

Reads a JSONL of prompts, validates, skips committed ids, batches, runs the actor pool and writes + commits Parquet
exactly as a real job, but the worker returns a fixed 1x1 PNG without a model, after sleeping --work-ms per batch
(a stand-in for GPU time). Reported: rows/s through the whole pipeline (with --work-ms 0: the scheduler's own
ceiling), and per actor the fraction of the time between the end of its first batch and the start of its last that
it spent waiting for input (with work: is the pool kept fed? goal < 5%). The last line printed is one JSON object.
"""

import argparse
import io
import json
import os
import tempfile
import time

from PIL import Image

from flashu_batch.workers.common import passthrough_columns, read_columns, to_table
from flashu_batch.workers.t2i import T2IWorker

PNG_1x1 = io.BytesIO()
Image.new("RGB", (1, 1)).save(PNG_1x1, format="PNG")


class NoOpT2IWorker(T2IWorker):
    """T2IWorker's interface and output columns, no model; logs each call's (start, end) to a file per actor."""

    def __init__(self, model, params, **kwargs):
        self.log = os.path.join(os.environ["FLASHU_BENCH_LOG"], f"actor-{os.getpid()}.jsonl")

    def __call__(self, batch):
        start = time.perf_counter()
        time.sleep(float(os.environ["FLASHU_BENCH_WORK_MS"]) / 1000)
        cols = read_columns(batch, self.INPUT_COLUMNS, type(self).__name__)
        n = len(cols["id"])
        out = {k: [None] * n for k in self.OUTPUT_COLUMNS}
        out.update(id=cols["id"], prompt=cols["prompt"], error=list(cols["error"]), seed=[0] * n,
                   image_bytes=[PNG_1x1.getvalue()] * n, image_path=[f"{i}.png" for i in cols["id"]],
                   width=[1] * n, height=[1] * n, model=["noop"] * n, latency_s=[0.0] * n)
        result = to_table(out, n, type(self).__name__, passthrough_columns(batch, {*self.INPUT_COLUMNS,
                                                                                   *self.OUTPUT_COLUMNS}))
        with open(self.log, "a") as f:
            f.write(json.dumps([start, time.perf_counter()]) + "\n")
        return result


def run(rows: int, workers: int, batch_size: int, work_ms: float) -> dict:
    from flashu_batch.jobs.spec import JobSpec
    from flashu_batch.scheduler.driver import run_job

    work = tempfile.mkdtemp(prefix="flashu-bench-")
    os.environ["FLASHU_BENCH_LOG"] = os.path.join(work, "log")
    os.environ["FLASHU_BENCH_WORK_MS"] = str(work_ms)  # actors inherit the driver's environment
    os.makedirs(os.environ["FLASHU_BENCH_LOG"])
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"a red circle number {i}"}) + "\n")
    spec = JobSpec.model_validate(dict(
        job_id="overhead", model=dict(checkpoint=os.path.join(work, "unused"), device="cpu"),
        tasks=[dict(kind="t2i", input=dict(uris=os.path.join(work, "prompts.jsonl"), format="jsonl"),
                    output=os.path.join(work, "out"), rows_per_file=batch_size * 4,
                    resources=dict(workers=workers, gpus_per_worker=0, cpus_per_worker=0.5,
                                   batch_size=batch_size))]))
    start = time.perf_counter()
    results = run_job(spec, quiet=True, worker_classes={"t2i": NoOpT2IWorker})
    wall = time.perf_counter() - start
    idle = []
    for name in os.listdir(os.environ["FLASHU_BENCH_LOG"]):
        with open(os.path.join(os.environ["FLASHU_BENCH_LOG"], name)) as f:
            calls = sorted(json.loads(line) for line in f)
        if len(calls) > 2:  # steady state: from the end of the first call to the start of the last
            span = calls[-1][0] - calls[0][1]
            busy = sum(end - begin for begin, end in calls[1:-1])
            idle.append(max(0.0, 1 - busy / span) if span > 0 else 0.0)
    metrics = results["t2i"]["metrics"]
    return dict(rows=rows, workers=workers, batch_size=batch_size, work_ms=work_ms, wall_s=round(wall, 2),
                pipeline_s=metrics["seconds"], rows_per_s=round(rows / metrics["seconds"], 1),
                actor_idle_fraction=[round(x, 3) for x in idle])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work-ms", type=float, default=0.0, help="simulated model time per batch")
    args = parser.parse_args(argv)
    result = run(args.rows, args.workers, args.batch_size, args.work_ms)
    print(f"{result['rows']} rows in {result['pipeline_s']}s = {result['rows_per_s']} rows/s through the pipeline; "
          f"actor idle fraction between batches: {result['actor_idle_fraction']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
