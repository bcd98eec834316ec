"""Show-o2 hyperparameters: plain dataclasses, named presets, and reading an official checkpoint's config.

An official release stores only the Show-o2 `config.json` (the `__init__` arguments of the official
`Showo2Qwen2_5`); the LLM and SigLIP configs are referenced by hub id (`llm_model_path`,
`clip_pretrained_model_path`). Nothing can be downloaded at inference time, so the configs of the three hub ids
the official code knows are built in below, and a local folder (relative to the checkpoint, or absolute) with a
`config.json` takes precedence.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

# Qwen2.5 configs as published on the hub (only the keys the architecture depends on).
QWEN2_5_1_5B_INSTRUCT = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    use_sliding_window=False, sliding_window=32768, max_window_layers=21,
)
QWEN2_5_7B_INSTRUCT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=152064,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    use_sliding_window=False, sliding_window=131072, max_window_layers=28,
)
# Vision tower of google/siglip-so400m-patch14-384 (27 layers; Show-o2 deletes the last one).
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
    patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
)
VAE_STRIDE = 8  # pixels per latent cell along each side (the Wan2.1 VAE: showo2/vae.py)

KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-1.5B-Instruct": QWEN2_5_1_5B_INSTRUCT,
    "Qwen/Qwen2.5-7B-Instruct": QWEN2_5_7B_INSTRUCT,
    "google/siglip-so400m-patch14-384": SIGLIP_SO400M_384,
}

# Keys the official config.json carries that change nothing in the architecture (see design/showo2.md 6.9).
_IGNORED_KEYS = {"llm_model_path", "clip_pretrained_model_path", "load_from_showo", "add_qk_norm",
                 "video_latent_height", "video_latent_width", "num_und_trans_layers", "num_refiner_layers"}


@dataclass
class FlowHeadConfig:
    """The flow head ("diffusion head"). The official code hard-codes these (modules.py DiffusionHeadConfig)."""

    hidden_size: int = 2048
    head_dim: int = 64
    intermediate_size: int = 8192
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5  # block norms; q/k norms and the final-layer norm use 1e-6 (official RMSNorm default)
    rope_theta: float = 500000.0
    rope_scaling: dict = field(default_factory=lambda: dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))

    @classmethod
    def from_dict(cls, d: dict) -> "FlowHeadConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # The golden sets list the official constants that are not dimensions too; they must agree with ours.
        constants = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, qk_norm=True, attention_dropout=0.0)
        for k, v in d.items():
            if k in constants and v != constants[k]:
                raise ValueError(f"diffusion_head_config[{k!r}] = {v!r} is not supported (official value {constants[k]!r}).")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Showo2Config:
    llm: dict  # Qwen2 config kwargs (transformers.Qwen2Config); vocab_size is replaced by llm_vocab_size
    siglip: dict  # SigLIP vision config kwargs; the semantic layers are num_hidden_layers - 1 of its encoder layers
    llm_vocab_size: int = 151669
    hidden_size: int = 1536  # LLM width H
    clip_latent_dim: int = 1152  # semantic-layer width
    image_latent_dim: int = 16  # VAE latent channels C
    image_latent_height: int = 27  # image tokens per side (latent side / patch_size)
    image_latent_width: int = 27
    patch_size: int = 2
    num_diffusion_layers: int = 10
    add_time_embeds: bool = True
    head: FlowHeadConfig = field(default_factory=FlowHeadConfig)

    def __post_init__(self):
        if self.llm["hidden_size"] != self.hidden_size:
            raise ValueError(f"LLM hidden_size {self.llm['hidden_size']} != Show-o2 hidden_size {self.hidden_size}.")
        if self.siglip["hidden_size"] != self.clip_latent_dim:
            raise ValueError(f"SigLIP hidden_size {self.siglip['hidden_size']} != clip_latent_dim {self.clip_latent_dim}.")
        heads = self.llm["num_attention_heads"]
        kv_heads = self.llm.get("num_key_value_heads", heads)  # Qwen2Config's default: one per query head
        if heads % kv_heads:  # grouped-query attention shares each key-value head among a whole number of them
            raise ValueError(f"LLM num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}.")
        if self.head.hidden_size // self.head.num_attention_heads != self.head.head_dim:
            # The official q/k norms are sized hidden_size // num_heads; only head_dim of that size works upstream.
            raise ValueError(f"Flow head head_dim {self.head.head_dim} must equal hidden_size // num_attention_heads.")

    @property
    def num_image_tokens(self) -> int:
        return self.image_latent_height * self.image_latent_width

    @property
    def num_image_slots(self) -> int:
        """Sequence slots an image occupies: the time token (when add_time_embeds) plus one per image token."""
        return self.num_image_tokens + int(self.add_time_embeds)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the VAE latent the model generates and reads."""
        return self.image_latent_height * self.patch_size, self.image_latent_width * self.patch_size

    @property
    def resolution(self) -> int:
        """Image side R in pixels the model reads and writes: the latent side times the VAE's stride (432 for the
        official 27 x 27 tokens)."""
        return self.latent_size[0] * VAE_STRIDE

    @property
    def num_und_layers(self) -> int:
        return self.siglip["num_hidden_layers"] - 1  # official: `del self.und_trans.layers[-1]`

    @property
    def default_max_seq_len(self) -> int:
        """The official max_seq_len for this image size (432 px: 1024, 512 px: 1280, 1024 px: 4352).

        Other sizes get room for 256 text tokens; callers may always pass their own.
        """
        official = {729: 1024, 1024: 1280, 4096: 4352}
        return official.get(self.num_image_tokens, self.num_image_slots + 4 + 256)

    @classmethod
    def from_name(cls, name: str) -> "Showo2Config":
        if name not in PRESETS:
            raise ValueError(f"Unknown Show-o2 preset {name!r}; choose one of {sorted(PRESETS)}.")
        return PRESETS[name]()

    @classmethod
    def from_pretrained(cls, folder: str) -> "Showo2Config":
        """Read an official-layout checkpoint folder's `config.json` and resolve its LLM and SigLIP configs."""
        path = os.path.join(folder, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except OSError as e:
            raise ValueError(f"Cannot read Show-o2 config {path!r}: {e.strerror}.") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"Show-o2 config {path!r} is not valid JSON: {e}.") from e
        llm = _resolve_config(folder, raw.get("llm_model_path", ""), "llm_model_path")
        siglip = _resolve_config(folder, raw.get("clip_pretrained_model_path", ""), "clip_pretrained_model_path")
        siglip = siglip.get("vision_config", siglip)  # a full SiglipModel config nests the vision tower
        fields = {f.name for f in dataclasses.fields(cls)} - {"llm", "siglip", "head"}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields | _IGNORED_KEYS
                         and k != "diffusion_head_config")
        if unknown:
            raise ValueError(f"Show-o2 config {path!r} has unknown keys {unknown}.")
        head = FlowHeadConfig.from_dict(raw.get("diffusion_head_config", {}))
        kwargs = {k: raw[k] for k in fields if k in raw}
        return cls(llm=llm, siglip=siglip, head=head, **kwargs)


