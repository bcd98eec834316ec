"""`flashu-batch specialize`: calibrate once, save what workers need (see flashu/artifact.py)."""

import json
import os
import time


def read_config(path: str | None):
    from flashu.config import FlashUGenerationConfig

    if path is None:
        return FlashUGenerationConfig()
    with open(path) as f:
        return FlashUGenerationConfig.from_dict(json.load(f))


def run_specialize(task: str, checkpoint: str, out: str, config_path: str | None = None,
                   prompts_path: str | None = None, tokenizer_path: str | None = None, dtype: str = "float32",
                   device: str = "cpu") -> dict:
    if task != "t2i":
        raise ValueError(f"--task {task}: only 't2i' specialization exists so far.")
    import torch

    from flashu.artifact import checkpoint_fingerprint, save_generation_artifact
    from flashu.ffn_prune import importance_order
    from flashu.generation import CALIBRATION_PROMPTS, calibrate_generation, specialize_generation
    from showo2.loading import load_showo2, local_folder
    from showo2.tokenizer import SpecialTokens, load_tokenizer

    config = read_config(config_path)
    if prompts_path:
        with open(prompts_path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{prompts_path!r} has no prompts (one per line).")
    else:
        prompts = list(config.calibration_prompts or CALIBRATION_PROMPTS)
    folder = local_folder(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path or folder)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    model = load_showo2(folder, dtype=getattr(torch, dtype), device=device)
    max_text_len = model.config.default_max_seq_len - model.config.num_image_slots - 4
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][:max_text_len] for p in prompts]

    start = time.perf_counter()
    scores = calibrate_generation(model, prompt_ids, tokens, config)
    orders = importance_order(scores)
    specialist = specialize_generation(model, scores, config)
    seconds = time.perf_counter() - start
    calibration = dict(prompts=len(prompts), steps=config.calibration_steps, guidance=config.calibration_guidance,
                       seed=config.calibration_seed, dtype=dtype, seconds=round(seconds, 2),
                       prompts_file=os.path.basename(prompts_path) if prompts_path else None)
    save_generation_artifact(out, orders, specialist, checkpoint_fingerprint(folder), calibration)
    return dict(out=out, ffn_widths=list(specialist.ffn_widths), **calibration)
