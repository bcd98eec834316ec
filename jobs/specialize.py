"""`flashu-batch specialize`: calibrate once, save what workers need (see flashu/artifact.py)."""

import json
import os
import time

# Built-in understanding calibration: the model's own generations of the built-in T2I prompts, asked these.
CALIBRATION_QUESTIONS = (
    "What is shown in this picture?",
    "What color is the main object?",
    "How many objects are there in the image?",
    "Describe the scene in one sentence.",
    "Where is the main object located?",
    "Is this a photo or a painting?",
)


def read_config(path: str | None, task: str = "t2i"):
    from flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig

    cls = FlashUGenerationConfig if task == "t2i" else FlashUUnderstandingConfig
    if path is None:
        return cls()
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read the FlashU config {path!r}: {e}") from e
    return cls.from_dict(raw)


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path!r} is empty.")
    return lines


def run_specialize(task: str, checkpoint: str, out: str, config_path: str | None = None,
                   prompts_path: str | None = None, tokenizer_path: str | None = None, dtype: str = "float32",
                   device: str = "cpu", vae_path: str | None = None) -> dict:
    """Calibrate `task` ("t2i" or "vqa") on the checkpoint and write the artifact to `out`.

    prompts_path: t2i, one prompt per line; vqa, JSON lines {"image": path, "question": text}. Default: built-in.
    """
    if task not in ("t2i", "vqa"):
        raise ValueError(f"--task must be 't2i' or 'vqa', got {task!r}.")
    import torch

    from flashu.artifact import checkpoint_fingerprint, save_artifact
    from flashu.ffn_prune import importance_order
    from showo2.loading import local_folder

    config = read_config(config_path, task)
    folder = local_folder(checkpoint)
    start = time.perf_counter()
    if task == "t2i":
        from flashu.generation import specialize_generation as specialize

        model, scores, samples = calibrate_t2i(folder, config, prompts_path, tokenizer_path, getattr(torch, dtype),
                                               device)
    else:
        from flashu.understanding import specialize_understanding as specialize

        model, scores, samples = calibrate_vqa(folder, config, prompts_path, tokenizer_path, vae_path,
                                               getattr(torch, dtype), device)
    orders = importance_order(scores)
    specialist = specialize(model, scores, config)
    seconds = time.perf_counter() - start
    data_file = os.path.basename(prompts_path) if prompts_path else None
    if task == "t2i":
        calibration = dict(prompts=samples, prompts_file=data_file, steps=config.calibration_steps,
                           guidance=config.calibration_guidance, seed=config.calibration_seed)
    else:
        calibration = dict(samples=samples, data_file=data_file, seed=config.calibration_seed)
    calibration.update(dtype=dtype, seconds=round(seconds, 2))
    save_artifact(out, task, orders, config, specialist.ffn_widths, checkpoint_fingerprint(folder), calibration)
    return dict(out=out, ffn_widths=list(specialist.ffn_widths), **calibration)


def calibrate_t2i(folder, config, prompts_path, tokenizer_path, dtype, device):
    from flashu.generation import CALIBRATION_PROMPTS, calibrate_generation
    from showo2.loading import load_showo2
    from showo2.tokenizer import SpecialTokens, load_tokenizer

    prompts = read_lines(prompts_path) if prompts_path else list(config.calibration_prompts or CALIBRATION_PROMPTS)
    tokenizer = load_tokenizer(tokenizer_path or folder)
    model = load_showo2(folder, dtype=dtype, device=device)
    max_text_len = model.config.default_max_seq_len - model.config.num_image_slots - 4
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][:max_text_len] for p in prompts]
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    return model, calibrate_generation(model, prompt_ids, tokens, config), len(prompts)


def vqa_calibration_set(pipe, config, data_path):
    """(rows, latents) of the understanding calibration: a JSONL set, or the model's own generations of the
    built-in prompts asked the built-in questions."""
    import torch
    from PIL import Image

    from flashu.generation import CALIBRATION_PROMPTS
    from showo2.layouts import vqa_prompt_ids, vqa_sequence

    if data_path:
        samples = [json.loads(line) for line in read_lines(data_path)]
        base = os.path.dirname(os.path.abspath(data_path))
        try:
            images = [Image.open(os.path.join(base, s["image"])).convert("RGB") for s in samples]
            questions = [str(s["question"]) for s in samples]
        except (OSError, KeyError, TypeError) as e:
            raise ValueError(f"{data_path!r}: every line must be {{\"image\": path, \"question\": text}} with a "
                             f"readable image: {e}") from e
    else:
        n = config.calibration_samples
        prompts = [CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)] for i in range(n)]
        images = []
        for i in range(0, n, 4):
            chunk = prompts[i:i + 4]
            images += pipe.text_to_image(chunk, seeds=[config.calibration_seed + i + j for j in range(len(chunk))],
                                         num_inference_steps=10, guidance_scale=7.5, truncate=True)
        questions = [CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)] for i in range(n)]
    pixels = torch.stack([pipe.preprocess_image(im, i) for i, im in enumerate(images)])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(pipe.device, pipe.dtype)).to(pipe.dtype)
    rows = []
    for question in questions:
        text_a, question_ids, role_b = vqa_prompt_ids(pipe.tokenizer, pipe.tokens, question)
        rows.append(vqa_sequence(question_ids, text_a, role_b, pipe.tokens, pipe.model.config.num_image_slots))
    return rows, latents


