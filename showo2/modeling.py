"""Show-o2: the whole model in one file (Qwen2.5 LLM, semantic layers, fusion, time token, flow head).

Attribute names are the official state-dict keys (showlab/Show-o show-o2/models/modeling_showo2_qwen2_5.py), so an
official checkpoint loads key for key. The LLM and the semantic layers are stock transformers modules; the flow
head and the small projections are written here.

Shape legend: B batch rows, L sequence length, H LLM width, Dh flow-head width, D semantic width,
nh / nkv query / key-value heads, hd head dim, C latent channels, h w latent grid, N image tokens (= h*w / p^2),
p patch size.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from flashu_batch.showo2.config import FlowHeadConfig, Showo2Config


class RMSNorm(nn.Module):
    """Official Show-o2 RMSNorm: normalise in fp32, cast back, then scale (modules.py RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PatchEmbed(nn.Module):
    """Latent (B, C, h, w) -> tokens (B, N, D) with a stride-p convolution, raster order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h/p, w/p) -> (B, N, D)


class TimestepEmbedder(nn.Module):
    """Raw flow time t in [0, 1] (no x1000) -> 256-d [cos | sin] sinusoid -> MLP -> temb (B, Dh)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, computed in fp32 as upstream (modules.py modulate)."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def llama3_inv_freq(config: FlowHeadConfig) -> torch.Tensor:
    """Flow-head RoPE frequencies (hd/2,): theta 5e5 with llama3 long-context scaling (transformers 4.47 rule)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class CachedPrefixMask:
    """The prefix-cached T2I step's attention mask, kept in two parts so that the image span needs none.

    Keys are [P cached prefix keys | the span's own keys]; every span query sees the prefix keys that `prefix`
    allows (the row's real prompt; its padding is masked) and every span key (the omni mask is bidirectional inside
    the image). `prefix_span_attention` computes that as a mask-free attention over the span plus a small masked one
    over the prefix, merged by log-sum-exp: the same math as the dense mask `dense()` without (rows, heads, S, P + S)
    scores. Build it only where that holds, i.e. where every span key is visible to every span query.
    """
    prefix: torch.Tensor  # additive (B, 1, 1, P): 0 where a prefix key is visible, the dtype's min where not

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix.dtype

    def dense(self, span_len: int) -> torch.Tensor:
        """The same mask as one additive tensor (B, 1, 1, P + span_len), for the reference (masked SDPA) path."""
        return F.pad(self.prefix, (0, span_len))  # the span keys: 0, visible


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns each query's log-sum-exp of scores, written out in fp32 (the math SDPA does;
    SDPA itself returns no LSE). q (B, nh, L, hd), k and v (B, nkv, Lk, hd), attention_mask additive (B, 1, 1, Lk)
    (one row: every query sees the same keys) or None -> out (B, nh, L, hd) fp32, lse (B, nh, L) fp32.

    Query heads j*g .. j*g+g-1 share KV head j (g = nh / nkv): they are folded into the query sequence, so K/V are
    never copied per head (as grouped_query_attention)."""
    B, nh, L, hd = q.shape
    nkv = k.shape[1]
    scale = hd ** -0.5 if scale is None else scale
    folded = q.reshape(B, nkv, nh // nkv * L, hd).float()  # (B, nkv, g*L, hd)
    scores = folded @ k.float().transpose(-1, -2) * scale  # (B, nkv, g*L, Lk)
    if attention_mask is not None:
        scores = scores + attention_mask.float()  # (B, 1, 1, Lk) broadcasts over heads and queries
    lse = scores.logsumexp(dim=-1, keepdim=True)  # (B, nkv, g*L, 1)
    out = (scores - lse).exp() @ v.float()  # (B, nkv, g*L, hd)
    return out.reshape(B, nh, L, hd), lse.reshape(B, nh, L)


def unmasked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` without a mask, on the flash kernel where it runs: CUDA in half precision, head dims
    of a multiple of 8 up to 256 (the 1.5B's 128 and 64). Flash takes grouped-query K/V as they are (SDPA's
    enable_gqa path calls the same op) and returns the LSE that SDPA drops.
    q (B, nh, L, hd), k and v (B, nkv, Lk, hd) -> out (B, nh, L, hd) in q's dtype (fp32 elsewhere), lse (B, nh, L)
    fp32."""
    hd = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and hd % 8 == 0 and hd <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
        return out, lse
    return attention_with_lse(q, k, v, None, scale)


def prefix_span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: CachedPrefixMask,
                          scale: float | None = None) -> torch.Tensor:
    """Span queries over [cached prefix | span] keys (see CachedPrefixMask): one attention over the span keys with
    no mask, one over the P prefix keys with its padding mask, merged by log-sum-exp. Each part's output is its own
    softmax average, so the whole is their average weighted by each part's share exp(lse_part - lse).

    q (B, nh, L, hd), k and v (B, nkv, P + S, hd) -> (B, nh, L, hd) in q's dtype."""
    P = attention_mask.prefix.shape[-1]
    out_span, lse_span = unmasked_attention_with_lse(q, k[:, :, P:], v[:, :, P:], scale)  # (B, nh, L, hd), (B, nh, L)
    out_prefix, lse_prefix = attention_with_lse(q, k[:, :, :P], v[:, :, :P], attention_mask.prefix, scale)
    lse = torch.logaddexp(lse_span, lse_prefix)  # (B, nh, L): the log-sum-exp over all P + S keys
    out = out_span.float() * (lse_span - lse).exp()[..., None] + out_prefix * (lse_prefix - lse).exp()[..., None]
    return out.to(q.dtype)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            attention_mask: torch.Tensor | CachedPrefixMask | None,
                            scale: float | None = None) -> torch.Tensor:
    """Attention where query head i reads KV head i // (nh / nkv), as upstream repeat_kv.

    q (B, nh, L, hd), k and v (B, nkv, Lk, hd), attention_mask additive (B, 1, L, Lk) or (B, 1, 1, Lk), a
    CachedPrefixMask (the prefix-cached T2I step: `prefix_span_attention`), or None -> (B, nh, L, hd). With a
    one-row mask (every query sees the same keys) or none, the nh / nkv query heads of each KV head are folded into
    the query sequence, so SDPA sees nkv heads, no copied K/V and a plain (broadcast) mask: the memory-efficient
    kernel takes that, while enable_gqa with a mask falls back to the math kernel on CUDA (dense scores). Other
    masks (the full-sequence reference) use enable_gqa.
    """
    if isinstance(attention_mask, CachedPrefixMask):
        return prefix_span_attention(q, k, v, attention_mask, scale)
    B, nh, L, hd = q.shape
    nkv = k.shape[1]
    if nkv == nh or (attention_mask is not None and attention_mask.shape[-2] != 1):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale, enable_gqa=True)
    g = nh // nkv
    folded = q.reshape(B, nkv, g * L, hd)  # heads j*g .. j*g+g-1 share KV head j: (B, nkv, g*L, hd)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=attention_mask, scale=scale)  # (B, nkv, g*L, hd)
    return out.reshape(B, nh, L, hd)


@dataclass(frozen=True)
class FlexMask:
    """A prompt's attention mask as a FlexAttention block mask (`omni_flex_mask`): the kernel skips every block of
    (query, key) tiles the mask hides whole, i.e. most of the causal upper half and the left padding, takes
    grouped-query heads as they are (no K/V copy per head) and never builds the (rows, heads, L, L) scores.

    attend: `flex_attention`, or its compiled form (showo2/compile.py Compiler.flex_attention): only compiled is it a
    fused kernel; eager it materialises the scores, so eager callers keep the additive mask.
    """
    block_mask: BlockMask
    attend: Callable = flex_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """q (B, nh, L, hd), k and v (B, nkv, L, hd) -> (B, nh, L, hd)."""
        return self.attend(q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=True)


def llm_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The LLM's attention kernel (registered below as "showo2_sdpa", chosen in `Showo2.__init__`): transformers'
    SDPA path, except that one-row masks (cached decoding) go through `grouped_query_attention` instead of repeating
    K/V for every query head, and a CachedPrefixMask (the prefix-cached T2I step) through `prefix_span_attention`.
    query (B, nh, L, hd), key and value (B, nkv, Lk, hd) -> ((B, L, nh, hd), None), as transformers' attention
    functions."""
    if isinstance(attention_mask, FlexMask):  # the VQA prefill (inference only)
        return attention_mask(query, key, value, scaling).transpose(1, 2).contiguous(), None
    if isinstance(attention_mask, CachedPrefixMask):
        if dropout == 0.0:
            return prefix_span_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
        attention_mask = attention_mask.dense(key.shape[2] - attention_mask.prefix.shape[-1])  # training: reference
    one_row = attention_mask.shape[-2] == 1 if attention_mask is not None else query.shape[2] == 1
    if one_row and dropout == 0.0:  # every query sees the same keys (no mask and L > 1 would mean causal)
        out = grouped_query_attention(query, key, value, attention_mask, scale=scaling)  # (B, nh, L, hd)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register("showo2_sdpa", llm_attention)


class HeadAttention(nn.Module):
    """Flow-head attention: GQA, no biases, per-head RMSNorm on q and k before RoPE."""

    def __init__(self, config: FlowHeadConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x, cos, sin, attention_mask, cache=None):
        """x (B, L, Dh); cos/sin broadcastable to (B, 1, L, hd); attention_mask additive (B, 1, L, Lk) where Lk
        counts the cached keys too -> (B, L, Dh). `cache.update(k, v, layer_idx)` returns all keys and values."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2))  # (B, nh, L, hd)
        k = self.k_norm(self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2))  # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, Lk, hd)
        out = grouped_query_attention(q, k, v, attention_mask)  # (B, nh, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class HeadMLP(nn.Module):
    def __init__(self, config: FlowHeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def modulate_span(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, in_span: torch.Tensor) -> torch.Tensor:
    """adaLN modulation inside the image span, x unchanged outside it: x (B, L, Dh), shift and scale (B, 1, Dh)
    (broadcast over L, never materialised per position), in_span (B, L, 1) bool -> (B, L, Dh). Outside the span
    this is exactly x, as upstream's modulate with a zero shift and scale there."""
    return torch.where(in_span, modulate(x, shift, scale), x)


class ModulatedAttentionBlock(nn.Module):
    """Pre-norm attention + MLP block whose adaLN shift/scale/gate apply only to the image span (time slot included)."""

    def __init__(self, config: FlowHeadConfig, layer_idx: int):
        super().__init__()
        self.self_attn = HeadAttention(config, layer_idx)
        self.mlp = HeadMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * config.hidden_size))

    def forward(self, x, temb, in_span, cos, sin, attention_mask, cache=None):
        """x (B, L, Dh), temb (B, Dh), in_span (B, L, 1) bool -> (B, L, Dh)."""
        # one Linear, six views (B, 1, Dh) that broadcast over positions; the gate is 1 outside the span
        mods = self.adaLN_modulation(temb).to(x.dtype)[:, None]  # (B, 1, 6*Dh)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
        attn = self.self_attn(modulate_span(self.input_layernorm(x), shift_msa, scale_msa, in_span), cos, sin,
                              attention_mask, cache)  # (B, L, Dh)
        x = x + torch.where(in_span, gate_msa * attn, attn)
        mlp = self.mlp(modulate_span(self.post_attention_layernorm(x), shift_mlp, scale_mlp, in_span))
        return x + torch.where(in_span, gate_mlp * mlp, mlp)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the image span, then Linear(Dh -> p*p*C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, temb, in_span):
        shift, scale = self.adaLN_modulation(temb).to(x.dtype)[:, None].chunk(2, dim=-1)  # (B, 1, Dh) each
        return self.linear(modulate_span(self.norm_final(x), shift, scale, in_span))


def omni_attention_mask(modality_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean omni-attention mask (B, 1, L, L), True = may attend.

    Causal everywhere, plus full attention inside each [offset, offset + length) block of a row
    (modality_positions (B, M, 2); length-0 entries are no-ops), as upstream omni_attention.omni_attn_mask_naive.
    """
    pos = torch.arange(seq_len, device=modality_positions.device)
    offset, length = modality_positions[..., 0, None], modality_positions[..., 1, None]  # (B, M, 1)
    inside = (pos >= offset) & (pos < offset + length)  # (B, M, L)
    block = (inside[:, :, :, None] & inside[:, :, None, :]).any(dim=1)  # (B, L, L)
    causal = pos[None, :] <= pos[:, None]  # (L, L): key <= query
    return (block | causal)[:, None]


def omni_flex_mask(modality_positions: torch.Tensor, pads: torch.Tensor, seq_len: int,
                   kept: torch.Tensor | None = None, attend: Callable = flex_attention) -> FlexMask:
    """The omni mask of left-padded prompts as a FlexMask: `omni_attention_mask` (B, 1, L, L) with the `pads` (B,)
    leading keys of each row hidden, and every query seeing itself (a padding query would otherwise see no key), as
    showo2.vqa.batch_prompts builds it densely.

    kept (B, L') long, increasing: the positions a row keeps once tokens are pruned (flashu/understanding.py): the
    mask of the kept rows and columns, for a prompt of L' tokens.
    """
    # (B, M) each; contiguous, as every tensor the mask reads (inductor's CPU FlexAttention takes no strided views)
    offset, length = modality_positions[..., 0].contiguous(), modality_positions[..., 1].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = (kept[b, q_idx], kept[b, kv_idx]) if kept is not None else (q_idx, kv_idx)
        visible = k <= q  # causal
        for m in range(offset.shape[1]):  # full attention inside each modality block
            start, end = offset[b, m], offset[b, m] + length[b, m]
            visible = visible | ((q >= start) & (q < end) & (k >= start) & (k < end))
        return (visible & (k >= pads[b])) | (q_idx == kv_idx)

    L = seq_len if kept is None else kept.shape[1]
    block_mask = create_block_mask(mask_mod, modality_positions.shape[0], None, L, L,
                                   device=modality_positions.device)
    return FlexMask(block_mask, attend)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive (0 where allowed, most negative finite value elsewhere) in `dtype`."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class Showo2(nn.Module):
    def __init__(self, config: Showo2Config):
        super().__init__()
        self.config = config
        H, D, Dh, C, p = (config.hidden_size, config.clip_latent_dim, config.head.hidden_size,
                          config.image_latent_dim, config.patch_size)
        llm_config = Qwen2Config(**{**config.llm, "vocab_size": config.llm_vocab_size})
        llm_config._attn_implementation = "showo2_sdpa"  # transformers' "sdpa" plus native grouped-query heads
        self.showo = Qwen2ForCausalLM(llm_config)

        self.image_embedder_und = PatchEmbed(p, C, D)
        self.image_embedder_gen = PatchEmbed(p, C, H)
        siglip = config.siglip
        num_positions = (siglip["image_size"] // siglip["patch_size"]) ** 2
        self.position_embedding = nn.Embedding(num_positions, D)
        und_config = SiglipVisionConfig(**{**siglip, "num_hidden_layers": config.num_und_layers})
        und_config._attn_implementation = "sdpa"
        self.und_trans = SiglipEncoder(und_config)
        self.fusion_proj = nn.Sequential(RMSNorm(D + H), nn.Linear(D + H, H), nn.GELU(), nn.Linear(H, H))

        self.time_embed = TimestepEmbedder(Dh)
        if H != Dh:  # upstream only has these projections when the widths differ
            self.diff_proj = nn.Sequential(nn.Linear(H, Dh), nn.GELU(), nn.Linear(Dh, Dh))
            self.time_embed_proj = nn.Linear(Dh, H)
        self.diffusion_head_a = nn.ModuleList(ModulatedAttentionBlock(config.head, i)
                                              for i in range(config.num_diffusion_layers))
        self.diffusion_head_b = FinalLayer(Dh, p * p * C)
        self.register_buffer("head_inv_freq", llama3_inv_freq(config.head), persistent=False)

    def init_buffers(self, device=None):
        """(Re)compute the non-persistent buffers, e.g. after building on the meta device and loading weights."""
        device = device or self.showo.model.embed_tokens.weight.device
        with torch.device(device):
            self.showo.model.rotary_emb = Qwen2RotaryEmbedding(self.showo.config)
        self.head_inv_freq = llama3_inv_freq(self.config.head).to(device)

    # ---- image side -------------------------------------------------------------------------------------------

    def semantic_position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """SigLIP position table for a (grid_h, grid_w) token grid -> (N, D). Bicubic resize when the table's
        27x27 grid differs (HQ models), as upstream misc.interpolate_pos_encoding."""
        table = self.position_embedding.weight  # (P, D)
        if table.shape[0] == grid_h * grid_w:
            return table
        side = math.isqrt(table.shape[0])
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def embed_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents (B, C, h, w) -> fused image tokens (B, N, H), raster order."""
        dtype = self.showo.model.embed_tokens.weight.dtype
        latents = latents.to(dtype)
        p = self.config.patch_size
        und = self.image_embedder_und(latents)  # (B, N, D)
        und = und + self.semantic_position_embedding(latents.shape[-2] // p, latents.shape[-1] // p)
        und = self.und_trans(inputs_embeds=und).last_hidden_state  # (B, N, D)
        gen = self.image_embedder_gen(latents)  # (B, N, H)
        return self.fusion_proj(torch.cat([und, gen], dim=-1))

    def time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow time t (B,) -> (temb (B, Dh) for adaLN, time token (B, H) for the sequence)."""
        temb = self.time_embed(t, self.showo.model.embed_tokens.weight.dtype)
        token = self.time_embed_proj(temb) if hasattr(self, "time_embed_proj") else temb
        return temb, token

    def assemble_embeddings(self, input_ids, image_offsets, time_token, image_tokens):
        """Token embeddings with each row's image slots overwritten: [time token, N image tokens] at image_offsets.

        input_ids (B, L), image_offsets (B,) index of the time slot, time_token (B, H), image_tokens (B, N, H)
        -> (B, L, H).
        """
        embeds = self.showo.model.embed_tokens(input_ids)  # (B, L, H)
        slots = torch.cat([time_token[:, None], image_tokens], dim=1).to(embeds.dtype)  # (B, 1+N, H)
        index = image_offsets[:, None] + torch.arange(slots.shape[1], device=input_ids.device)  # (B, 1+N)
        return embeds.scatter(1, index[..., None].expand(-1, -1, embeds.shape[-1]), slots)

    # ---- sequence side ----------------------------------------------------------------------------------------

    def llm_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """LLM over the whole sequence with an additive (B, 1, L, L) mask -> final-RMSNorm-ed hidden (B, L, H)."""
        return self.showo.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state

    def head_rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-head RoPE for position_ids (B, L) -> cos, sin (B, 1, L, hd) (positions are sequence indices, as the
        LLM's)."""
        freqs = position_ids[..., None].float() * self.head_inv_freq.float()  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def head_blocks(self, hidden, temb, in_span, position_ids, attention_mask, cache=None, rope=None):
        """diff_proj + the modulated flow-head blocks: LLM hidden (B, L, H) -> block outputs (B, L, Dh).

        in_span (B, L, 1) bool marks the image span that adaLN modulates; position_ids (B, L); attention_mask
        additive (B, 1, L, Lk) or a CachedPrefixMask; cache (optional) holds the keys/values of earlier positions per
        head layer; rope (optional): `head_rope(position_ids, dtype)` made once by a caller that runs the same
        positions every step (the T2I step), instead of rebuilt per call.
        """
        x = self.diff_proj(hidden) if hasattr(self, "diff_proj") else hidden  # (B, L, Dh)
        cos, sin = rope if rope is not None else self.head_rope(position_ids, x.dtype)
        for block in self.diffusion_head_a:
            x = block(x, temb, in_span, cos, sin, attention_mask, cache)
        return x

    def flow_head(self, hidden, temb, in_span, position_ids, attention_mask, cache=None, rope=None):
        """LLM hidden (B, L, H) -> final-layer outputs (B, L, p*p*C); arguments as `head_blocks`."""
        x = self.head_blocks(hidden, temb, in_span, position_ids, attention_mask, cache, rope)
        return self.diffusion_head_b(x, temb, in_span)

    def read_velocity(self, head_out: torch.Tensor, image_offsets: torch.Tensor) -> torch.Tensor:
        """Head outputs (B, L, p*p*C) -> velocity (B, C, h, w), using upstream's raster-chunk layout.

        Output token n (time slot dropped) holds p*p consecutive raster positions of the latent grid,
        position-major: v[c, y, x] = out[(y*w + x) // p^2, ((y*w + x) % p^2) * C + c]. It is not patch-aligned
        (upstream unpatchify + forward, modeling_showo2_qwen2_5.py).
        """
        B = head_out.shape[0]
        C, (h, w) = self.config.image_latent_dim, self.config.latent_size
        N = self.config.num_image_tokens
        index = image_offsets[:, None] + 1 + torch.arange(N, device=head_out.device)  # (B, N)
        tokens = head_out.gather(1, index[..., None].expand(-1, -1, head_out.shape[-1]))  # (B, N, p*p*C)
        return tokens.reshape(B, h * w, C).transpose(1, 2).reshape(B, C, h, w)

    def velocity(self, input_ids, image_offsets, modality_positions, attention_mask, latents, t):
        """One full flow-head evaluation, as upstream `forward` at inference (the T2I step).

        input_ids (B, L); image_offsets (B,); modality_positions (B, 1, 2); attention_mask additive (B, 1, L, L);
        latents x_t (B, C, h, w); t (B,) -> velocity (B, C, h, w) in the model dtype.
        """
        temb, time_token = self.time_embedding(t)
        embeds = self.assemble_embeddings(input_ids, image_offsets, time_token, self.embed_image(latents))
        hidden = self.llm_hidden(embeds, attention_mask)
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        offset, length = modality_positions[:, 0, 0, None], modality_positions[:, 0, 1, None]  # (B, 1)
        in_span = ((pos >= offset) & (pos < offset + length))[..., None]  # (B, L, 1)
        head_out = self.flow_head(hidden, temb, in_span, pos[None], attention_mask)
        return self.read_velocity(head_out, image_offsets)