def input_resolution(checkpoint: str) -> int | None:
    """The image side R (Showo2Config.resolution) of `checkpoint`'s model, from its config.json where that is cheap
    to read: a local folder, or a Hub reference whose config.json is in the local Hub cache already (nothing is
    downloaded). None for anything else (an s3:// prefix, a Hub model not cached yet, a config without a square
    image or unreadable): callers then leave resizing to the model's own preprocessing, which is always right."""
    from flashu_batch.showo2.hub import parse_ref  # imported here: hub.py imports this module

    try:
        ref = parse_ref(checkpoint)
    except ValueError:  # a malformed reference: the spec check reports it
        return None
    if ref is not None:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision)
    else:
        path = None if "://" in checkpoint else os.path.join(checkpoint, "config.json")
    if not isinstance(path, str):  # not cached (None), or cached as missing
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        default = {f.name: f.default for f in dataclasses.fields(Showo2Config)}
        h, w, p = (raw.get(key, default[key]) for key in ("image_latent_height", "image_latent_width", "patch_size"))
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w, p)) or h != w:
        return None
    return h * p * VAE_STRIDE


def _resolve_config(folder: str, ref: str, key: str) -> dict:
    """A sub-config referenced by `ref`: a folder relative to the checkpoint, an absolute folder, or a known hub id."""
    config_file = os.path.join(folder, ref, "config.json")  # an absolute ref stays absolute
    if ref and os.path.isfile(config_file):
        with open(config_file) as f:
            return json.load(f)
    if ref in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[ref])
    raise ValueError(
        f"config.json {key} = {ref!r}: no folder with a config.json at {os.path.join(folder, ref)!r}, "
        f"and not a known hub id ({sorted(KNOWN_CONFIGS)}). Put the config in a folder and point {key} at it.")


def _tiny() -> Showo2Config:
    """A few-hundred-thousand-parameter Show-o2 for tests (same shapes as the golden set tiny-a, untied head)."""
    llm = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
               vocab_size=1026, tie_word_embeddings=False, hidden_act="silu")
    siglip = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=56, patch_size=14)
    head = FlowHeadConfig(hidden_size=96, head_dim=16, intermediate_size=192, num_attention_heads=6,
                          num_key_value_heads=2)
    return Showo2Config(llm=llm, siglip=siglip, llm_vocab_size=1026, hidden_size=64, clip_latent_dim=48,
                        image_latent_height=4, image_latent_width=4, num_diffusion_layers=2, head=head)


PRESETS = {
    "1.5B": lambda: Showo2Config(llm=dict(QWEN2_5_1_5B_INSTRUCT), siglip=dict(SIGLIP_SO400M_384), hidden_size=1536),
    "7B": lambda: Showo2Config(llm=dict(QWEN2_5_7B_INSTRUCT), siglip=dict(SIGLIP_SO400M_384), hidden_size=3584),
    "tiny": _tiny,
}
