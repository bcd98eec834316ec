"""Tests for showo2.config: real-size presets (parameter counts, official state-dict key set and shapes, built on the
meta device), the golden config, equal-width models, and reading official config.json files."""

import dataclasses
import json
import os

import pytest
import torch

from flashu_batch.showo2.config import KNOWN_CONFIGS, FlowHeadConfig, Showo2Config
from flashu_batch.showo2.modeling import Showo2


def official_keys(n_llm: int, n_und: int, n_head: int, with_projections: bool = True) -> set[str]:
    """The state-dict keys of an official Show-o2 checkpoint, generated from the naming rules of the spec."""
    keys = {"showo.model.embed_tokens.weight", "showo.model.norm.weight", "showo.lm_head.weight",
            "position_embedding.weight"}
    for i in range(n_llm):
        p = f"showo.model.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
        keys |= {p + "self_attn.o_proj.weight"}
        keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {p + f"{x}_layernorm.weight" for x in ("input", "post_attention")}
    keys |= {f"image_embedder_{x}.proj.{w}" for x in ("und", "gen") for w in ("weight", "bias")}
    for i in range(n_und):
        p = f"und_trans.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.{w}" for x in ("q", "k", "v", "out") for w in ("weight", "bias")}
        keys |= {p + f"layer_norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
        keys |= {p + f"mlp.fc{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    keys |= {"fusion_proj.0.weight", "fusion_proj.1.weight", "fusion_proj.1.bias", "fusion_proj.3.weight",
             "fusion_proj.3.bias"}
    keys |= {f"time_embed.mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    if with_projections:
        keys |= {"time_embed_proj.weight", "time_embed_proj.bias"}
        keys |= {f"diff_proj.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    for i in range(n_head):
        p = f"diffusion_head_a.{i}."
        keys |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {p + f"self_attn.{x}_norm.weight" for x in "qk"}
        keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {p + f"{x}_layernorm.weight" for x in ("input", "post_attention")}
        keys |= {p + f"adaLN_modulation.1.{w}" for w in ("weight", "bias")}
    keys |= {"diffusion_head_b.norm_final.weight", "diffusion_head_b.linear.weight", "diffusion_head_b.linear.bias",
             "diffusion_head_b.adaLN_modulation.1.weight", "diffusion_head_b.adaLN_modulation.1.bias"}
    return keys


def meta_model(config: Showo2Config) -> Showo2:
    with torch.device("meta"):
        return Showo2(config)


@pytest.fixture(scope="module")
def preset_models():
    return {name: meta_model(Showo2Config.from_name(name)) for name in ("1.5B", "7B")}


@pytest.mark.parametrize("name,expected", [("1.5B", 2.83e9), ("7B", 8.93e9)])
def test_preset_parameter_count(preset_models, name, expected):
    model = preset_models[name]
    n = sum(p.numel() for p in model.parameters())  # a tied head counts once
    assert abs(n - expected) / expected < 0.01, n
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", ["1.5B", "7B"])
def test_preset_key_set(preset_models, name):
    keys = set(preset_models[name].state_dict())
    expected = official_keys(n_llm=28, n_und=26, n_head=10)
    assert keys == expected, (sorted(keys - expected)[:10], sorted(expected - keys)[:10])


def test_preset_shapes(preset_models):
    sd15, sd7 = preset_models["1.5B"].state_dict(), preset_models["7B"].state_dict()
    assert sd15["showo.model.embed_tokens.weight"].shape == (151669, 1536)
    assert sd15["showo.lm_head.weight"].shape == (151669, 1536)
    assert sd7["showo.model.embed_tokens.weight"].shape == (151669, 3584)
    assert sd7["showo.lm_head.weight"].shape == (151669, 3584)
    assert Showo2Config.from_name("1.5B").llm_vocab_size == 151669
    for sd, H in ((sd15, 1536), (sd7, 3584)):
        assert sd["diffusion_head_a.0.adaLN_modulation.1.weight"].shape == (12288, 2048)
        assert sd["diffusion_head_b.adaLN_modulation.1.weight"].shape == (4096, 2048)
        assert sd["diffusion_head_b.linear.weight"].shape == (2 * 2 * 16, 2048)
        assert sd["position_embedding.weight"].shape == (729, 1152)
        assert sd["image_embedder_und.proj.weight"].shape == (1152, 16, 2, 2)
        assert sd["image_embedder_gen.proj.weight"].shape == (H, 16, 2, 2)
        assert sd["fusion_proj.1.weight"].shape == (H, H + 1152)
        assert sd["diff_proj.0.weight"].shape == (2048, H)
        assert sd["time_embed_proj.weight"].shape == (H, 2048)
        assert sd["time_embed.mlp.0.weight"].shape == (2048, 256)
        assert sd["diffusion_head_a.0.self_attn.q_norm.weight"].shape == (64,)
        assert sd["diffusion_head_a.0.self_attn.k_proj.weight"].shape == (8 * 64, 2048)
    # 1.5B ties the language head to the embeddings (Qwen2.5-1.5B), 7B does not.
    m15, m7 = preset_models["1.5B"], preset_models["7B"]
    assert m15.showo.lm_head.weight is m15.showo.model.embed_tokens.weight
    assert m7.showo.lm_head.weight is not m7.showo.model.embed_tokens.weight


def test_preset_geometry():
    c = Showo2Config.from_name("1.5B")
    assert c.num_image_tokens == 729 and c.num_image_slots == 730 and c.latent_size == (54, 54)
    assert c.num_und_layers == 26 and c.default_max_seq_len == 1024
    assert c.head == FlowHeadConfig()
    with pytest.raises(ValueError, match=r"preset"):
        Showo2Config.from_name("3B")


def test_golden_key_set(golden_dir, golden_meta):
    from flashu_batch.showo2.checkpoint import read_state_dict

    folder = os.path.join(golden_dir, "checkpoint")
    config = Showo2Config.from_pretrained(folder)
    model_keys = set(meta_model(config).state_dict())
    for file in ("model.safetensors", "pytorch_model.bin"):
        assert set(read_state_dict(os.path.join(folder, file))) == model_keys, file
    m = golden_meta["model"]
    assert model_keys == official_keys(m["llm_layers"], m["und_trans_layers"], m["num_diffusion_layers"])


def test_golden_config_from_pretrained(golden_dir, golden_meta):
    config = Showo2Config.from_pretrained(os.path.join(golden_dir, "checkpoint"))
    m, s = golden_meta["model"], golden_meta["settings"]
    assert config.hidden_size == config.llm["hidden_size"] == m["llm_hidden"]
    assert config.llm["num_hidden_layers"] == m["llm_layers"]
    assert config.llm["tie_word_embeddings"] is m["tie_word_embeddings"]
    assert config.llm_vocab_size == golden_meta["tokenizer"]["llm_vocab_size"]
    assert config.num_und_layers == m["und_trans_layers"] and config.clip_latent_dim == m["clip_latent_dim"]
    assert config.num_image_tokens == s["num_image_tokens"] and config.num_image_slots == s["num_image_slots"]
    assert config.latent_size == tuple(s["latent_size"][1:]) and config.image_latent_dim == m["latent_channels"]
    assert config.num_diffusion_layers == m["num_diffusion_layers"] and config.patch_size == m["patch_size"]
    assert {k: getattr(config.head, k) for k in m["flow_head"]} == m["flow_head"]
    # The README's official constants for what the golden set does not override.
    assert config.head.rms_norm_eps == 1e-5 and config.head.rope_theta == 5e5
    assert config.head.rope_scaling["factor"] == 32.0


def test_equal_width_has_no_projections(make_tiny_model):
    # Real size on the meta device: an LLM as wide as the flow head (2048).
    llm = {**Showo2Config.from_name("1.5B").llm, "hidden_size": 2048, "num_hidden_layers": 2,
           "num_attention_heads": 16}
    config = dataclasses.replace(Showo2Config.from_name("1.5B"), llm=llm, hidden_size=2048)
    keys = set(meta_model(config).state_dict())
    assert keys == official_keys(n_llm=2, n_und=26, n_head=10, with_projections=False)

    # And a tiny one that actually runs: the time token is temb itself, the head reads the LLM state directly.
    model = make_tiny_model(seed=1, hidden_size=96, llm_overrides={"hidden_size": 96})
    assert not any(k.startswith(("diff_proj", "time_embed_proj")) for k in model.state_dict())
    temb, token = model.time_embedding(torch.tensor([0.3]))
    assert torch.equal(temb, token)
    from flashu_batch.showo2.modeling import additive_mask, omni_attention_mask

    S, L = model.config.num_image_slots, 24
    mp = torch.tensor([[[3, S]]])
    mask = additive_mask(omni_attention_mask(mp, L), torch.float32)
    h, w = model.config.latent_size
    with torch.no_grad():
        v = model.velocity(torch.randint(0, 1000, (1, L)), torch.tensor([3]), mp, mask, torch.randn(1, 16, h, w),
                           torch.tensor([0.5]))
    assert v.shape == (1, 16, h, w) and torch.isfinite(v).all()


# ------------------------------------------------------------------------------------------- from_pretrained


def official_config(**overrides) -> dict:
    """config.json of the official 1.5B release (keys of Showo2Qwen2_5.__init__, hub ids for the sub-configs)."""
    raw = {"_class_name": "Showo2Qwen2_5", "_diffusers_version": "0.31.0", "_use_default_values": ["x"],
           "add_qk_norm": True, "add_time_embeds": True, "clip_latent_dim": 1152,
           "clip_pretrained_model_path": "google/siglip-so400m-patch14-384", "hidden_size": 1536,
           "image_latent_dim": 16, "image_latent_height": 27, "image_latent_width": 27,
           "llm_model_path": "Qwen/Qwen2.5-1.5B-Instruct", "llm_vocab_size": 151669, "load_from_showo": False,
           "num_diffusion_layers": 10, "patch_size": 2, "video_latent_height": 27, "video_latent_width": 27}
    raw.update(overrides)
    return raw


def write_config(folder, raw: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    return str(folder)


def test_known_hub_ids_resolve_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no stray folder named like a hub id next to the process
    config = Showo2Config.from_pretrained(write_config(tmp_path / "ckpt15", official_config()))
    assert config == Showo2Config.from_name("1.5B")
    assert config.llm == KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"]
    assert config.siglip == KNOWN_CONFIGS["google/siglip-so400m-patch14-384"]

    raw7 = official_config(llm_model_path="Qwen/Qwen2.5-7B-Instruct", hidden_size=3584)
    assert Showo2Config.from_pretrained(write_config(tmp_path / "ckpt7", raw7)) == Showo2Config.from_name("7B")


def test_local_subconfig_takes_precedence(tmp_path):
    folder = tmp_path / "ckpt"
    llm = {**KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"], "num_hidden_layers": 3}
    write_config(folder / "Qwen" / "Qwen2.5-1.5B-Instruct", llm)
    # A full SiglipModel config nests the vision tower.
    write_config(folder / "siglip", {"model_type": "siglip", "text_config": {"hidden_size": 7},
                                     "vision_config": {**KNOWN_CONFIGS["google/siglip-so400m-patch14-384"],
                                                       "num_hidden_layers": 4}})
    config = Showo2Config.from_pretrained(write_config(folder, official_config(clip_pretrained_model_path="siglip")))
    assert config.llm["num_hidden_layers"] == 3 and config.num_und_layers == 3
    # An absolute folder works as well.
    config = Showo2Config.from_pretrained(write_config(tmp_path / "other", official_config(
        llm_model_path=str(folder / "Qwen" / "Qwen2.5-1.5B-Instruct"))))
    assert config.llm["num_hidden_layers"] == 3


def test_unknown_keys_rejected(tmp_path):
    folder = write_config(tmp_path, official_config(num_diffusion_layer=10, foo=1))
    with pytest.raises(ValueError, match=r"unknown keys") as e:
        Showo2Config.from_pretrained(folder)
    assert "num_diffusion_layer" in str(e.value) and "foo" in str(e.value)


def test_bad_configs_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"llm_model_path"):
        Showo2Config.from_pretrained(write_config(tmp_path / "a", official_config(llm_model_path="Qwen/Nope")))
    with pytest.raises(ValueError, match=r"llm_model_path"):
        Showo2Config.from_pretrained(write_config(tmp_path / "b", {
            k: v for k, v in official_config().items() if k != "llm_model_path"}))
    with pytest.raises(ValueError, match=r"hidden_size"):  # LLM width disagrees with Show-o2's hidden_size
        Showo2Config.from_pretrained(write_config(tmp_path / "c", official_config(hidden_size=3584)))
    with pytest.raises(ValueError, match=r"clip_latent_dim"):
        Showo2Config.from_pretrained(write_config(tmp_path / "d", official_config(clip_latent_dim=1024)))
    with pytest.raises(ValueError, match=r"qk_norm"):
        Showo2Config.from_pretrained(write_config(tmp_path / "e", official_config(
            diffusion_head_config={"qk_norm": False})))
    with pytest.raises(ValueError, match=r"not valid JSON"):
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "config.json").write_text("{")
        Showo2Config.from_pretrained(str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"config\.json"):
        Showo2Config.from_pretrained(str(tmp_path / "missing"))


def test_diffusion_head_config_extension(tmp_path):
    head = {"hidden_size": 96, "head_dim": 16, "intermediate_size": 192, "num_attention_heads": 6,
            "num_key_value_heads": 2, "hidden_act": "silu", "qk_norm": True}
    config = Showo2Config.from_pretrained(write_config(tmp_path, official_config(diffusion_head_config=head)))
    assert config.head == FlowHeadConfig(hidden_size=96, head_dim=16, intermediate_size=192, num_attention_heads=6,
                                         num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"head_dim"):
        Showo2Config.from_pretrained(write_config(tmp_path, official_config(
            diffusion_head_config={**head, "head_dim": 32})))


def test_llm_query_heads_must_be_a_multiple_of_the_key_value_heads():
    """Grouped-query attention fails at the first forward otherwise; the config says so when it is made."""
    tiny = Showo2Config.from_name("tiny")
    llm = dict(tiny.llm, num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads 8 is not a multiple of num_key_value_heads 3"):
        dataclasses.replace(tiny, llm=llm)


def test_input_resolution_reads_a_local_folder_or_the_hub_cache_and_nothing_else(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from flashu_batch.showo2.config import input_resolution

    from batch_testkit import hub_cache

    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({"llm_model_path": "Qwen/Qwen2.5-1.5B-Instruct"}))  # defaults
    assert input_resolution(str(official)) == 432 == Showo2Config.from_name("1.5B").resolution
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({"image_latent_height": 4, "image_latent_width": 4}))
    assert input_resolution(str(tiny)) == 64 == Showo2Config.from_name("tiny").resolution

    hf_home, _ = hub_cache(str(tmp_path / "hf"), "test-org/tiny-cached", str(tiny))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    monkeypatch.chdir(tmp_path)  # no local folder named test-org/...: the bare id is a Hub id
    assert input_resolution("test-org/tiny-cached") == 64 == input_resolution("hf://test-org/tiny-cached")
    # nothing it cannot read cheaply: not cached (never downloaded), s3://, no folder, a non-square or broken config
    assert input_resolution("test-org/not-cached") is None and input_resolution("s3://bucket/model") is None
    assert input_resolution(str(tmp_path / "missing")) is None
    (tiny / "config.json").write_text(json.dumps({"image_latent_height": 4, "image_latent_width": 6}))
    assert input_resolution(str(tiny)) is None
    (tiny / "config.json").write_text("{not json")
    assert input_resolution(str(tiny)) is None
