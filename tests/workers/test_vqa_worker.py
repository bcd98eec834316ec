"""workers/vqa.py without Ray, and both workers running FlashU specialists from artifacts."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from batch_testkit import build_worker, count_tokenizer_calls, png_bytes, run, spec_dict
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.workers import T2IWorker, VQAWorker


def make_worker(checkpoint, specialist=None, max_new_tokens=4):
    task = dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out",
                params=dict(max_new_tokens=max_new_tokens))
    raw = spec_dict("job-v", checkpoint, [task])
    if specialist:
        raw["model"]["specialization"] = dict(vqa=specialist)
    return build_worker(VQAWorker, parse_spec(raw), "vqa")


def batch(ids, questions, images, errors=None) -> dict:
    n = len(ids)
    return {"id": np.array(ids, dtype=object), "question": np.array(questions, dtype=object),
            "image_bytes": np.array(images, dtype=object), "image_path": np.array([f"{i}.png" for i in ids], dtype=object),
            "image_sha256": np.array(["h"] * n, dtype=object), "error": np.array(errors or [None] * n, dtype=object)}


@pytest.fixture(scope="module")
def worker(checkpoint):
    return make_worker(checkpoint)


def test_answers_token_counts_and_pass_through(worker):
    out = run(worker, batch(["a", "b", "c", "d"], ["what color", "what shape is this", "q", "how many"],
                       [png_bytes(), png_bytes((0, 0, 255), (64, 64)), None, b"not an image"],
                       errors=[None, None, "image is missing", None]))
    assert list(out["id"]) == ["a", "b", "c", "d"] and all(len(v) == 4 for v in out.values())
    for i in (0, 1):
        assert out["error"][i] is None and isinstance(out["answer"][i], str) and 1 <= out["num_tokens"][i] <= 4
        assert out["image_path"][i] == f"{out['id'][i]}.png" and out["latency_s"][i] > 0
    assert out["error"][2] == "image is missing" and out["answer"][2] is None and out["num_tokens"][2] is None
    assert out["error"][3] == "image could not be decoded (12 bytes): not a recognized image format"
    settings = json.loads(out["model"][0])
    assert settings["max_new_tokens"] == 4 and settings["layout"] == "demo" and settings["flashu"] is None


def test_answers_do_not_depend_on_the_batch(worker):
    together = run(worker, batch(["a", "b"], ["what color", "what shape"], [png_bytes(), png_bytes((0, 255, 0))]))
    alone = run(worker, batch(["b"], ["what shape"], [png_bytes((0, 255, 0))]))
    assert alone["answer"][0] == together["answer"][1]


def test_missing_columns_are_named(worker):
    with pytest.raises(ValueError, match=r"\['image_bytes'\] not found at the input of VQAWorker"):
        run(worker, {k: v for k, v in batch(["a"], ["q"], [png_bytes()]).items() if k != "image_bytes"})


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    """Small FlashU artifacts for both tasks (calibrated on two prompts / two images)."""
    from flashu_batch.app.specialize import run_specialize

    root = tmp_path_factory.mktemp("artifacts")
    (root / "t2i.json").write_text(json.dumps({"num_inference_steps": 5, "guidance_schedule": [[2, 3.0], [2, 5.0]],
                                               "full_network_calls": 2, "calibration_steps": 2}))
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    run_specialize("t2i", checkpoint, str(root / "t2i"), str(root / "t2i.json"), str(root / "prompts.txt"))
    (root / "img.png").write_bytes(png_bytes())
    (root / "vqa.jsonl").write_text("".join(json.dumps({"image": str(root / "img.png"), "question": q}) + "\n"
                                            for q in ("what color", "what shape")))
    # token pruning on (the tiny grid is under the default floor): its two key layouts reach every decoding path
    (root / "vqa.json").write_text(json.dumps({"calibration_samples": 2, "token_prune_min_kept": 0}))
    run_specialize("vqa", checkpoint, str(root / "vqa"), str(root / "vqa.json"), str(root / "vqa.jsonl"))
    return root


def test_workers_run_their_specialists(checkpoint, artifacts):
    t2i = build_worker(T2IWorker, parse_spec(dict(spec_dict("job-s", checkpoint, [
        dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out")]),
        model=dict(checkpoint=checkpoint, dtype="float32", device="cpu",
                   specialization=dict(t2i=str(artifacts / "t2i"))))), "t2i")
    out = run(t2i, {"id": np.array(["a"], dtype=object), "prompt": np.array(["a red circle"], dtype=object),
               "seed": np.array([1]), "error": np.array([None], dtype=object)})
    settings = json.loads(out["model"][0])
    assert out["error"][0] is None and out["width"][0] == 64
    assert settings["steps"] == 5 and settings["specialist"] == str(artifacts / "t2i")
    assert settings["flashu"]["num_inference_steps"] == 5
    vqa = make_worker(checkpoint, specialist=str(artifacts / "vqa"))
    out = run(vqa, batch(["a"], ["what color"], [png_bytes()]))
    assert out["error"][0] is None and isinstance(out["answer"][0], str)
    assert json.loads(out["model"][0])["flashu"]["calibration_samples"] == 2


@pytest.mark.parametrize("layer_skip_ratio", [0.0, 0.34])
def test_a_specialist_worker_compiles_its_decoding_and_image_path_at_load(checkpoint, artifacts, graphs, tmp_path,
                                                                         layer_skip_ratio):
    """model.compile 'on' with a FlashU VQA specialist: it decodes on static shapes (flashu/understanding.py
    SpecialistDecoder), its step and its prefill's FlexAttention compiled at load for one row and a full batch, and
    the image path (VAE encoder, SigLIP layers) too; with layer skipping on (one of the 3 layers) its decoding stays
    eager, only the image path compiles. The first batch compiles nothing and answers as the eager specialist."""
    from flashu_batch.flashu.understanding import SpecialistDecoder

    artifact = shutil.copytree(artifacts / "vqa", tmp_path / "vqa")
    meta = json.loads((artifact / "flashu_vqa.json").read_text())
    meta["config"]["layer_skip_ratio"] = layer_skip_ratio
    (artifact / "flashu_vqa.json").write_text(json.dumps(meta))
    raw = spec_dict("job-c", checkpoint, [dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"),
                                               output="out", params=dict(max_new_tokens=4))])
    raw["model"]["specialization"] = dict(vqa=str(artifact))
    spec = parse_spec(raw)

    def build(setting):
        return build_worker(VQAWorker, spec, "vqa", compile=setting)

    rows = batch(["a", "b"], ["what color", "what shape"], [png_bytes(), png_bytes((0, 0, 255), (50, 30))])
    compiled = build("on")
    assert compiled.specialist.pruned_layers() == range(2, 3)  # token pruning on: two key layouts
    at_load = graphs()
    out = run(compiled, rows)
    if layer_skip_ratio:
        assert compiled.decode_fn == compiled.specialist.greedy_answers
        assert at_load == 3 * 2  # the image path's three modules, for one row and for a dynamic batch
    else:
        assert isinstance(compiled.decode_fn.keywords["static"], SpecialistDecoder)
        # one decode graph per warmed-up bucket (1 row, 2 rows), the image path, and the prefill's FlexAttention
        # before and after token pruning (two masks), for one row and then for any batch and length
        assert at_load == 2 + 3 * 2 + 2 * 2
    assert graphs() == at_load and compiled.compile_seconds > 0, "the first batch after the warm-up recompiled"
    eager = build("off")
    assert eager.decode_fn == eager.specialist.greedy_answers
    assert out["answer"] == run(eager, rows)["answer"] and out["error"] == [None, None]
    # and the step logits behind those answers, within fp32 rounding
    logits = {}
    for name, worker in (("compiled", compiled), ("eager", eager)):
        worker.decode_fn = partial(keep_logits, worker.decode_fn, logits, name)
        run(worker, rows)
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)


def keep_logits(decode_fn, logits: dict, name: str, *args, **kwargs):
    """A worker's decode_fn that also keeps its step logits, as logits[name]."""
    ids, logits[name] = decode_fn(*args, return_logits=True, **kwargs)
    return ids


