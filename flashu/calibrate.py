"""FlashU calibration, in one place: a task's Wanda scores from a loaded model, and the specialist built from them.

Workers (`model.specialization.<task>: on_start`), `flashu-batch specialize`, the specialization report and the
benchmarks all come through here, so a specialist is the same whoever builds it:

    specialist, scores = specialize_t2i(pipe.model, pipe.tokenizer, pipe.tokens)       # T2I: no VAE needed
    specialist, scores = specialize_vqa(pipe)                                         # VQA: images through the VAE
"""

import torch

from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.generation import CALIBRATION_PROMPTS, calibrate_generation, specialize_generation
from flashu_batch.flashu.understanding import calibrate_understanding, specialize_understanding
from flashu_batch.showo2.layouts import t2i_max_text_len, vqa_prompt_ids, vqa_sequence

# Built-in understanding calibration: the model's own generations of the built-in T2I prompts, asked these.
CALIBRATION_QUESTIONS = (
    "What is shown in this picture?",
    "What color is the main object?",
    "How many objects are there in the image?",
    "Describe the scene in one sentence.",
    "Where is the main object located?",
    "Is this a photo or a painting?",
)


def t2i_calibration_ids(model, tokenizer, prompts) -> list[list[int]]:
    """Prompts -> token ids, each cut to the model's prompt limit as the official code cuts long prompts."""
    limit = t2i_max_text_len(model.config.default_max_seq_len, model.config.num_image_slots)
    return [tokenizer(p, add_special_tokens=False)["input_ids"][:limit] for p in prompts]


def calibrate_t2i(model, tokenizer, tokens, config: FlashUGenerationConfig, prompts=None) -> list[torch.Tensor]:
    """Generation Wanda scores (one (ffn,) tensor per layer) on `prompts`, else the config's calibration prompts,
    else the built-in ones."""
    prompts = list(prompts or config.calibration_prompts or CALIBRATION_PROMPTS)
    return calibrate_generation(model, t2i_calibration_ids(model, tokenizer, prompts), tokens, config)


def specialize_t2i(model, tokenizer, tokens, config: FlashUGenerationConfig | None = None, prompts=None):
    """(GenerationSpecialist, scores): calibrate, then reorder the model's FFN neurons in place (exact for the
    baseline) and build the specialist. Deterministic: every actor that runs it gets the same specialist."""
    config = config or FlashUGenerationConfig()
    scores = calibrate_t2i(model, tokenizer, tokens, config, prompts)
    return specialize_generation(model, scores, config), scores


def vqa_calibration_set(pipe, config: FlashUUnderstandingConfig, samples=None):
    """(rows, latents) of the understanding calibration. samples: [(PIL image, question)], or None for the model's
    own generations of the built-in prompts asked the built-in questions."""
    if samples is None:
        n = config.calibration_samples
        prompts = [CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)] for i in range(n)]
        images = []
        for i in range(0, n, 4):
            chunk = prompts[i:i + 4]
            images += pipe.text_to_image(chunk, seeds=[config.calibration_seed + i + j for j in range(len(chunk))],
                                         num_inference_steps=10, guidance_scale=7.5, truncate=True)
        samples = list(zip(images, (CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)] for i in range(n))))
    pixels = torch.stack([pipe.preprocess_image(image, i) for i, (image, _) in enumerate(samples)])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(pipe.device, pipe.dtype)).to(pipe.dtype)
    rows = []
    for _, question in samples:
        text_a, question_ids, role_b = vqa_prompt_ids(pipe.tokenizer, pipe.tokens, question)
        rows.append(vqa_sequence(question_ids, text_a, role_b, pipe.tokens, pipe.model.config.num_image_slots))
    return rows, latents


def calibrate_vqa(pipe, config: FlashUUnderstandingConfig, samples=None) -> tuple[list[torch.Tensor], int]:
    """(understanding Wanda scores, number of calibration samples)."""
    rows, latents = vqa_calibration_set(pipe, config, samples)
    return calibrate_understanding(pipe.model, rows, latents, pipe.tokens.pad), len(rows)


def specialize_vqa(pipe, config: FlashUUnderstandingConfig | None = None, samples=None):
    """(UnderstandingSpecialist, scores), as specialize_t2i for understanding."""
    config = config or FlashUUnderstandingConfig()
    scores, _ = calibrate_vqa(pipe, config, samples)
    return specialize_understanding(pipe.model, scores, config), scores
