"""The shipped tiny-shapes checkpoint: it loads through the normal loader, and it still draws and answers well on a
small held-out sample (a quality floor: a regression in the model, sampler, VQA loop or FlashU code shows up here as
a failing test). The full-size scores are `python -m bench.quality --model tiny-shapes` (README)."""

import dataclasses
import json
import os

import pytest

from flashu_batch.bench import quality
from flashu_batch.showo2.tiny import CHECKPOINTS
from flashu_batch.train import tiny_world as world
from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.loading import load_showo2
from flashu_batch.showo2.pipeline import Showo2Pipeline
from flashu_batch.showo2.tokenizer import load_tokenizer
from flashu_batch.train.tiny_shapes import TrainArgs, build_world_tokenizer

FOLDER = CHECKPOINTS["tiny-shapes"]
# Floors well under the shipped model's scores on these small samples (README: the full-size table, T2I overall 85%,
# VQA 94%), so sampling noise does not trip them while a broken model (random weights score ~0 on both) does.
T2I_OVERALL_FLOOR, VQA_FLOOR = 0.75, 0.8
N_T2I, N_VQA, STEPS = 24, 90, 20


@pytest.fixture(scope="module")
def pipe():
    return Showo2Pipeline.from_pretrained(FOLDER)


def test_the_checkpoint_is_small_and_in_the_official_layout():
    files = {os.path.relpath(os.path.join(r, f), FOLDER) for r, _, fs in os.walk(FOLDER) for f in fs}
    assert {"config.json", "model.safetensors", "Wan2.1_VAE.pth", "tokenizer.json", "training.json"} <= files
    assert not any(f.startswith("step-") for f in files)  # no intermediate checkpoints shipped
    assert sum(os.path.getsize(os.path.join(FOLDER, f)) for f in files) < 8 * 2**20
    with open(os.path.join(FOLDER, "training.json")) as f:
        meta = json.load(f)
    # the script's defaults, seed included, so `python -m train.tiny_shapes` retrains this checkpoint
    assert meta["command"].startswith("python -m train.tiny_shapes") and meta["args"]["seed"] == 1
    defaults = dataclasses.asdict(TrainArgs())
    assert {k: meta["args"][k] for k in defaults} == defaults
    assert meta["args"]["layers"] >= 8  # deep enough for layer skipping and pruning to mean something
    # its tokenizer is the one the script builds with those settings
    assert load_tokenizer(FOLDER).get_vocab() == build_world_tokenizer(meta["args"]["glue_spaces"]).get_vocab()


def test_loader_is_strict_about_the_shipped_weights(tmp_path):
    model = load_showo2(FOLDER)
    assert model.config.llm["num_hidden_layers"] >= 8
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(FOLDER, "model.safetensors"))
    weights.pop(next(k for k in weights if k.startswith("diffusion_head")))  # one missing tensor: refused
    for name in os.listdir(FOLDER):
        if name != "model.safetensors" and os.path.isfile(os.path.join(FOLDER, name)):
            os.symlink(os.path.join(FOLDER, name), tmp_path / name)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError):
        load_showo2(str(tmp_path))


def test_draws_held_out_captions(pipe):
    scenes = world.heldout_t2i_set(N_T2I, seed=7)
    scores, _ = quality.evaluate_t2i(pipe, scenes, steps=STEPS, guidance=quality.DEFAULTS["guidance"])
    assert scores["overall"] >= T2I_OVERALL_FLOOR and scores["position"] >= 0.9, scores


def test_answers_held_out_questions(pipe):
    items = world.heldout_vqa_set(N_VQA, seed=8)
    result, predictions = quality.evaluate_vqa(pipe, items)
    assert result["accuracy"] >= VQA_FLOOR and result["by_kind"]["count"] >= 0.9, (result, predictions[:10])


def test_flashu_generation_specialist_keeps_the_drawings():
    """The generation specialist at its defaults (35 steps, scaled guidance schedule, FFN pruning, layer skipping,
    head cache), calibrated on training-split captions, against the 50-step baseline on the same captions."""
    scenes = world.heldout_t2i_set(N_T2I, seed=7)
    guidance = quality.DEFAULTS["guidance"]
    base = quality.Runner(FOLDER, None, quality.SKIP, guidance=guidance, calibration=0)
    fast = quality.Runner(FOLDER, {}, quality.SKIP, guidance=guidance, calibration=8)
    assert fast.gen.config.num_inference_steps == 35 and fast.gen.config.head_cache_interval == 5
    scores = [quality.evaluate_t2i(r, scenes, steps=50, guidance=guidance)[0] for r in (base, fast)]
    assert scores[1]["overall"] >= max(scores[0]["overall"] - 0.1, T2I_OVERALL_FLOOR), scores


def test_flashu_vqa_specialist_keeps_the_answers():
    """The understanding specialist at its defaults (FFN pruning r_p 0.2; V-norm token pruning at rho 0.75 is held
    off by the kept-token floor on this 16-image-token grid) keeps the answers."""
    items = world.heldout_vqa_set(N_VQA, seed=8)
    base = quality.Runner(FOLDER, quality.SKIP, None, guidance=quality.DEFAULTS["guidance"], calibration=0)
    fast = quality.Runner(FOLDER, quality.SKIP, {}, guidance=quality.DEFAULTS["guidance"], calibration=8)
    assert fast.und.config.token_prune_ratio == 0.75 and fast.und.pruned_token_count() == 0
    accuracy = [quality.evaluate_vqa(r, items)[0]["accuracy"] for r in (base, fast)]
    assert accuracy[1] >= accuracy[0] - 0.05 and accuracy[1] >= VQA_FLOOR, accuracy