def test_specialize_on_start_calibrates_in_the_worker(checkpoint):
    """`specialization: on_start`: no artifact; each worker calibrates at load, deterministically."""
    raw = spec_dict("job-o", checkpoint, [dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"),
                                               output="out")])
    raw["model"]["specialization"] = dict(t2i="on_start")
    spec = parse_spec(raw)
    assert spec.model.specialization.t2i == "on_start"  # not resolved as a path
    first, second = build_worker(T2IWorker, spec, "t2i"), build_worker(T2IWorker, spec, "t2i")
    assert first.specialist is not None and first.specialist.ffn_widths == second.specialist.ffn_widths
    rows = {"id": np.array(["a"], dtype=object), "prompt": np.array(["a red circle"], dtype=object),
            "seed": np.array([1]), "error": np.array([None], dtype=object)}
    out_first, out_second = run(first, rows), run(second, rows)
    assert out_first["error"][0] is None
    assert out_first["image_bytes"][0] == out_second["image_bytes"][0]  # both actors made the same specialist
    assert json.loads(out_first["model"][0])["steps"] == 35


def test_each_question_is_tokenized_once(checkpoint, monkeypatch):
    """The worker checks each question's length and then answers it: the prompt pieces are tokenized once per
    question (4 tokenizer calls: the three template pieces and the question), with the same answers."""
    worker = make_worker(checkpoint)
    rows = batch(["a", "b"], ["what color", "what shape is this"], [png_bytes(), png_bytes((0, 0, 255), (64, 64))])
    expected = run(worker, rows)["answer"]
    worker.pipe.tokenized_memo.clear()
    texts = count_tokenizer_calls(monkeypatch, worker.pipe)
    assert run(worker, rows)["answer"] == expected
    assert len(texts) == 8 and sum(t in ("what color", "what shape is this") for t in texts) == 2
