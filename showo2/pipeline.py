"""The Show-o2 pipeline: prompts in, images out; images and questions in, answers out.

It owns the model, the VAE and the tokenizer, validates every input before any model work (a clear ValueError,
never a shape error from inside torch), and runs the task loops of `t2i` and `vqa`.
"""

import math
import numbers
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image

from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.layouts import VQALayout, t2i_max_text_len, t2i_sequences, vqa_prompt_ids, vqa_sequence
from flashu_batch.showo2.hub import HubError, resolve_checkpoint, resolve_tokenizer, resolve_vae
from flashu_batch.showo2.image_input import resize_center_crop
from flashu_batch.showo2.loading import VAE_FILE, load_showo2
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer
from flashu_batch.showo2.vae import WanVAE, load_vae
from flashu_batch.showo2.vqa import NucleusSampler, greedy_answers

MAX_MEMO_TEXTS = 4096  # distinct captions remembered by Showo2Pipeline.text_ids (a few batches' worth)


@dataclass
class Showo2Pipeline:
    model: Showo2
    vae: WanVAE
    tokenizer: object  # a transformers tokenizer with the Show-o2 special tokens
    tokens: SpecialTokens
    # caption text (or ("vqa", question, layout)) -> its token ids, so a caller that checks a prompt's length and
    # then runs it tokenizes it once (the workers); bounded by MAX_MEMO_TEXTS
    tokenized_memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        vae_path: str | None = None, tokenizer_path: str | None = None) -> "Showo2Pipeline":
        """Load from a local checkpoint folder (official layout; see showo2/loading.py) or a Hugging Face Hub model
        (`org/name`, `org/name@revision`, `hf://org/name[@revision]`; see showo2/hub.py for the syntax and caching).

        The VAE is vae_path (a local file or `hf://org/name[@revision]/file.pth`), else the checkpoint's own
        Wan2.1_VAE.pth, else the official one from Wan-AI/Wan2.1-T2V-14B. The tokenizer is tokenizer_path (a local
        folder or a Hub id), else the checkpoint's own (the folder or its tokenizer/), else the Qwen2.5 instruct
        tokenizer of the model's size (Qwen/Qwen2.5-1.5B-Instruct or -7B-Instruct). Official releases ship neither,
        so they load with the defaults.
        """
        try:
            checkpoint = resolve_checkpoint(path)
            # the model first: a bad checkpoint fails before a default VAE or tokenizer is downloaded for it
            model = load_showo2(checkpoint.path, dtype=dtype, device=device)
            vae = resolve_vae(vae_path, checkpoint)
            tokenizer_source = resolve_tokenizer(tokenizer_path, checkpoint)
        except HubError as e:
            raise CheckpointError(str(e)) from None
        if not os.path.isfile(vae.path):
            raise CheckpointError(f"No VAE at {vae.path!r}: pass vae_path= pointing at {VAE_FILE}.")
        if tokenizer_source is None:
            raise CheckpointError(f"No tokenizer in {checkpoint.path!r}, and no default one for a model of hidden size "
                                  f"{model.config.hidden_size}: pass tokenizer_path= pointing at a Qwen2.5 folder.")
        tokenizer = load_tokenizer(tokenizer_source.path)
        if len(tokenizer) != model.config.llm_vocab_size:
            raise CheckpointError(f"Tokenizer at {tokenizer_source.source!r} has {len(tokenizer)} tokens, the model's "
                                  f"vocabulary has {model.config.llm_vocab_size}.")
        return cls(model, load_vae(vae.path, dtype=dtype, device=device), tokenizer,
                   SpecialTokens.from_tokenizer(tokenizer))

    @property
    def device(self) -> torch.device:
        return self.model.showo.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.showo.model.embed_tokens.weight.dtype

    @property
    def resolution(self) -> int:
        """Image side in pixels the model works at (VAE x8, patch x2)."""
        return self.model.config.resolution

    # ---- text to image ----------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], max_seq_len: int, truncate: bool) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}.")
        return [self.caption_ids(prompt, f"prompt {i}", max_seq_len, truncate) for i, prompt in enumerate(prompts)]

    def encode_negative_prompts(self, negative_prompt, num_prompts: int, max_seq_len: int,
                                truncate: bool) -> list[list[int]] | None:
        """negative_prompt: None (the official empty caption), one string for every prompt, or one string or None
        per prompt -> the uncond captions' ids (None when there is no negative prompt at all). '' is the empty
        caption; a negative prompt obeys the prompt's token limit."""
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, (list, tuple)) or len(negatives) != num_prompts or \
                not all(n is None or isinstance(n, str) for n in negatives):
            raise ValueError(f"negative_prompt must be None, a string, or one string (or None) per prompt "
                             f"({num_prompts}), got {negative_prompt!r}.")
        return [self.caption_ids(n or "", f"negative prompt {i}", max_seq_len, truncate)
                for i, n in enumerate(negatives)]

    def caption_ids(self, text: str, what: str, max_seq_len: int, truncate: bool) -> list[int]:
        """A T2I caption's token ids (raw text, no special tokens, as upstream); over the token limit it is an error
        unless truncate (t2i_sequences then cuts it)."""
        max_text_len = t2i_max_text_len(max_seq_len, self.model.config.num_image_slots)
        ids = self.text_ids(text) if text else []
        if len(ids) > max_text_len and not truncate:
            raise ValueError(f"{what} has {len(ids)} tokens; at most {max_text_len} fit a {max_seq_len}-token "
                             f"sequence. Shorten it, or pass truncate=True to cut it as the official code does.")
        return ids

    def text_ids(self, text: str) -> list[int]:
        """Raw-text token ids (no special tokens, as upstream's captions), tokenized once per text (memoised)."""
        return list(self.memoised(text, lambda: tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])))

    def vqa_prompt_ids(self, question: str, layout: VQALayout) -> tuple[list, list, list]:
        """`layouts.vqa_prompt_ids` for this tokenizer, tokenized once per (question, layout) (memoised)."""
        pieces = self.memoised(("vqa", question, layout), lambda: tuple(
            tuple(ids) for ids in vqa_prompt_ids(self.tokenizer, self.tokens, question, layout)))
        return tuple(list(ids) for ids in pieces)

    def memoised(self, key, tokenize):
        value = self.tokenized_memo.get(key)
        if value is None:
            if len(self.tokenized_memo) >= MAX_MEMO_TEXTS:
                self.tokenized_memo.clear()
            value = self.tokenized_memo[key] = tokenize()
        return value

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], *, seeds: list[int] | None = None, num_inference_steps: int = 50,
                      guidance_scale: float | list[float] = 7.5, time_shift: float = 3.0,
                      max_seq_len: int | None = None, truncate: bool = False, output_type: str = "pil",
                      velocity_factory=None, negative_prompt: str | list[str | None] | None = None):
        """Generate one image per prompt.

        seeds: one per prompt (default 0, 1, ...); a row's image depends only on its prompt, negative prompt and seed.
        guidance_scale: a constant, or one value per model call (num_inference_steps - 1).
        negative_prompt: the caption of the unconditional guidance branch instead of the official empty one: one
        string for all prompts, or one string (or None: the empty caption) per prompt. Needs guidance.
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
        negative_ids = self.encode_negative_prompts(negative_prompt, len(prompt_ids), max_seq_len, truncate)
        if negative_ids is not None and any(negative_ids) and not use_cfg:
            raise ValueError(f"negative_prompt was given with guidance_scale {guidance_scale!r}, which runs no "
                             f"unconditional branch for it to act through; set guidance_scale > 0.")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                 for s in seeds):
            raise ValueError(f"seeds must be {len(prompts)} integers (one per prompt), got {seeds!r}.")

        # 2. Build the CFG sequences and the initial noise
        seqs = t2i_sequences(prompt_ids, self.tokens, self.model.config.num_image_slots, max_seq_len,
                             with_uncond=use_cfg, negative_ids=negative_ids)
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
        """PIL RGB image (any size: `image_input.resize_center_crop` to the model resolution R, as inference_mmu.py)
        or a tensor (3, R, R) in [-1, 1] (e.g. `normalize_pixels` of pixels resized once elsewhere) -> (3, R, R)
        float32."""
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
        return normalize_pixels(resize_center_crop(image, R))

    @torch.no_grad()
    def answer(self, images: list, questions: list[str], *, max_new_tokens: int = 300,
               layout: VQALayout = "demo", decode_fn=None, temperature: float = 0.0, top_p: float = 1.0,
               seeds: list[int] | None = None) -> list[str]:
        """Answers, one per (image, question) pair (images: PIL RGB or (3, R, R) tensors, see
        `preprocess_image`). layout: "demo" (the official inference script) or
        "training" (the layout the model was trained on); see showo2/layouts.py. decode_fn replaces
        `showo2.vqa.greedy_answers` (same signature; where a FlashU specialist plugs in).

        temperature 0 (the default): greedy decoding, the official behaviour. temperature > 0: sampling from
        softmax(logits / temperature) within the top_p nucleus, each row from its own generator seeded by its seed
        (seeds: one per pair, default 0, 1, ...), so a row's answer does not depend on the rest of the batch.
        """
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
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}.")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}.")
        seeds = list(range(len(images))) if seeds is None else list(seeds)
        if len(seeds) != len(images) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                and s >= 0 for s in seeds):
            raise ValueError(f"seeds must be {len(images)} integers >= 0 (one per image), got {seeds!r}.")
        pixels = torch.stack([self.preprocess_image(im, i) for i, im in enumerate(images)])

        # 2. Encode the images once (posterior mean: reproducible, see design note 6.3)
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).to(self.dtype)  # (B, C, h, w)

        # 3. Prompts of any lengths in one batch, prefill + KV-cached greedy decoding
        rows = []
        for question in questions:
            text_a, question_ids, role_b = self.vqa_prompt_ids(question, layout)
            rows.append(vqa_sequence(question_ids, text_a, role_b, self.tokens, self.model.config.num_image_slots,
                                     layout))
        sampling = {}  # greedy: the decode function is called exactly as before sampling existed
        if temperature > 0:
            generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
            sampling = dict(sampler=NucleusSampler(float(temperature), float(top_p), generators))
        answer_ids = (decode_fn or greedy_answers)(self.model, rows, latents, max_new_tokens=max_new_tokens,
                                                   eos_id=self.tokens.eos, pad_id=self.tokens.pad, **sampling)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids]


def normalize_pixels(pixels: np.ndarray) -> torch.Tensor:
    """Model-ready pixels (R, R, 3) uint8 RGB (`image_input.resize_center_crop`) -> (3, R, R) float32 in [-1, 1], as
    upstream's ToTensor + Normalize(0.5, 0.5)."""
    image = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 255.0  # (3, R, R) in [0, 1]
    return (image - 0.5) / 0.5


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB images, as upstream denorm: clamp((x + 1) / 2) * 255."""
    arrays = ((pixels.float() + 1) / 2).clamp(0, 1).mul(255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
