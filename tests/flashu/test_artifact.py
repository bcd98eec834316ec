"""Specialization artifacts (flashu/artifact.py, jobs/specialize.py, `flashu-batch specialize`): round trip,
refusal of other checkpoints and damaged artifacts, the command line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashu_batch.flashu.artifact import checkpoint_fingerprint, load_generation_specialist
from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.ffn_prune import kept_width
from flashu_batch.flashu.generation import calibrate_generation, specialize_generation
from flashu_testkit import config_from_dict, ffn_weights
from flashu_batch.app.specialize import run_specialize
from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.loading import load_showo2
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.tiny import build_tiny_checkpoint
from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red fox in the snow", "two cats on a blue sofa", "a lighthouse at sunset"]
KNOBS = {"num_inference_steps": 11, "guidance_schedule": [[6, 3.0], [4, 5.0]], "full_network_calls": 3,
         "layer_skip_interval": 4, "head_cache_interval": 2, "calibration_steps": 3}


@pytest.fixture(scope="module")
def specialized(tmp_path_factory):
    """A tiny checkpoint (3 layers, FFN 160) and its artifact made by run_specialize with a prompts file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flashu_artifact")
    folder = build_tiny_checkpoint(str(root / "ckpt"))
    config_path, prompts_path = root / "flashu.json", root / "prompts.txt"
    config_path.write_text(json.dumps(KNOBS))
    prompts_path.write_text("\n".join(PROMPTS[:2]) + "\n\n  \n" + PROMPTS[2] + "\n")  # blank lines are ignored
    out = str(root / "artifact")
    result = run_specialize("t2i", folder, out, str(config_path), str(prompts_path))
    torch.set_num_threads(threads)
    return dict(root=root, folder=folder, out=out, config=str(config_path), prompts=str(prompts_path), result=result)


def in_process_specialist(folder):
    config = config_from_dict(KNOBS)
    model = load_showo2(folder)
    tokenizer = load_tokenizer(folder)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    scores = calibrate_generation(model, prompt_ids, SpecialTokens.from_tokenizer(tokenizer), config)
    return specialize_generation(model, scores, config)


def sample(specialist, folder):
    tokenizer = load_tokenizer(folder)
    c = specialist.model.config
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("a green apple", "snow")]
    seqs = t2i_sequences(ids, SpecialTokens.from_tokenizer(tokenizer), c.num_image_slots, 48)
    noise = seeded_noise([1, 2], (c.image_latent_dim, *c.latent_size))
    return generate_latents(specialist.velocity_fn(seqs, True), noise,
                            num_inference_steps=specialist.config.num_inference_steps,
                            guidance_scale=specialist.guidance_scales(6.0))


def test_metadata(specialized):
    with open(os.path.join(specialized["out"], "flashu_t2i.json")) as f:
        meta = json.load(f)
    assert meta["format"] == "flashu-specialization/1" and meta["task"] == "t2i"
    assert meta["checkpoint_sha256"] == checkpoint_fingerprint(specialized["folder"])
    assert config_from_dict(meta["config"]) == config_from_dict(KNOBS)
    assert meta["ffn_widths"] == [kept_width(160, 0.2, 64)] * 3 == [128] * 3
    calibration = meta["calibration"]
    assert calibration["prompts"] == 3  # the prompts file's non-empty lines, not the 20 built-in prompts
    assert calibration["prompts_file"] == "prompts.txt"
    assert calibration["steps"] == 3 and calibration["dtype"] == "float32"
    assert specialized["result"]["ffn_widths"] == [128] * 3


def test_round_trip_equals_the_in_process_specialist(specialized):
    folder, out = specialized["folder"], specialized["out"]
    loaded = load_generation_specialist(folder, out)
    reference = in_process_specialist(folder)
    assert loaded.ffn_widths == reference.ffn_widths == (128,) * 3
    assert loaded.config == reference.config
    for a, b in zip(ffn_weights(loaded.model), ffn_weights(reference.model)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the loaded FFNs are the base weights permuted by the saved orders (each a permutation)
    base = load_showo2(folder)
    orders = load_file(os.path.join(out, "flashu_t2i.safetensors"))
    for i, (layer, base_layer) in enumerate(zip(loaded.model.showo.model.layers, base.showo.model.layers)):
        order = orders[f"layers.{i}.ffn_order"]
        assert sorted(order.tolist()) == list(range(160))
        assert torch.equal(layer.mlp.gate_proj.weight, base_layer.mlp.gate_proj.weight[order])
        assert torch.equal(layer.mlp.up_proj.weight, base_layer.mlp.up_proj.weight[order])
        assert torch.equal(layer.mlp.down_proj.weight, base_layer.mlp.down_proj.weight[:, order])
    assert not all(torch.equal(orders[f"layers.{i}.ffn_order"], torch.arange(160)) for i in range(3))
    # everything else is the base checkpoint
    base_state, loaded_state = base.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in loaded_state.items() if ".mlp." not in k)
    assert torch.equal(sample(loaded, folder), sample(reference, folder))


