"""`flashu-batch specialize`: calibrate once (flashu/calibrate.py), save what workers need (flashu/artifact.py)."""

import json
import os
import time


def read_config(path: str | None, task: str = "t2i"):
    from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig

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

    from flashu_batch.flashu.artifact import checkpoint_file_sizes, checkpoint_fingerprint, save_artifact
    from flashu_batch.flashu.calibrate import specialize_t2i, specialize_vqa
    from flashu_batch.flashu.ffn_prune import importance_order
    from flashu_batch.jobs.fetch import model_folder

    config = read_config(config_path, task)
    folder = model_folder(checkpoint)
    start = time.perf_counter()
    if task == "t2i":
        from flashu_batch.flashu.generation import CALIBRATION_PROMPTS
        from flashu_batch.showo2.loading import load_showo2
        from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer

        prompts = read_lines(prompts_path) if prompts_path else list(config.calibration_prompts or CALIBRATION_PROMPTS)
        tokenizer = load_tokenizer(tokenizer_path or folder)
        model = load_showo2(folder, dtype=getattr(torch, dtype), device=device)  # T2I calibration needs no VAE
        specialist, scores = specialize_t2i(model, tokenizer, SpecialTokens.from_tokenizer(tokenizer), config,
                                            prompts)
        samples = len(prompts)
    else:
        from flashu_batch.showo2.pipeline import Showo2Pipeline

        pipe = Showo2Pipeline.from_pretrained(folder, dtype=getattr(torch, dtype), device=device, vae_path=vae_path,
                                              tokenizer_path=tokenizer_path)
        data = read_vqa_samples(prompts_path) if prompts_path else None
        specialist, scores = specialize_vqa(pipe, config, data)
        samples = len(data) if data else config.calibration_samples
    orders = importance_order(scores)
    seconds = time.perf_counter() - start
    data_file = os.path.basename(prompts_path) if prompts_path else None
    if task == "t2i":
        calibration = dict(prompts=samples, prompts_file=data_file, steps=config.calibration_steps,
                           guidance=config.calibration_guidance, seed=config.calibration_seed)
    else:
        calibration = dict(samples=samples, data_file=data_file, seed=config.calibration_seed)
    calibration.update(dtype=dtype, seconds=round(seconds, 2))
    save_artifact(out, task, orders, config, specialist.ffn_widths, checkpoint_fingerprint(folder), calibration,
                  checkpoint_file_sizes(folder))
    return dict(out=out, ffn_widths=list(specialist.ffn_widths), **calibration)


def read_vqa_samples(data_path: str) -> list:
    """A JSONL calibration set, {"image": path relative to the file, "question": text} a line -> [(image, question)]."""
    from PIL import Image

    samples = [json.loads(line) for line in read_lines(data_path)]
    base = os.path.dirname(os.path.abspath(data_path))
    try:
        return [(Image.open(os.path.join(base, s["image"])).convert("RGB"), str(s["question"])) for s in samples]
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f"{data_path!r}: every line must be {{\"image\": path, \"question\": text}} with a "
                         f"readable image: {e}") from e


def run_report(checkpoint: str, out: str, tokenizer_path: str | None = None, vae_path: str | None = None,
               dtype: str = "float32", device: str = "cpu") -> dict:
    """Write report.json / report.png: generation vs understanding neurons and layers (flashu/report.py)."""
    import torch

    from flashu_batch.flashu.calibrate import calibrate_t2i, t2i_calibration_ids, vqa_calibration_set
    from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
    from flashu_batch.flashu.generation import CALIBRATION_PROMPTS
    from flashu_batch.flashu.report import layer_importance_by_hooks, write_report
    from flashu_batch.flashu.understanding import calibrate_understanding
    from flashu_batch.jobs.fetch import model_folder
    from flashu_batch.showo2.layouts import t2i_sequences
    from flashu_batch.showo2.pipeline import Showo2Pipeline
    from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
    from flashu_batch.showo2.t2i import seeded_noise
    from flashu_batch.showo2.vqa import greedy_answers

    folder = model_folder(checkpoint)
    pipe = Showo2Pipeline.from_pretrained(folder, dtype=getattr(torch, dtype), device=device, vae_path=vae_path,
                                          tokenizer_path=tokenizer_path)
    model, c = pipe.model, pipe.model.config
    gen_config, und_config = FlashUGenerationConfig(), FlashUUnderstandingConfig()
    gen_scores = calibrate_t2i(model, pipe.tokenizer, pipe.tokens, gen_config)
    rows, latents = vqa_calibration_set(pipe, und_config)
    und_scores = calibrate_understanding(model, rows, latents, pipe.tokens.pad)
    prompt_ids = t2i_calibration_ids(model, pipe.tokenizer, CALIBRATION_PROMPTS)

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
