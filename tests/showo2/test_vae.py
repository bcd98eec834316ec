"""Tests for showo2.vae: golden parity (tiny-a set), strict loading, input validation, official preset, bf16."""

import json
import os

import pytest
import torch

from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.vae import VAE_CONFIGS, VAEConfig, WanVAE, load_vae

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.environ.get("FLASHU_GOLDEN") or os.path.join(REPO, "tests", "golden", "tiny-a")  # tests/conftest.py
VAE_FILE = os.path.join(GOLDEN, "checkpoint", "Wan2.1_VAE.pth")

# Parameter count of the official Wan2.1_VAE.pth (dim 96), time_conv weights included.
OFFICIAL_PARAM_COUNT = 126_892_531


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    with open(os.path.join(GOLDEN, "cases.json")) as f:
        cases = json.load(f)["cases"]
    specs = {name: spec for case in cases.values() for name, spec in case["tensors"].items()}
    return load_file(os.path.join(GOLDEN, "cases.safetensors")), specs


@pytest.fixture(scope="module")
def vae():
    return load_vae(VAE_FILE)


def tiny_config() -> VAEConfig:
    return VAEConfig.from_json(os.path.join(GOLDEN, "checkpoint", "vae_config.json"))


def assert_golden(actual, golden, name):
    tensors, specs = golden
    spec = specs[name]
    assert spec["compare"] == "allclose"
    expected = tensors[name]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=spec["atol"], rtol=spec["rtol"])


# ----------------------------------------------------------------------------------------------------- golden


def test_golden_encode(vae, golden):
    with torch.no_grad():
        assert_golden(vae.encode(golden[0]["vae.image"]), golden, "vae.latent")


def test_golden_decode(vae, golden):
    with torch.no_grad():
        assert_golden(vae.decode(golden[0]["vae.latent"]), golden, "vae.decoded")


def test_golden_mmu_latent(vae, golden):
    with torch.no_grad():
        assert_golden(vae.encode(golden[0]["mmu.image"]), golden, "mmu.debug.latent")


def test_load_vae_reads_config_beside_file(vae):
    assert vae.config == tiny_config()
    assert vae.config.dim == 8
    assert not any(p.is_meta or p.requires_grad for p in vae.parameters())
    assert not vae.training


# ------------------------------------------------------------------------------------------ strict loading


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_strict_loading_errors(tmp_path, problem):
    state = torch.load(VAE_FILE, weights_only=True)
    if problem == "missing":
        del state["decoder.head.2.bias"]
        match = "missing"
    elif problem == "extra":
        state["encoder.bogus.weight"] = torch.zeros(1)
        match = "unexpected"
    else:
        state["conv2.weight"] = torch.zeros(16, 16, 3, 3, 3)
        match = "shape"
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=match):
        load_vae(str(path), config=tiny_config())


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError):
        load_vae(str(tmp_path / "nope.pth"), config=VAEConfig(dim=8))


def test_load_safetensors_and_default_preset(tmp_path):
    from safetensors.torch import save_file

    # No vae_config.json beside the file -> the official preset (dim 96) is built, so dim-8 weights mismatch.
    small = WanVAE(VAEConfig(dim=8))
    path = str(tmp_path / "vae.safetensors")
    save_file(small.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape"):
        load_vae(path)
    loaded = load_vae(path, config=VAEConfig(dim=8))
    for k, v in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------------- config


def test_from_json_ignores_metadata_and_rejects_unknown(tmp_path):
    path = tmp_path / "vae_config.json"
    path.write_text(json.dumps({"_comment": "x", "dim": 8, "dropout": 0.0, "spatial_compression": 8,
                                "temporal_compression": 4, "dim_mult": [1, 2, 4, 4]}))  # fmt: skip
    cfg = VAEConfig.from_json(str(path))
    assert cfg.dim == 8 and cfg.dim_mult == (1, 2, 4, 4)
    assert cfg.latents_mean == VAE_CONFIGS["wan2.1"].latents_mean
    path.write_text(json.dumps({"dim": 8, "num_heads": 4}))
    with pytest.raises(ValueError, match="num_heads"):
        VAEConfig.from_json(str(path))


def test_tiny_config_matches_official_constants():
    cfg, preset = tiny_config(), VAE_CONFIGS["wan2.1"]
    assert cfg.latents_mean == preset.latents_mean and cfg.latents_std == preset.latents_std
    assert len(preset.latents_mean) == len(preset.latents_std) == preset.z_dim == 16


def test_config_validation():
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="temperal_downsample"):
        VAEConfig(temperal_downsample=(True,))


