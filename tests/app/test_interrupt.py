"""Ctrl-C on `flashu-batch run`, for real: a driver process with its own local Ray gets SIGINT (as a terminal sends
it, to the whole process group) while it runs; it stops in seconds with one line and exit status 130, its Ray goes
with it, and the same command then finishes the job with every id once."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from app_testkit import alive, cpu_task, job, write_prompts, write_spec
from batch_testkit import descendants
from flashu_batch.jobs.output import TaskOutput, read_output
from flashu_batch.jobs.storage import Storage

N = 40  # 50-step images at about 4 per second on a CPU: the job has about ten seconds left when stopped


def start_run(path: str, log, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not a running one
    return subprocess.Popen([sys.executable, "-m", "flashu_batch.app.cli", "run", path, *args], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)


def lines_of(stream) -> queue.Queue:
    """The stream's lines, read on a thread (a blocking readline cannot time out)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_ctrl_c_stops_the_run_in_seconds_and_the_same_command_resumes(tmp_path):
    task = cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", N), str(tmp_path / "out"),
                    params=dict(steps=50, guidance_scale=1.5))
    path = write_spec(tmp_path / "job.json", job("ctrl-c", [task]))
    with open(tmp_path / "stderr.log", "w") as log:
        driver = start_run(path, log)
    family = []
    try:
        lines, seen, deadline = lines_of(driver.stdout), [], time.monotonic() + 300
        while not any("rows/s" in line for line in seen):  # the first progress line: rows are committing
            assert time.monotonic() < deadline, f"no progress line in 300 s: {seen}"
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"the run ended before it was interrupted: {seen}"
            seen.append(line)
        family = descendants(driver.pid)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        start = time.monotonic()
        assert driver.wait(timeout=30) == 130
        print(f"stopped {time.monotonic() - start:.1f}s after SIGINT")
        stderr = (tmp_path / "stderr.log").read_text()
        assert "Traceback" not in stderr, stderr[-3000:]
        said = [line for line in stderr.splitlines() if "interrupted" in line]
        assert len(said) == 1 and stderr.rstrip().endswith(said[0]), stderr[-3000:]
        match = re.fullmatch(r"interrupted: (\d+) rows committed this run \(t2i: (\d+)\); run the same command to "
                             r"resume", said[0])
        assert match and match[1] == match[2] and 0 < int(match[1]) < N, said[0]
        rest = []
        while (line := lines.get(timeout=30)) is not None:
            rest.append(line)
        assert not any("done" in line for line in rest)  # no summary: the job did not finish
        deadline = time.monotonic() + 30  # its local Ray went with it
        while [pid for pid in family if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [pid for pid in family if alive(pid)] == []
    finally:
        for pid in [driver.pid] + family:  # processes this test started, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=60)

    with open(tmp_path / "stderr2.log", "w") as log:
        again = start_run(path, log, "--quiet")
        out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, (tmp_path / "stderr2.log").read_text()[-3000:]
    root = tmp_path / "out" / "ctrl-c" / "t2i"
    ids = read_output(Storage(), str(root)).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(N)]  # every id once
    metrics = TaskOutput(Storage(), str(root)).metrics()
    # the line counts the commits the driver had heard of; a write in flight may have committed after it
    assert metrics["skipped"] >= int(match[1]) and metrics["skipped"] + metrics["rows_this_run"] == N
    assert "this run" in out and "done before" in out
