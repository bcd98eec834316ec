"""The Show-o2 pipeline: prompts in, images out; images and questions in, answers out.

It owns the model, the VAE and the tokenizer, validates every input before any model work (a clear ValueError,
never a shape error from inside torch), and runs the task loops of `t2i` and `vqa`.
"""

import math
import numbers
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image

from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.layouts import VQALayout, t2i_max_text_len, t2i_sequences, vqa_prompt_ids, vqa_sequence
from flashu_batch.showo2.loading import VAE_FILE, load_showo2, local_folder
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer
from flashu_batch.showo2.vae import WanVAE, load_vae
from flashu_batch.showo2.vqa import greedy_answers


@dataclass
class Showo2Pipeline:
    model: Showo2
    vae: WanVAE
    tokenizer: object  # a transformers tokenizer with the Show-o2 special tokens
    tokens: SpecialTokens

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        vae_path: str | None = None, tokenizer_path: str | None = None) -> "Showo2Pipeline":
        """Load from a local checkpoint folder (official layout; see showo2/loading.py).

        The VAE defaults to `<path>/Wan2.1_VAE.pth` and the tokenizer to the folder itself (or `<path>/tokenizer`);
        official releases ship neither, so point vae_path / tokenizer_path at the Wan2.1 VAE file and a local
        Qwen2.5-Instruct folder.
        """
        folder = local_folder(path)
        model = load_showo2(folder, dtype=dtype, device=device)
        vae_file = vae_path or os.path.join(folder, VAE_FILE)
        if not os.path.isfile(vae_file):
            raise CheckpointError(f"No VAE at {vae_file!r}: pass vae_path= pointing at {VAE_FILE}.")
        vae = load_vae(vae_file, dtype=dtype, device=device)
        tokenizer_folder = tokenizer_path or next(
            (p for p in (folder, os.path.join(folder, "tokenizer")) if os.path.isfile(os.path.join(p, "tokenizer.json"))
             or os.path.isfile(os.path.join(p, "tokenizer_config.json"))), None)
        if tokenizer_folder is None:
            raise CheckpointError(f"No tokenizer in {folder!r}: pass tokenizer_path= pointing at a Qwen2.5 folder.")
        tokenizer = load_tokenizer(tokenizer_folder)
        if len(tokenizer) != model.config.llm_vocab_size:
            raise CheckpointError(f"Tokenizer at {tokenizer_folder!r} has {len(tokenizer)} tokens, the model's "
                                  f"vocabulary has {model.config.llm_vocab_size}.")
        return cls(model, vae, tokenizer, SpecialTokens.from_tokenizer(tokenizer))

    @property
    def device(self) -> torch.device:
        return self.model.showo.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.showo.model.embed_tokens.weight.dtype

    @property
    def resolution(self) -> int:
        """Image side in pixels the model works at (VAE x8, patch x2)."""
        return self.model.config.latent_size[0] * 8

    # ---- text to image ----------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], max_seq_len: int, truncate: bool) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
        max_text_len = t2i_max_text_len(max_seq_len, self.model.config.num_image_slots)
        prompt_ids = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}.")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > max_text_len and not truncate:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; at most {max_text_len} fit a {max_seq_len}-token "
                                 f"sequence. Shorten it, or pass truncate=True to cut it as the official code does.")
            prompt_ids.append(ids)
        return prompt_ids

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], *, seeds: list[int] | None = None, num_inference_steps: int = 50,
                      guidance_scale: float | list[float] = 7.5, time_shift: float = 3.0,
                      max_seq_len: int | None = None, truncate: bool = False, output_type: str = "pil",
                      velocity_factory=None):
        """Generate one image per prompt.

        seeds: one per prompt (default 0, 1, ...); a row's image depends only on its prompt and seed.
        guidance_scale: a constant, or one value per model call (num_inference_steps - 1).
        output_type: "pil" (list of PIL images), "pt" (B, 3, H, W) float in [-1, 1], or "latent" (B, C, h, w).
        velocity_factory: `(sequences, use_cfg) -> velocity_fn` replacing the exact prefix-cached step (this is
        where a FlashU specialist plugs in; see flashu/generation.py).
        """
        # 1. Check inputs. Raise error if not correct
        if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be an integer >= 2, got {num_inference_steps!r}.")
        is_schedule = isinstance(guidance_scale, (list, tuple))
        scales = list(guidance_scale) if is_schedule else [guidance_scale]
        if not all(isinstance(g, (int, float)) and math.isfinite(g) and g >= 0 for g in scales) or \
                (is_schedule and len(scales) != num_inference_steps - 1):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (0 disables guidance), or one such "
                             f"number per model call ({num_inference_steps - 1}), got {guidance_scale!r}.")
        use_cfg = any(g > 0 for g in scales)
        if not isinstance(time_shift, (int, float)) or not math.isfinite(time_shift) or time_shift <= 0:
            raise ValueError(f"time_shift must be a finite number > 0, got {time_shift!r}.")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}.")
        max_seq_len = max_seq_len or self.model.config.default_max_seq_len
        prompt_ids = self.encode_prompts(prompts, max_seq_len, truncate)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                 for s in seeds):
            raise ValueError(f"seeds must be {len(prompts)} integers (one per prompt), got {seeds!r}.")

        # 2. Build the CFG sequences and the initial noise
        seqs = t2i_sequences(prompt_ids, self.tokens, self.model.config.num_image_slots, max_seq_len,
                             with_uncond=use_cfg)
        c = self.model.config
        noise = seeded_noise([int(s) for s in seeds], (c.image_latent_dim, *c.latent_size))

        # 3. Denoising loop
        velocity_fn = (velocity_factory or partial(PrefixCachedVelocity, self.model))(seqs, use_cfg)
        latents = generate_latents(velocity_fn, noise.to(self.device),
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   time_shift=time_shift, model_dtype=self.dtype)
        if output_type == "latent":
            return latents

        # 4. Decode
        pixels = self.vae.decode(latents.to(self.dtype)).float()  # (B, 3, H, W) in [-1, 1]
        return pixels if output_type == "pt" else to_pil(pixels)

    # ---- visual question answering ----------------------------------------------------------------------------

    def preprocess_image(self, image, index: int = 0) -> torch.Tensor:
        """PIL RGB image (any size: shorter side resized bicubic, then centre crop, as inference_mmu.py) or a
        tensor (3, R, R) in [-1, 1] at the model resolution R -> (3, R, R) float32."""
        R = self.resolution
        if isinstance(image, torch.Tensor):
            if image.shape != (3, R, R) or not image.is_floating_point():
                raise ValueError(f"image {index}: a tensor must be float (3, {R}, {R}) in [-1, 1], "
                                 f"got {image.dtype} {tuple(image.shape)}.")
            return image.float()
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {index} must be a PIL image or a tensor, got {type(image).__name__}.")
        if image.mode != "RGB":
            raise ValueError(f"image {index} has mode {image.mode!r}; convert it to 'RGB' first "
                             f"(image.convert('RGB')).")
        w, h = image.size
        # torchvision Resize(R), as upstream: shorter side to R, the longer one scaled and truncated
        size = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
        image = image.resize(size, Image.BICUBIC)
        w, h = image.size
        left, top = int(round((w - R) / 2.0)), int(round((h - R) / 2.0))
        image = image.crop((left, top, left + R, top + R))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0  # (3, R, R)
        return (pixels - 0.5) / 0.5

    @torch.no_grad()
    def answer(self, images: list, questions: list[str], *, max_new_tokens: int = 300,
               layout: VQALayout = "demo", decode_fn=None) -> list[str]:
        """Greedy answers, one per (image, question) pair. layout: "demo" (the official inference script) or
        "training" (the layout the model was trained on); see showo2/layouts.py. decode_fn replaces
        `showo2.vqa.greedy_answers` (same signature; where a FlashU specialist plugs in)."""
        # 1. Check inputs. Raise error if not correct
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list.")
        if not isinstance(questions, (list, tuple)) or len(questions) != len(images):
            raise ValueError(f"questions must be a list with one question per image ({len(images)}).")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} must be a non-empty string, got {q!r}.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        if layout not in ("demo", "training"):
            raise ValueError(f"layout must be 'demo' or 'training', got {layout!r}.")
        pixels = torch.stack([self.preprocess_image(im, i) for i, im in enumerate(images)])

        # 2. Encode the images once (posterior mean: reproducible, see design note 6.3)
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).to(self.dtype)  # (B, C, h, w)

        # 3. Prompts of any lengths in one batch, prefill + KV-cached greedy decoding
        rows = []
        for question in questions:
            text_a, question_ids, role_b = vqa_prompt_ids(self.tokenizer, self.tokens, question, layout)
            rows.append(vqa_sequence(question_ids, text_a, role_b, self.tokens, self.model.config.num_image_slots,
                                     layout))
        answer_ids = (decode_fn or greedy_answers)(self.model, rows, latents, max_new_tokens=max_new_tokens,
                                                   eos_id=self.tokens.eos, pad_id=self.tokens.pad)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB images, as upstream denorm: clamp((x + 1) / 2) * 255."""
    arrays = ((pixels.float() + 1) / 2).clamp(0, 1).mul(255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
