"""bench/flops.py: the JSON contract and the counts it reports."""

import json
import subprocess
import sys

import pytest

from flashu_batch.bench.flops import t2i_flops, vqa_flops


def run_cli(*args):
    out = subprocess.run([sys.executable, "-m", "bench.flops", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_t2i_contract_1_5b():
    result = run_cli("--task", "t2i", "--model", "1.5b")
    # design note: the official loop costs about 10.7 TFLOP per call with both CFG rows, 49 calls
    assert result["official_tflop_per_call"] == pytest.approx(10.7, rel=0.02)
    assert result["model_calls"] == 49
    assert result["official_tflop_per_image"] == pytest.approx(49 * result["official_tflop_per_call"], rel=1e-3)
    assert 0 < result["baseline_tflop_per_image"] <= 0.70 * result["official_tflop_per_image"]


def test_vqa_contract_1_5b():
    result = run_cli("--task", "vqa", "--model", "1.5b")
    assert result["prompt_tokens"] == 770  # 14 + boi + 730 slots + eoi + 20 question + 4
    assert 0 < result["baseline_tflop_per_answer"] <= 0.25 * result["official_tflop_per_answer"]


def test_counts_scale_with_the_work():
    one, four = t2i_flops("tiny", batch=1, num_inference_steps=5), t2i_flops("tiny", batch=4, num_inference_steps=5)
    assert four["baseline_tflop_per_call"] == pytest.approx(4 * one["baseline_tflop_per_call"], rel=0.05)
    short, long = vqa_flops("tiny", answer_tokens=4), vqa_flops("tiny", answer_tokens=16)
    assert long["official_tflop_per_answer"] > 3 * (short["official_tflop_per_answer"] - short["image_encode_tflop"])
