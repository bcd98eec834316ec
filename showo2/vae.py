"""Wan2.1 VAE (the 3-D causal video VAE of Show-o2, official weights `Wan2.1_VAE.pth`), for single images.

Behaviour reproduced: `WanVAE_` in show-o2/models/wan21_vae.py (showlab/Show-o, itself the Wan2.1 `vae.py`),
called the way Show-o2 calls it: an image is a video of T = 1 frame, the posterior mean is used (no sampling),
and the latent is normalised per channel with the 16 official mean/std constants.

Shape legend
    B  batch                       C  channels (width of the current stage)
    H W  pixel height / width      h w  latent height / width (H / 8, W / 8 for the official layout)
    N  = h * w (or the spatial size of the current stage) tokens in the middle self-attention

Why 2-D convolutions on 5-D weights are exact for one frame
    Every `CausalConv3d` of the official model pads the time axis with 2 zero frames in front (kernel 3) or none
    (kernel 1) and never behind. For an input of T = 1 the single output frame is therefore
        w[:, :, 0] * 0 + w[:, :, 1] * 0 + w[:, :, 2] * frame  (+ bias)
    i.e. a 2-D convolution of the frame with the last temporal tap `w[:, :, -1]`, spatial padding unchanged.
    The weights keep their stored 5-D shape [out, in, kt, kh, kw] so the official state dict loads key for key.
    Likewise the resampling blocks' `time_conv` only runs on the second and later frame chunks (the first chunk
    only seeds the frame cache), so for T = 1 those weights are stored but never used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from flashu_batch.showo2.checkpoint import load_strict, read_state_dict

# The official latent normalisation constants (WanVAE in wan21_vae.py); per latent channel.
_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# vae_config.json keys that describe the model but do not change the architecture.
_INFORMATIONAL_KEYS = frozenset({"dropout", "spatial_compression", "temporal_compression"})


@dataclass
class VAEConfig:
    """Architecture of `WanVAE_` (same names as its constructor, including the upstream spelling "temperal").

    `attn_scales` is empty in every Wan2.1 release. The structure for a non-empty value (extra attention blocks
    in the down/up stages) is built as upstream would build it, but upstream's cached forward cannot run it
    (it passes the frame cache to the attention blocks), so there is no reference behaviour beyond the shapes.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare and hash predictably.
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.dim <= 0 or self.z_dim <= 0 or self.num_res_blocks < 0 or not self.dim_mult:
            raise ValueError(f"Invalid VAE config: {self}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries, expected "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}."
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected z_dim = {self.z_dim}.")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the official layout)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_json(cls, path: str) -> "VAEConfig":
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"VAE config {path!r} must hold a JSON object.")
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key.startswith("_") or key in _INFORMATIONAL_KEYS:
                continue
            if key not in known:
                raise ValueError(f"Unknown key {key!r} in VAE config {path!r} (known: {sorted(known)}).")
            kwargs[key] = value
        return cls(**kwargs)


VAE_CONFIGS = {"wan2.1": VAEConfig()}


# ---------------------------------------------------------------------------------------------------------------
# Building blocks. Module / parameter names and container indices follow the official state dict.


class FrameConv3d(nn.Module):
    """A causal Conv3d (stride 1) applied to a single frame: 2-D conv with the last temporal tap (see top)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int]):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, kt, kh, kw))  # stored 5-D, as in the file
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.padding = (kh // 2, kw // 2)  # spatial "same" padding with zeros, as the official padding=1
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_dim * kt * kh * kw), 1 / math.sqrt(in_dim * kt * kh * kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding)


class UnusedTimeConv(nn.Module):
    """Holds the temporal `time_conv` weights of a resampling block; they only act on frames 2+, never at T = 1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim, 3, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_dim))


class RMSNorm(nn.Module):
    """Official `RMS_norm`: L2-normalise over channels (dim 1), times sqrt(C) and gamma (+ bias if present).

    `gamma_dims` is the number of trailing singleton dims of the stored gamma: 3 in residual blocks / heads
    (stored (C, 1, 1, 1) for video tensors), 2 in the attention block (stored (C, 1, 1)).
    """

    def __init__(self, dim: int, gamma_dims: int, bias: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * gamma_dims))
        self.bias = nn.Parameter(torch.zeros(dim, *(1,) * gamma_dims)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        # Upcast: bf16 sums of squares lose too much; in fp32 this is the official op order exactly.
        gamma = self.gamma.reshape(-1, 1, 1).float()  # (C, 1, 1): frames have no time axis here
        y = F.normalize(x.float(), dim=1) * self.scale * gamma
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1, 1).float()
        return y.to(x.dtype)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> (dropout) -> conv3, plus a 1x1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Identity stands in for the inference-time no-op dropout; it keeps the official indices 0, 2, 3, 6.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), FrameConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), FrameConv3d(out_dim, out_dim, 3),
        )  # fmt: skip
        self.shortcut = FrameConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the spatial positions of one frame, with a residual connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))  # (B, 3C, H, W), channels ordered [q | k | v]
        qkv = qkv.reshape(b, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()  # (B, 1 head, N, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, 1, N, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C), scale 1/sqrt(C)
        out = out.squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)  # (B, C, H, W)
        return self.proj(out) + x


