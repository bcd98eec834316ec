"""A healthy `flashu-batch demo` is quiet: no deprecation warning from our Ray calls, no error-level line (app/quiet.py
drops the one Ray notice every actor pool with restarts prints); other stderr output still comes through."""

import os
import subprocess
import sys

OUR_RAY = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the command starts its own local Ray


def test_the_demo_prints_no_deprecation_or_core_worker_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", "demo", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=OUR_RAY)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "job demo: done" in printed
    for line in printed.splitlines():
        assert "RayDeprecationWarning" not in line and "core_worker.cc" not in line, line
        assert " E " not in line[:40] and "ERROR" not in line, line  # Ray's own error-level log lines


def test_the_filter_drops_only_the_known_notice():
    code = """if True:
        import os
        from flashu_batch.app.quiet import ray_noise_filtered
        with ray_noise_filtered():
            os.write(2, b"[x E 1 1] core_worker.cc:2465: Actor with class name: 'A' and ID: '1' has constructor "
                        b"arguments in the object store and max_restarts > 0. If the arguments ...\\n")
            os.write(2, b"a real error\\npartial")
        os.write(2, b" line after\\n")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stderr == b"a real error\npartial line after\n"
