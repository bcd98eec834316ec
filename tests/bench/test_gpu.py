"""bench/gpu.py must import without ray, boto3 or pydantic (the GPU machine lacks them) and run end to end."""

import json
import subprocess
import sys

BLOCK = ("import sys\n"
         "for name in ('ray', 'boto3', 'botocore', 'pydantic'):\n"
         "    sys.modules[name] = None  # any import of them now fails\n"
         "from bench.gpu import main\n"
         "main(sys.argv[1:])\n")


def test_gpu_bench_smoke_on_cpu_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", BLOCK, "--model", "tiny", "--device", "cpu", "--steps", "3",
                          "--t2i-batches", "1", "2", "--vqa-batches", "2", "--answer-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in result["t2i"]] == [1, 2] and [r["batch"] for r in result["vqa"]] == [2]
    assert all(r["images_per_s"] > 0 for r in result["t2i"]) and result["vqa"][0]["answers_per_s"] > 0
    assert result["matmul_probe_tflops"] > 0