class NearestExactUp2(nn.Module):
    """x2 nearest-exact upsampling; computed in fp32 like the official `Upsample` (its bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Spatial x2 down- or upsampling of one frame (official `Resample`, modes down/upsample 2d/3d).

    down: zero-pad right 1 and bottom 1, then 3x3 conv stride 2 (same width).
    up:   nearest-exact x2, then 3x3 conv to half the width.
    The "3d" modes add a `time_conv` that is unused for a single frame (see top of file).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = UnusedTimeConv(dim, dim)
        elif mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(NearestExactUp2(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = UnusedTimeConv(dim, dim * 2)  # would emit 2 frames per frame
        else:
            raise ValueError(f"Unknown resample mode {mode!r}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class Encoder(nn.Module):
    """Official `Encoder3d` for one frame: (B, 3, H, W) -> (B, 2 * z_dim, h, w) = [mu | logvar] pre-`conv1`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = FrameConv3d(3, dims[0], 3)
        blocks: list[nn.Module] = []
        scale = 1.0  # current resolution relative to the input, matched against attn_scales
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top, 3), nn.SiLU(), FrameConv3d(top, cfg.z_dim * 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    """Official `Decoder3d` for one frame: (B, z_dim, h, w) (after top-level `conv2`) -> (B, 3, H, W)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = FrameConv3d(cfg.z_dim, dims[0], 3)
        top = dims[0]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        blocks: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(mult) - 2)  # upstream's bookkeeping for attn_scales (starts one stage too low)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsampling conv halves the width
            for _ in range(cfg.num_res_blocks + 1):  # one block more than the encoder per stage
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), FrameConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


# ---------------------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE for images. Parameters live in the module's dtype (fp32 or bf16); outputs are always fp32
    (as the official `WanVAE` wrapper returns `.float()`), latents are normalised per channel."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = FrameConv3d(config.z_dim * 2, config.z_dim * 2, 1)  # -> [mu | logvar]
        self.conv2 = FrameConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _norm_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors rather than buffers: the official state dict has no such keys, and a meta-built
        # model loaded with assign=True would otherwise keep meta buffers. Shapes (1, z_dim, 1, 1).
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # Upstream multiplies by a precomputed reciprocal std (and divides by it to decode); keep that order.
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, inv_std

    def _check(self, x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        expected = f"(B, {channels}, H, W)" + (f" with H and W multiples of {multiple}" if multiple > 1 else "")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what} must be a tensor {expected}, got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(f"{what} must be 4-D {expected}, got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}.")
        b, c, h, w = x.shape
        if c != channels:
            raise ValueError(f"{what} must have {channels} channels {expected}, got shape {tuple(x.shape)}.")
        if b == 0 or h == 0 or w == 0 or h % multiple or w % multiple:
            raise ValueError(f"{what} must be non-empty {expected}, got shape {tuple(x.shape)}.")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> normalised posterior mean (B, z_dim, H/8, W/8)."""
        self._check(pixels, "pixels", 3, self.config.spatial_factor)
        h = self.encoder(pixels.to(self.dtype))  # (B, 2 z_dim, h, w)
        mu, _logvar = self.conv1(h).chunk(2, dim=1)  # (B, z_dim, h, w) each; logvar unused (no sampling)
        mean, inv_std = self._norm_constants(mu.device)
        return (mu.float() - mean) * inv_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, z_dim, h, w) -> pixels (B, 3, 8h, 8w) clamped to [-1, 1]."""
        self._check(latents, "latents", self.config.z_dim, 1)
        mean, inv_std = self._norm_constants(latents.device)
        z = latents.float() / inv_std + mean  # undo the normalisation, (B, z_dim, h, w)
        x = self.decoder(self.conv2(z.to(self.dtype)))  # (B, 3, H, W)
        return x.float().clamp(-1.0, 1.0)


def load_vae(path: str, config: VAEConfig | None = None, dtype=torch.float32, device="cpu") -> WanVAE:
    """Build the VAE (config: given, else vae_config.json beside the file, else the official preset) and load
    the weights strictly. Reads with showo2.checkpoint.read_state_dict (safetensors or torch.load(weights_only=True))
    and loads with showo2.checkpoint.load_strict, which raise CheckpointError with clear messages."""
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "vae_config.json")
        config = VAEConfig.from_json(beside) if os.path.isfile(beside) else VAE_CONFIGS["wan2.1"]
    state = read_state_dict(path)
    with torch.device("meta"):  # no random init of ~127M parameters that are overwritten right away
        vae = WanVAE(config).to(dtype)
    load_strict(vae, state, path)
    return vae.to(device).eval().requires_grad_(False)
