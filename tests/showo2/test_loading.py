"""Tests for showo2.loading (load_showo2, save_showo2) and showo2.checkpoint: strict loading errors, round trips
through every weight layout, the golden checkpoint (.bin vs safetensors, tied head, bf16). s3:// fetching: tests/jobs/
test_fetch.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashu_batch.showo2.checkpoint import CheckpointError, load_strict, read_sharded_state_dict, read_state_dict
from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.loading import load_showo2, save_showo2
from flashu_batch.showo2.modeling import additive_mask, omni_attention_mask


# ------------------------------------------------------------------------------------------------ helpers


def velocity_inputs(model, seed: int = 0, batch: int = 2):
    """Random but valid velocity inputs for `model` (T2I-like rows of length 30, image block at offset 5 + row)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    L, S = 30, c.num_image_slots
    ids = torch.randint(0, c.llm_vocab_size, (batch, L), generator=g)
    offsets = torch.arange(batch) + 5
    mp = torch.stack([offsets, torch.full_like(offsets, S)], -1)[:, None]
    h, w = c.latent_size
    x = torch.randn(batch, c.image_latent_dim, h, w, generator=g)
    t = torch.rand(batch, generator=g)
    return Sequences(ids, offsets, mp), x, t


@torch.no_grad()
def run_velocity(model, seqs, x, t):
    dtype = model.showo.model.embed_tokens.weight.dtype
    mask = additive_mask(omni_attention_mask(seqs.modality_positions, seqs.input_ids.shape[1]), dtype)
    return model.velocity(seqs.input_ids, seqs.image_offsets, seqs.modality_positions, mask, x, t).float()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys(), (sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5])
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A single-file safetensors save of `tiny` (do not modify; copy it first)."""
    folder = str(tmp_path_factory.mktemp("saved"))
    save_showo2(tiny, folder)
    return folder


@pytest.fixture
def saved_copy(saved, tmp_path, writable_copy):
    return writable_copy(saved, str(tmp_path / "ckpt"))


def edit_weights(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


# ---------------------------------------------------------------------------------------------- strict errors


def test_missing_key(saved_copy):
    edit_weights(saved_copy, lambda s: s.pop("fusion_proj.1.bias"))
    with pytest.raises(CheckpointError, match=r"missing") as e:
        load_showo2(saved_copy)
    assert "fusion_proj.1.bias" in str(e.value) and "model.safetensors" in str(e.value)


def test_unexpected_key(saved_copy):
    edit_weights(saved_copy, lambda s: s.update({"extra_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected") as e:
        load_showo2(saved_copy)
    assert "extra_head.weight" in str(e.value)


def test_wrong_shape(saved_copy):
    def edit(s):
        s["time_embed_proj.weight"] = torch.zeros(s["time_embed_proj.weight"].shape[0], 5)

    edit_weights(saved_copy, edit)
    with pytest.raises(CheckpointError, match=r"shape") as e:
        load_showo2(saved_copy)
    assert "time_embed_proj.weight" in str(e.value)


def test_load_strict_reports_all_problems(tiny):
    """load_strict names missing, unexpected and wrong-shape keys together, and never half-loads."""
    import copy

    model = copy.deepcopy(tiny)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["position_embedding.weight"]
    state["bogus"] = torch.zeros(1)
    state["diff_proj.0.bias"] = torch.zeros(7)
    before = model.image_embedder_gen.proj.weight.clone()
    state["image_embedder_gen.proj.weight"] = torch.zeros_like(before)
    with pytest.raises(CheckpointError) as e:
        load_strict(model, state, "somefile")
    msg = str(e.value)
    for word in ("missing", "position_embedding.weight", "unexpected", "bogus", "shape", "diff_proj.0.bias",
                 "somefile"):
        assert word in msg, (word, msg)
    assert torch.equal(model.image_embedder_gen.proj.weight, before)  # nothing was copied


@pytest.mark.parametrize("weights_format,file_name", [("safetensors", "model.safetensors"),
                                                      ("bin", "pytorch_model.bin")])
def test_truncated_file(tiny, tmp_path, weights_format, file_name):
    folder = str(tmp_path / "ckpt")
    save_showo2(tiny, folder, weights_format=weights_format)
    path = os.path.join(folder, file_name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt") as e:
        load_showo2(folder)
    assert file_name in str(e.value)
    with open(path, "r+b") as f:  # a file cut inside its first bytes (header) too
        f.truncate(5)
    with pytest.raises(CheckpointError, match=file_name.replace(".", r"\.")):
        read_state_dict(path)


def test_bad_paths(saved_copy, tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_showo2(str(tmp_path / "nowhere"))

    # A folder with a valid config but no weight file.
    os.remove(os.path.join(saved_copy, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"No Show-o2 weights") as e:
        load_showo2(saved_copy)
    assert "model.safetensors" in str(e.value) and "pytorch_model.bin" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_showo2(str(empty))


def test_bad_config(saved_copy):
    config = os.path.join(saved_copy, "config.json")
    with open(config) as f:
        raw = json.load(f)

    with open(config, "w") as f:
        f.write('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"not valid JSON"):
        load_showo2(saved_copy)

    with open(config, "w") as f:
        json.dump({**raw, "llm_model_path": "no/such/llm"}, f)
    with pytest.raises(CheckpointError, match=r"llm_model_path") as e:
        load_showo2(saved_copy)
    assert "no/such/llm" in str(e.value)

    with open(config, "w") as f:
        json.dump({**raw, "clip_pretrained_model_path": "no_siglip"}, f)
    with pytest.raises(CheckpointError, match=r"clip_pretrained_model_path"):
        load_showo2(saved_copy)

    os.remove(config)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_showo2(saved_copy)


def test_sharded_missing_shard_and_incomplete_shard(tiny, tmp_path):
    folder = str(tmp_path / "sharded")
    save_showo2(tiny, folder, max_shard_bytes=200_000)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    # A shard lacking a key its index lists.
    first = os.path.join(folder, shards[0])
    state = load_file(first)
    key = next(iter(state))
    save_file({k: v for k, v in state.items() if k != key}, first)
    with pytest.raises(CheckpointError, match=r"lacks") as e:
        load_showo2(folder)
    assert key in str(e.value) and shards[0] in str(e.value)
    save_file(state, first)
    load_showo2(folder)  # repaired
    # A shard that is gone.
    os.remove(os.path.join(folder, shards[-1]))
    with pytest.raises(CheckpointError, match=shards[-1].replace(".", r"\.")):
        read_sharded_state_dict(index)
    # An unreadable index.
    with open(index, "w") as f:
        f.write("{}")
    with pytest.raises(CheckpointError, match=r"shard index"):
        load_showo2(folder)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("weights_format,max_shard_bytes", [
    ("safetensors", None), ("safetensors", 200_000), ("bin", None), ("bin", 200_000)])
def test_round_trip(tiny, tmp_path, weights_format, max_shard_bytes):
    folder = str(tmp_path / "ckpt")
    save_showo2(tiny, folder, weights_format=weights_format, max_shard_bytes=max_shard_bytes)
    files = set(os.listdir(folder))
    base = "model.safetensors" if weights_format == "safetensors" else "pytorch_model.bin"
    index = base + ".index.json"
    if max_shard_bytes:
        assert index in files and base not in files, files
        with open(os.path.join(folder, index)) as f:
            weight_map = json.load(f)["weight_map"]
        shards = set(weight_map.values())
        assert len(shards) > 1 and shards <= files
        assert weight_map.keys() == tiny.state_dict().keys()
    else:
        assert base in files and index not in files, files

    loaded = load_showo2(folder)
    assert_same_state(loaded.state_dict(), tiny.state_dict())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    seqs, x, t = velocity_inputs(tiny)
    v_ref, v = run_velocity(tiny, seqs, x, t), run_velocity(loaded, seqs, x, t)
    assert v.abs().max() > 0
    assert torch.equal(v, v_ref)

    if max_shard_bytes:  # the shards are found through the index only
        os.remove(os.path.join(folder, index))
        with pytest.raises(CheckpointError, match=r"No Show-o2 weights"):
            load_showo2(folder)


def test_round_trip_tied_head(make_tiny_model, tmp_path):
    tied = make_tiny_model(seed=5, llm_overrides={"tie_word_embeddings": True})
    assert tied.showo.lm_head.weight is tied.showo.model.embed_tokens.weight
    for fmt in ("safetensors", "bin"):
        folder = str(tmp_path / fmt)
        save_showo2(tied, folder, weights_format=fmt)
        loaded = load_showo2(folder)
        assert loaded.showo.lm_head.weight is loaded.showo.model.embed_tokens.weight
        assert_same_state(loaded.state_dict(), tied.state_dict())
    # A tied head stored once (as safetensors writers that dedupe shared tensors do) loads too.
    edit_weights(str(tmp_path / "safetensors"), lambda s: s.pop("showo.lm_head.weight"))
    loaded = load_showo2(str(tmp_path / "safetensors"))
    assert loaded.showo.lm_head.weight is loaded.showo.model.embed_tokens.weight
    assert torch.equal(loaded.showo.lm_head.weight, tied.showo.model.embed_tokens.weight)


def test_tied_config_rejects_different_head(make_tiny_model, tmp_path):
    tied = make_tiny_model(seed=6, llm_overrides={"tie_word_embeddings": True})
    folder = str(tmp_path / "ckpt")
    save_showo2(tied, folder)
    edit_weights(folder, lambda s: s.update({"showo.lm_head.weight": torch.randn_like(s["showo.lm_head.weight"])}))
    with pytest.raises(CheckpointError, match=r"lm_head"):
        load_showo2(folder)


def test_bf16_file_upcasts(tiny, tmp_path):
    """Releases ship bf16 weights: a float32 load upcasts them (values = the bf16-rounded originals)."""
    folder = str(tmp_path / "bf16")
    save_showo2(tiny, folder, weights_format="bin")
    path = os.path.join(folder, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    torch.save({k: v.bfloat16() for k, v in state.items()}, path)
    loaded = load_showo2(folder)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, tiny.state_dict()[k].bfloat16().float()), k
    as_bf16 = load_showo2(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in as_bf16.parameters())


def test_untied_head_stays_untied(saved):
    loaded = load_showo2(saved)
    assert loaded.showo.lm_head.weight is not loaded.showo.model.embed_tokens.weight
    assert not torch.equal(loaded.showo.lm_head.weight, loaded.showo.model.embed_tokens.weight)
    # An untied model must not silently accept a checkpoint without its head.
    state = load_file(os.path.join(saved, "model.safetensors"))
    del state["showo.lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"showo\.lm_head\.weight"):
        load_strict(loaded, state, "x")


def test_buffers_after_meta_load(saved, tiny):
    """Non-persistent buffers (RoPE tables) are rebuilt after the meta-device build, not left on meta."""
    loaded = load_showo2(saved)
    for name, buf in loaded.named_buffers():
        assert not buf.is_meta, name
    assert torch.equal(loaded.head_inv_freq, tiny.head_inv_freq)
    for (name, a), (_, b) in zip(tiny.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return load_showo2(os.path.join(golden_dir, "checkpoint"))


def test_golden_bin_equals_safetensors(golden_dir, golden_model, tmp_path, writable_copy):
    src = os.path.join(golden_dir, "checkpoint")
    folder = writable_copy(src, str(tmp_path / "bin_only"),
                           ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    assert "pytorch_model.bin" in os.listdir(folder) and "model.safetensors" not in os.listdir(folder)
    from_bin = load_showo2(folder)
    assert_same_state(from_bin.state_dict(), golden_model.state_dict())
    # Both files hold the same tensors (the raw files, not only the loaded models).
    assert_same_state(read_state_dict(os.path.join(src, "pytorch_model.bin")),
                      read_state_dict(os.path.join(src, "model.safetensors")))


def test_golden_tied_head(golden_model, golden_meta):
    assert golden_meta["model"]["tie_word_embeddings"] is True
    assert golden_model.showo.lm_head.weight is golden_model.showo.model.embed_tokens.weight


def golden_velocity_inputs(data):
    ids = data["t2i_velocity.input_ids"]
    mp = data["t2i_velocity.modality_positions"]
    return Sequences(ids, mp[:, 0, 0], mp), data["t2i_velocity.x_t"], data["t2i_velocity.t"]


def test_golden_velocity_after_load(golden_model, golden_data, golden_specs):
    v = run_velocity(golden_model, *golden_velocity_inputs(golden_data))
    v_cond, v_uncond = v.chunk(2)
    for name, actual in (("v_cond", v_cond), ("v_uncond", v_uncond)):
        spec = golden_specs[f"t2i_velocity.{name}"]
        torch.testing.assert_close(actual, golden_data[f"t2i_velocity.{name}"], atol=spec["atol"], rtol=spec["rtol"])


def test_golden_bf16(golden_dir, golden_data):
    model = load_showo2(os.path.join(golden_dir, "checkpoint"), dtype=torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert model.showo.lm_head.weight is model.showo.model.embed_tokens.weight
    v = run_velocity(model, *golden_velocity_inputs(golden_data))
    assert torch.isfinite(v).all()
    expected = torch.cat([golden_data["t2i_velocity.v_cond"], golden_data["t2i_velocity.v_uncond"]])
    rel_rms = ((v - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    assert 0 < rel_rms < 0.05, rel_rms  # bf16 rounding shows (not bit-equal to fp32), but stays close