def calibrate_vqa(folder, config, data_path, tokenizer_path, vae_path, dtype, device):
    from flashu.understanding import calibrate_understanding
    from showo2.pipeline import Showo2Pipeline

    pipe = Showo2Pipeline.from_pretrained(folder, dtype=dtype, device=device, vae_path=vae_path,
                                          tokenizer_path=tokenizer_path)
    rows, latents = vqa_calibration_set(pipe, config, data_path)
    return pipe.model, calibrate_understanding(pipe.model, rows, latents, pipe.tokens.pad), len(rows)


def run_report(checkpoint: str, out: str, tokenizer_path: str | None = None, vae_path: str | None = None,
               dtype: str = "float32", device: str = "cpu") -> dict:
    """Write report.json / report.png: generation vs understanding neurons and layers (flashu/report.py)."""
    import torch

    from flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
    from flashu.generation import CALIBRATION_PROMPTS, calibrate_generation
    from flashu.report import layer_importance_by_hooks, write_report
    from flashu.understanding import calibrate_understanding
    from showo2.layouts import t2i_sequences
    from showo2.loading import local_folder
    from showo2.pipeline import Showo2Pipeline
    from showo2.prefix_cache import PrefixCachedVelocity
    from showo2.t2i import seeded_noise
    from showo2.vqa import greedy_answers

    folder = local_folder(checkpoint)
    pipe = Showo2Pipeline.from_pretrained(folder, dtype=getattr(torch, dtype), device=device, vae_path=vae_path,
                                          tokenizer_path=tokenizer_path)
    model, c = pipe.model, pipe.model.config
    gen_config, und_config = FlashUGenerationConfig(), FlashUUnderstandingConfig()
    prompt_ids = pipe.encode_prompts(list(CALIBRATION_PROMPTS), c.default_max_seq_len, truncate=True)
    gen_scores = calibrate_generation(model, prompt_ids, pipe.tokens, gen_config)
    rows, latents = vqa_calibration_set(pipe, und_config, None)
    und_scores = calibrate_understanding(model, rows, latents, pipe.tokens.pad)

    seqs = t2i_sequences(prompt_ids[:4], pipe.tokens, c.num_image_slots, c.default_max_seq_len)
    step = PrefixCachedVelocity(model, seqs, use_cfg=True)  # the prefix fill runs here, outside the hooks
    x = seeded_noise(list(range(4)), (c.image_latent_dim, *c.latent_size)).to(pipe.device) * 0.5
    with torch.no_grad():
        gen_importance = layer_importance_by_hooks(model, lambda: step(x, torch.full((4,), 0.5, device=x.device)),
                                                   last_token_only=False)
        und_importance = layer_importance_by_hooks(
            model, lambda: greedy_answers(model, rows[:8], latents[:8], max_new_tokens=1, eos_id=-1,
                                          pad_id=pipe.tokens.pad), last_token_only=True)
    return write_report(out, gen_scores, und_scores, gen_importance, und_importance, gen_config.ffn_prune_ratio,
                        gen_config.ffn_width_multiple, os.path.basename(os.path.normpath(checkpoint)))


def specialize_pipeline(pipe, task: str):
    """Calibrate a loaded pipeline's model in place for `task` with the default knobs and the built-in calibration
    set -> the specialist (what `model.specialization.<task>: on_start` runs in each worker)."""
    from flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig

    if task == "t2i":
        from flashu.generation import CALIBRATION_PROMPTS, calibrate_generation, specialize_generation

        config = FlashUGenerationConfig()
        prompt_ids = pipe.encode_prompts(list(CALIBRATION_PROMPTS), pipe.model.config.default_max_seq_len,
                                         truncate=True)
        return specialize_generation(pipe.model, calibrate_generation(pipe.model, prompt_ids, pipe.tokens, config),
                                     config)
    from flashu.understanding import calibrate_understanding, specialize_understanding

    config = FlashUUnderstandingConfig()
    rows, latents = vqa_calibration_set(pipe, config, None)
    return specialize_understanding(pipe.model, calibrate_understanding(pipe.model, rows, latents, pipe.tokens.pad),
                                    config)
