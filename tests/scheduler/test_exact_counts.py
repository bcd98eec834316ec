"""Write retries, counted and bounded.

- rows_this_run counts the rows this run committed exactly: a write task that Ray re-runs after its first attempt
  committed and died (before its summary reached the driver) counts its rows, once; rows an earlier run committed
  are never counted (TaskOutput.commit's "this_run", the driver's progress and metrics.json);
- a task that Ray's memory monitor kills is re-run a bounded number of times (TASK_OOM_RETRIES, Ray's
  task_oom_retries: forever by default), then the job ends with an error that names the stage.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from batch_testkit import spec_dict, task_output, vqa_rows
from flashu_batch.jobs.output import TaskOutput, read_output
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.driver import run_job
from flashu_batch.scheduler.pipeline import MAX_INLINE_BYTES, TASK_OOM_RETRIES

N = 12
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return task_output(request, tmp_path, "exact-counts")


rows = vqa_rows  # VQA result rows, some failed


def data_files(output: TaskOutput) -> list[str]:
    return [f["uri"] for f in output.storage.list(join(output.root, "data"))]


# ---- TaskOutput.commit ---------------------------------------------------------------------------------------

def test_a_retried_write_of_this_run_counts_its_rows_once(output):
    first = output.write_and_commit(rows(["a", "b"], error_ids={"b"}), "run1")
    assert first["committed"] and first["this_run"]
    # Ray re-runs the write task: its first attempt committed, then its process died before the summary left it
    again = output.write_and_commit(rows(["b", "a"], error_ids={"b"}), "run1")
    assert not again["committed"] and again["this_run"] and (again["rows"], again["errors"]) == (2, 1)
    assert len(data_files(output)) == 1 and len(output.commits()) == 1  # the retry's own file is removed
    assert output.finalize("job", "vqa", "vqa", {})["rows"] == 2


def test_only_a_record_of_the_same_run_makes_a_write_a_retry(output):
    assert output.write_and_commit(rows(["a", "b"], error_ids={"a", "b"}), "run1")["this_run"]
    # run2 writes the same ids (a --retry-errors run did them again): run1's record is not run2's, so this is no
    # retry; run2 commits a record of its own (keyed with its run id), and the rows count for run2
    redo = output.write_and_commit(rows(["a", "b"]), "run2")
    assert redo["committed"] and redo["this_run"]
    retried = output.write_and_commit(rows(["b", "a"]), "run2")  # and Ray re-ran that write
    assert not retried["committed"] and retried["this_run"]
    assert sorted(r["run_id"] for r in output.commits()) == ["run1", "run2"] and len(data_files(output)) == 2
    summary = output.finalize("job", "vqa", "vqa", {})
    assert summary["rows"] == 2 and summary["errors"] == 0 and len(data_files(output)) == 1


def test_a_write_without_a_run_id_is_never_taken_for_a_retry(output):
    assert output.write_and_commit(rows(["a"]))["this_run"]
    again = output.write_and_commit(rows(["a"]))
    assert not again["committed"] and not again["this_run"]  # no run to tell a retry from another writer
    assert len(data_files(output)) == 1


# ---- a job whose write dies right after its commit -------------------------------------------------------------

def write_prompts(storage: Storage, base: str) -> str:
    uri = join(base, "prompts.jsonl")
    storage.write_bytes(uri, "".join(json.dumps({"id": f"r{i:02d}", "prompt": f"a red circle {i}"}) + "\n"
                                     for i in range(N)).encode())
    return uri


def dying_after_commit(marker: str):
    """A TaskOutput whose first write exits its process (as an OOM kill would: no exception, no cleanup) right after
    its commit record is created, so Ray re-runs that write task and the re-run finds the record."""

    class DyingTaskOutput(TaskOutput):  # defined here, so Ray ships it by value to the write tasks
        def commit(self, rel, table, run_id=""):
            summary = super().commit(rel, table, run_id)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first write only
            except FileExistsError:
                return summary
            os._exit(75)

    return DyingTaskOutput


def test_rows_this_run_counts_a_write_that_died_after_committing(ray_session, checkpoint, tmp_path):
    storage = Storage()
    task = dict(kind="t2i", input=dict(uris=write_prompts(storage, str(tmp_path)), format="jsonl"),
                output=str(tmp_path / "out"), params=dict(steps=2), rows_per_file=2)
    spec = parse_spec(spec_dict("died-after-commit", checkpoint, [task]))
    marker = tmp_path / "committed-then-died"
    seen = []
    results = run_job(spec, output_class=dying_after_commit(str(marker)), on_progress=seen.append)
    assert marker.exists()  # the first write did commit and die
    metrics = results["t2i"]["metrics"]
    assert results["t2i"]["rows"] == N and metrics["rows_this_run"] == N and metrics["errors_this_run"] == 0
    assert seen[-1].finished and seen[-1].done == N == seen[-1].total
    saved = json.loads(storage.read_bytes(join(results["t2i"]["output"], ".flashu/metrics.json")))
    assert saved["rows_this_run"] == N
    ids = read_output(storage, results["t2i"]["output"]).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(N)]  # each id once

    again = run_job(spec)  # everything was committed by the run before: nothing is this run's
    assert again["t2i"]["metrics"]["rows_this_run"] == 0 and again["t2i"]["metrics"]["skipped"] == N


# ---- bounded retries of tasks killed for memory ------------------------------------------------------------------

OOM_DRIVER = textwrap.dedent("""
    import os, sys, time
    # Below every process's use: the node's memory monitor kills each task as soon as it runs (read by the raylet)
    os.environ.update(RAY_memory_usage_threshold="0.01", RAY_memory_monitor_refresh_ms="100")
    import ray
    from flashu_batch.jobs.spec import parse_spec
    from flashu_batch.scheduler.driver import init_ray
    from flashu_batch.scheduler.pipeline import CPU_STAGE, explain_worker_deaths, map_stage

    def slow(batch):
        time.sleep(5)
        return batch

    spec = parse_spec(dict(job_id="oom", model=dict(checkpoint="/nonexistent", device="cpu"), tasks=[dict(
        kind="t2i", input=dict(uris="/nonexistent.jsonl", format="jsonl"), output="/tmp/nonexistent",
        resources=dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=2))]))
    assert init_ray(spec, quiet=True)  # the local Ray, as run_job starts it
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    ds = map_stage(ray.data.range(2, override_num_blocks=1), slow, batch_format="pyarrow", **CPU_STAGE)
    try:
        for _ in explain_worker_deaths(ds.iter_batches(batch_size=None), "t2i"):
            pass
    except RuntimeError as e:
        print("JOB ERROR:", e)
    ray.shutdown()
""")


def test_a_task_killed_for_memory_is_retried_a_bounded_number_of_times(tmp_path):
    """Ray's default re-runs it forever (this test would then time out); the driver's local Ray bounds it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    result = subprocess.run([sys.executable, "-c", OOM_DRIVER], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("JOB ERROR:")]
    assert "task 't2i': the " in line and " stage ran out of memory: Ray's memory monitor killed its process" in line
    assert f"re-run at most {TASK_OOM_RETRIES} times, Ray's task_oom_retries" in line
    assert "worker(s) were killed due to the node running low on memory" in line  # Ray's own words follow


def test_clusters_set_the_same_bound_on_every_node():
    with open(os.path.join(REPO, "ray_cluster.yaml")) as f:
        config = yaml.safe_load(f)
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in command or f"RAY_task_oom_retries={TASK_OOM_RETRIES} " in command, command
        assert "ray start" not in command or f"RAY_max_direct_call_object_size={MAX_INLINE_BYTES} " in command
    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        [job] = [d for d in yaml.safe_load_all(f) if d["kind"] == "RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        [container] = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_task_oom_retries"] == str(TASK_OOM_RETRIES), group
        assert env["RAY_max_direct_call_object_size"] == str(MAX_INLINE_BYTES), group
