"""Driver memory and time at scale: everything the driver does for a task except the model work, on a synthetic input.

    python -m bench.scale [--rows 16000000] [--format parquet|jsonl] [--data DIR] [--json]

Writes (or reuses, under --data) a synthetic t2i input of N rows with given ids, 1% of them repeating an id from
1001 rows before (scraped data), as Parquet files of 1M rows in row groups of 128Ki rows (pyarrow's writer; the
default writer makes 1Mi-row groups) or as JSONL files of 1M lines. Then driver runs, each a fresh process on a
fresh local Ray, in run_task's order (scheduler/driver.py, scheduler/bookkeeping.py):

    fresh     nothing committed yet: plan + index pass (ids read, commits scanned, partition tasks: the skip set)
    resume    half the ids committed (records written beforehand, untimed): the same, then the final pass
              (finalize + the exactly-once check) over the committed half
    finished  every id committed, as a complete run leaves it: the index pass, the final pass (which records every
              unit complete), then a second run of the finished job (reads no unit, writes nothing)

The pipeline itself (validate, model, write) is not run: at millions of rows its CPU work takes hours on a small
machine and none of it runs in the driver, which only streams one small summary row per committed file. The commit
records are written with the real write path (TaskOutput.write_and_commit, 1000 rows per file, each row's read key
kept as the pipeline keeps it) before a run is measured. Reported: per run and phase the driver's peak RSS (VmHWM,
reset between phases; it includes the object-store pages the driver itself wrote by ray.put) and seconds, and the
seconds the Ray tasks of the distributed phases ran (summed over tasks: the cluster's time). The last printed line
is one JSON object (--json: only that).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FILE_ROWS = 1_000_000
ROW_GROUP = 131_072
GROUPS_PER_FILE = -(-FILE_ROWS // ROW_GROUP)
REPEAT_EVERY, REPEAT_BACK = 100, 1001  # row i % 100 == 99 (i >= 1001) takes the id of row i - 1001 (not a repeat)
ROWS_PER_FILE = 1000  # output rows per committed file (the spec's rows_per_file)


def row_ids(first: int, last: int) -> pa.Array:
    i = np.arange(first, last)
    source = np.where((i % REPEAT_EVERY == REPEAT_EVERY - 1) & (i >= REPEAT_BACK), i - REPEAT_BACK, i)
    return pc.binary_join_element_wise("row-", pc.cast(pa.array(source), pa.string()), "")


def write_input(folder: str, rows: int, fmt: str) -> None:
    """N synthetic prompt rows, file by file, built with pyarrow compute (no Python loop over rows)."""
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    for k, first in enumerate(range(0, rows, FILE_ROWS)):
        last = min(rows, first + FILE_ROWS)
        number = pc.cast(pa.array(np.arange(first, last)), pa.string())
        table = pa.table({"id": row_ids(first, last),
                          "prompt": pc.binary_join_element_wise("a photo of thing number", number, " "),
                          "seed": pa.array(np.arange(first, last))})
        path = os.path.join(folder, f"part-{k:05d}.{fmt}")
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=ROW_GROUP)
            continue
        lines = pc.binary_join_element_wise('{"id": "', table["id"], '", "prompt": "', table["prompt"], '", "seed": ',
                                            pc.cast(table["seed"], pa.string()), "}\n", "")
        with open(path, "w") as f:
            f.write("".join(lines.to_pylist()))


def distinct_rows(rows: int) -> np.ndarray:
    """Read positions of the input's distinct ids' first rows, in read order (what the output holds once done)."""
    i = np.arange(rows)
    return i[~((i % REPEAT_EVERY == REPEAT_EVERY - 1) & (i >= REPEAT_BACK))]


def read_keys(positions: np.ndarray) -> np.ndarray:
    """The read keys (jobs/ids.py) of read positions in the Parquet layout above (row groups of ROW_GROUP rows)."""
    from flashu_batch.jobs.ids import read_key

    file, row = positions // FILE_ROWS, positions % FILE_ROWS
    return read_key(file * GROUPS_PER_FILE + row // ROW_GROUP, row % ROW_GROUP)


def commit(root: str, positions: np.ndarray, fmt: str) -> None:
    """Commit records (and data files) for the rows at `positions`, through the real write path, as a pipeline would
    leave them (with read keys for Parquet input; a JSONL file is one unit)."""
    from flashu_batch.jobs.ids import read_key
    from flashu_batch.jobs.output import READ_KEY, T2I_SCHEMA, TaskOutput
    from flashu_batch.jobs.storage import Storage

    output = TaskOutput(Storage(), root)
    keys = read_keys(positions) if fmt == "parquet" else read_key(positions // FILE_ROWS, positions % FILE_ROWS)
    for a in range(0, len(positions), ROWS_PER_FILE):
        part = [f"row-{i}" for i in positions[a:a + ROWS_PER_FILE]]
        n = len(part)
        columns = {f.name: pa.nulls(n, f.type) for f in T2I_SCHEMA}
        columns.update(id=pa.array(part), prompt=pa.array(["p"] * n), model=pa.array(["bench"] * n))
        table = pa.table(columns, schema=T2I_SCHEMA).append_column(READ_KEY, pa.array(keys[a:a + ROWS_PER_FILE]))
        output.write_and_commit(table, "bench")


# ---- one measured driver run (a child process) ---------------------------------------------------------------------

def peak_mb() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")


def driver_run(data: str, fmt: str, out: str, finish: bool, again: bool) -> dict:
    """run_task's bookkeeping, phase by phase, without the pipeline: {phase: {"s", "peak_mb"}}, the Ray tasks'
    seconds per distributed phase, and counts. again: then run the finished job a second time."""
    phases, clock, cluster = {}, [time.perf_counter()], {}

    def phase(name, task_seconds=None):
        now = time.perf_counter()
        phases[name] = dict(s=round(now - clock[0], 2), peak_mb=round(peak_mb(), 1))
        if task_seconds:
            cluster[name] = {k: round(v, 2) for k, v in task_seconds.items()}
        reset_peak()
        clock[0] = time.perf_counter()

    from flashu_batch.jobs.output import TaskOutput, task_root
    from flashu_batch.jobs.spec import JobSpec
    from flashu_batch.jobs.storage import Storage
    from flashu_batch.scheduler.bookkeeping import final_pass, index_input, record_units
    from flashu_batch.scheduler.driver import finished_summary, init_ray, repeats_report
    from flashu_batch.scheduler.read import plan_reads

    spec = JobSpec.model_validate(dict(
        job_id="scale", model=dict(checkpoint="unused", device="cpu"),
        tasks=[dict(kind="t2i", input=dict(uris=data, format=fmt), output=out, rows_per_file=ROWS_PER_FILE,
                    resources=dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5))]))
    task, storage = spec.tasks[0], Storage()
    output = TaskOutput(storage, task_root(task.output, spec.job_id, task.task_name))
    init_ray(spec, quiet=True)
    phase("start (imports, local Ray)")

    def one_run(label: str) -> dict:
        units = plan_reads(storage, task.input)
        phase(f"{label}plan")
        index = index_input(units, task, storage, output)
        phase(f"{label}index pass (ids, commit scan, partitions)", index.task_seconds)
        report = repeats_report(index, task, storage)
        record_units(index, output, index.complete, report)
        phase(f"{label}repeat report + unit records")
        result = dict(units=len(units), units_read=int((~index.unread).sum()), input_rows=index.input_rows,
                      distinct_ids=index.distinct, committed_before=index.done, repeated_rows=report["rows"],
                      first_repeat=report["examples"][0]["message"] if report["examples"] else None)
        if finish:
            metrics = dict(bench=True)
            if not index.todo.sum() and index.unread.all() and finished_summary(output, metrics) is not None:
                phase(f"{label}finished: nothing to read or write")
                return dict(result, finished_without_writing=True)
            records, losers, missing, check = final_pass(index, output, 1, report)
            summary = output.settle(spec.job_id, task.task_name, task.kind, metrics, records, losers, missing)
            phase(f"{label}final pass (finalize + exactly-once check)", check["task_seconds"])
            result.update(manifest_rows=summary["rows"], lacking=check["lacking"])
        return result

    result = one_run("")
    if again:
        result["again"] = one_run("again: ")
    import ray

    ray.shutdown()
    return dict(result, phases=phases, cluster_seconds=cluster, peak_mb=max(p["peak_mb"] for p in phases.values()))


def measure(data: str, fmt: str, out: str, finish: bool, again: bool) -> dict:
    code = (f"import json; from bench.scale import driver_run; "
            f"print('RESULT', json.dumps(driver_run({data!r}, {fmt!r}, {out!r}, {finish}, {again})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"driver run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--data", help="folder for the input and output (reused when its input is there); "
                                       "default: a new temporary folder")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    work = args.data or tempfile.mkdtemp(prefix="flashu-scale-")
    data, out = os.path.join(work, f"input-{args.rows}-{args.format}"), os.path.join(work, "out")
    if not os.path.isdir(data):
        start = time.perf_counter()
        write_input(data + ".tmp", args.rows, args.format)
        os.rename(data + ".tmp", data)
        say(f"wrote {args.rows} rows to {data} in {time.perf_counter() - start:.0f}s")
    root = os.path.join(out, "scale", "t2i")
    if os.path.isdir(root):
        import shutil

        shutil.rmtree(root)  # the runs below start from no commits
    distinct = distinct_rows(args.rows)

    runs, committed = {}, 0
    for name, committed_to, finish, again in (("fresh", 0, False, False), ("resume", len(distinct) // 2, True, False),
                                              ("finished", len(distinct), True, True)):
        start = time.perf_counter()
        commit(root, distinct[committed:committed_to], args.format)
        committed = committed_to
        say(f"{name}: committed {committed_to} ids beforehand ({time.perf_counter() - start:.0f}s, untimed)")
        runs[name] = measure(data, args.format, out, finish, again)
        runs[name]["committed_ids"] = committed_to
        say(f"{name}: peak driver RSS {runs[name]['peak_mb']:.0f} MB; " + ", ".join(
            f"{phase} {p['s']}s / {p['peak_mb']:.0f} MB" for phase, p in runs[name]["phases"].items()))
        say(f"{name}: Ray task seconds {runs[name]['cluster_seconds']}")
    del distinct
    result = dict(rows=args.rows, format=args.format, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                  f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
                  runs=runs, peak_mb=max(r["peak_mb"] for r in runs.values()))
    say(f"peak driver RSS over all runs: {result['peak_mb']:.0f} MB ({result['machine']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