def test_config_override_on_load(specialized):
    config = FlashUGenerationConfig(ffn_prune_ratio=0.5)
    loaded = load_generation_specialist(specialized["folder"], specialized["out"], config=config)
    assert loaded.config == config and loaded.ffn_widths == (kept_width(160, 0.5, 64),) * 3 == (64,) * 3


def test_a_byte_identical_copy_is_accepted(specialized):
    copy = str(specialized["root"] / "ckpt_copy")
    if not os.path.exists(copy):
        shutil.copytree(specialized["folder"], copy)
    assert load_generation_specialist(copy, specialized["out"]).ffn_widths == (128,) * 3


def test_a_modified_checkpoint_is_refused(specialized, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(specialized["folder"], folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    name = next(k for k in sorted(state) if k.endswith("mlp.down_proj.weight"))
    state[name][0, 0] += 1e-3
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="specialize"):
        load_generation_specialist(folder, specialized["out"])


def test_another_checkpoint_is_refused(specialized, tmp_path):
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    with pytest.raises(CheckpointError, match="specialize"):
        load_generation_specialist(other, specialized["out"])


def damaged_copy(specialized, tmp_path):
    out = str(tmp_path / "artifact")
    shutil.copytree(specialized["out"], out)
    return out


@pytest.mark.parametrize("damage", ["garbage json", "missing json", "other task", "other format"])
def test_a_damaged_artifact_json_is_refused(specialized, tmp_path, damage):
    out = damaged_copy(specialized, tmp_path)
    meta_path = os.path.join(out, "flashu_t2i.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if damage == "garbage json":
        with open(meta_path, "w") as f:
            f.write('{"format": "flashu-specialization/1", "task": ')
    elif damage == "missing json":
        os.remove(meta_path)
    else:
        meta["task" if damage == "other task" else "format"] = "vqa" if damage == "other task" else "other/9"
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    with pytest.raises(CheckpointError):
        load_generation_specialist(specialized["folder"], out)


def test_orders_that_do_not_fit_the_model_are_refused(specialized, tmp_path):
    out = damaged_copy(specialized, tmp_path)
    path = os.path.join(out, "flashu_t2i.safetensors")
    orders = load_file(path)
    orders["layers.0.ffn_order"] = orders["layers.0.ffn_order"][:100]
    save_file(orders, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generation_specialist(specialized["folder"], out)


@pytest.mark.parametrize("damage", ["missing orders file", "no fingerprint", "not a permutation"])
def test_other_artifact_damage_is_refused(specialized, tmp_path, damage):
    out = damaged_copy(specialized, tmp_path)
    path = os.path.join(out, "flashu_t2i.safetensors")
    if damage == "missing orders file":
        os.remove(path)
    elif damage == "no fingerprint":
        meta_path = os.path.join(out, "flashu_t2i.json")
        with open(meta_path) as f:
            meta = json.load(f)
        del meta["checkpoint_sha256"]
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    else:
        orders = load_file(path)
        order = orders["layers.1.ffn_order"].clone()
        order[1] = order[0]  # neuron order[0] twice, neuron order[1] lost
        orders["layers.1.ffn_order"] = order
        save_file(orders, path)
    with pytest.raises(CheckpointError):
        load_generation_specialist(specialized["folder"], out)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


def test_specialize_command(specialized, tmp_path):
    out = str(tmp_path / "cli_artifact")
    result = cli("specialize", "--task", "t2i", "--checkpoint", specialized["folder"], "--out", out,
                 "--config", specialized["config"], "--calibration-prompts", specialized["prompts"])
    assert result.returncode == 0, result.stderr
    assert "specialized for t2i" in result.stdout and out in result.stdout
    assert sorted(os.listdir(out)) == ["flashu_t2i.json", "flashu_t2i.safetensors"]
    # the same calibration as in-process: the same neuron orders
    a = load_file(os.path.join(out, "flashu_t2i.safetensors"))
    b = load_file(os.path.join(specialized["out"], "flashu_t2i.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_generation_specialist(specialized["folder"], out).ffn_widths == (128,) * 3


def test_specialize_command_vqa_writes_its_own_artifact(specialized, tmp_path):
    result = cli("specialize", "--task", "vqa", "--checkpoint", specialized["folder"], "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "o" / "flashu_vqa.json") as f:
        meta = json.load(f)
    assert meta["task"] == "vqa" and meta["checkpoint_sha256"] == checkpoint_fingerprint(specialized["folder"])
    assert not os.path.exists(tmp_path / "o" / "flashu_t2i.json")  # tasks never share a neuron order


def test_specialize_command_refuses_an_unknown_task_clearly(specialized, tmp_path):
    result = cli("specialize", "--task", "edit", "--checkpoint", specialized["folder"], "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "o")


def test_specialize_command_refuses_an_empty_prompts_file(specialized, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = cli("specialize", "--task", "t2i", "--checkpoint", specialized["folder"], "--out",
                 str(tmp_path / "o"), "--calibration-prompts", str(empty))
    assert result.returncode != 0
    assert "empty.txt" in result.stderr and "Traceback" not in result.stderr
