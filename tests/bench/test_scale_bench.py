"""`python -m bench.scale` end to end on a small input: its last line is the JSON the README table is made from, and
the three runs find what the input holds (repeats, the half committed, a finished job's re-run that reads nothing)."""

import json
import subprocess
import sys

from bench.scale import REPEAT_BACK, REPEAT_EVERY, distinct_rows


def test_scale_bench_reports_every_run_and_phase(tmp_path):
    rows = 3000
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--rows", str(rows), "--data", str(tmp_path),
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    distinct = len(distinct_rows(rows))
    repeats = len([i for i in range(REPEAT_BACK, rows) if i % REPEAT_EVERY == REPEAT_EVERY - 1])
    assert result["rows"] == rows and distinct == rows - repeats
    fresh, resume, finished = (result["runs"][k] for k in ("fresh", "resume", "finished"))
    assert fresh["committed_before"] == 0 and fresh["repeated_rows"] == repeats and fresh["distinct_ids"] == distinct
    assert resume["committed_before"] == distinct // 2 and resume["lacking"] == distinct - distinct // 2
    assert finished["manifest_rows"] == distinct and finished["lacking"] == 0
    assert finished["again"] == dict(finished["again"], units_read=0, finished_without_writing=True)
    for run in (fresh, resume, finished):
        assert run["peak_mb"] == max(p["peak_mb"] for p in run["phases"].values()) > 0
        assert all(p["s"] >= 0 for p in run["phases"].values())
    assert set(finished["cluster_seconds"]["final pass (finalize + exactly-once check)"]) == {"scan", "partition"}