# ---------------------------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def random_vae():
    torch.manual_seed(0)
    return WanVAE(VAEConfig(dim=4)).eval()


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 16, 16), "4-D"),
        ((1, 1, 3, 16, 16), "4-D"),
        ((1, 4, 16, 16), "3 channels"),
        ((1, 3, 16, 12), "multiples of 8"),
        ((1, 3, 20, 16), "multiples of 8"),
        ((1, 3, 0, 16), "non-empty"),
    ],
)
def test_encode_validation(random_vae, shape, match):
    with pytest.raises(ValueError, match=match) as info:
        random_vae.encode(torch.zeros(shape))
    assert str(tuple(shape)) in str(info.value)  # says what came in


@pytest.mark.parametrize("shape, match", [((16, 2, 2), "4-D"), ((1, 8, 2, 2), "16 channels")])
def test_decode_validation(random_vae, shape, match):
    with pytest.raises(ValueError, match=match):
        random_vae.decode(torch.zeros(shape))


def test_integer_input_rejected(random_vae):
    with pytest.raises(ValueError, match="floating-point"):
        random_vae.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_shapes_and_clamp(random_vae):
    with torch.no_grad():
        z = random_vae.encode(torch.rand(2, 3, 16, 24) * 2 - 1)
        assert z.shape == (2, 16, 2, 3) and z.dtype == torch.float32
        x = random_vae.decode(torch.randn(2, 16, 3, 1) * 10)
    assert x.shape == (2, 3, 24, 8)
    assert x.min() >= -1 and x.max() <= 1


# --------------------------------------------------------------------------------------------- official preset


def test_official_preset_on_meta():
    with torch.device("meta"):
        vae = WanVAE(VAE_CONFIGS["wan2.1"])
    assert all(p.is_meta for p in vae.parameters())
    assert sum(p.numel() for p in vae.parameters()) == OFFICIAL_PARAM_COUNT  # ~126.9M
    state = vae.state_dict()
    assert state["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)  # 5-D, as stored
    assert state["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert state["decoder.head.2.weight"].shape == (3, 96, 3, 3, 3)


def test_key_set_matches_official_file():
    file_state = torch.load(VAE_FILE, weights_only=True)
    with torch.device("meta"):
        tiny, official = WanVAE(tiny_config()), WanVAE(VAE_CONFIGS["wan2.1"])
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == {
        k: tuple(v.shape) for k, v in file_state.items()
    }
    # Width changes shapes, never names.
    assert official.state_dict().keys() == file_state.keys()


# -------------------------------------------------------------------------------------------------------- bf16


def test_bf16_close_to_fp32(vae, golden):
    vae16 = load_vae(VAE_FILE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae16.parameters())
    image, latent = golden[0]["vae.image"], golden[0]["vae.latent"]
    with torch.no_grad():
        z32, z16 = vae.encode(image), vae16.encode(image)
        x32, x16 = vae.decode(latent), vae16.decode(latent)
    assert z16.dtype == x16.dtype == torch.float32
    assert (z16 - z32).abs().max() < 0.05 and (z16 - z32).abs().mean() < 0.01
    assert (x16 - x32).abs().max() < 0.2 and (x16 - x32).abs().mean() < 0.02
    assert x16.min() >= -1 and x16.max() <= 1
