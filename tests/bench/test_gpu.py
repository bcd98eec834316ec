"""bench/gpu.py must import without ray, boto3 or pydantic (the GPU machine lacks them) and run end to end."""

import json
import subprocess
import sys

BLOCK = ("import sys\n"
         "for name in ('ray', 'boto3', 'botocore', 'pydantic'):\n"
         "    sys.modules[name] = None  # any import of them now fails\n"
         "from bench.gpu import main\n"
         "main(sys.argv[1:])\n")


SUMMARY_KEYS = {"t2i_exact_images_per_s", "t2i_flashu_images_per_s", "t2i_flashu_speedup_bs1",
                "t2i_exact_probe_fraction", "vqa_exact_answers_per_s", "vqa_flashu_answers_per_s",
                "vqa_flashu_speedup_bs1", "official_t2i_images_per_s", "official_vqa_answers_per_s"}


def test_gpu_bench_smoke_on_cpu_without_optional_packages(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCK, "--model", "tiny", "--device", "cpu", "--steps", "3",
                          "--t2i-batches", "1", "2", "--vqa-batches", "1", "2", "--answer-tokens", "4",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in result["t2i"]] == [1, 2] and [r["batch"] for r in result["vqa"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in result["t2i"]) and result["vqa"][0]["answers_per_s"] > 0
    assert result["matmul_probe_tflops"] > 0 and result["repeats"] == 3 and result["load_s"] > 0
    assert {"device", "torch", "command", "summary"} <= set(result)
    assert result["device"] == "cpu" and result["command"].startswith("python -m bench.gpu --model tiny")
    assert set(result["summary"]) == SUMMARY_KEYS
    summary = result["summary"]
    assert all(isinstance(v, (int, float)) and v >= 0 for v in summary.values()), summary
    # rates are measured; the probe fraction comes from bench.flops' counts, rounded to 0 for the tiny model
    assert all(v > 0 for k, v in summary.items() if k != "t2i_exact_probe_fraction"), summary
    assert set(result["official"]) == {"t2i", "vqa_bf16", "vqa_fp32"}
    assert result["compile_failures"] == []  # no --compile: nothing compiled, nothing fell back
    (written,) = tmp_path.glob("gpu-tiny-cpu-*.json")  # the same object, written under --out
    assert json.loads(written.read_text()) == result


def test_gpu_bench_times_the_workers_of_a_spec(tmp_path, checkpoint):
    """--worker-spec: each task's worker built from the spec as the pipeline builds it, called on pyarrow batches."""
    from batch_testkit import spec_dict

    from flashu_batch.bench.gpu import main

    spec = spec_dict("bench", checkpoint, [
        dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out", params=dict(steps=2)),
        dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out2",
             params=dict(max_new_tokens=3))])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--t2i-batches", "1", "--vqa-batches", "2",
          "--answer-tokens", "2", "--repeats", "1", "--no-flashu", "--no-official", "--worker-spec", str(path),
          "--out", str(tmp_path / "results")])
    (written,) = (tmp_path / "results").glob("*.json")
    workers = json.loads(written.read_text())["workers"]
    assert {w["kind"] for w in workers.values()} == {"t2i", "vqa"}
    for w in workers.values():
        assert w["load_s"] > 0 and len(w["rows"]) == 1 and w["compile_failures"] == []
    rates = {w["kind"]: w["rows"][0] for w in workers.values()}
    assert rates["t2i"]["images_per_s"] > 0 and rates["vqa"]["answers_per_s"] > 0 and rates["vqa"]["batch"] == 2
