"""How far each FlashU technique moves the outputs from the unaccelerated baseline (same weights).

    python -m bench.fidelity [--task t2i|vqa] [--checkpoint DIR] [--prompts N]

VQA (`--task vqa`): greedy answers of 16 tokens to built-in questions about the model's own generations; per
technique, position-wise token agreement with the baseline, exact-answer agreement, and the KL divergence
KL(baseline || FlashU) of the first answer token's distribution (the prefill, where token pruning acts).
T2I:

Baseline: the exact prefix-cached step, the official 50 steps, constant guidance 10 (the base scale the default
schedule ends on). Each row turns one technique on (the hybrid full phase of the last 10 calls stays, as in the
defaults), the last row all of them (the paper's defaults). Reported per row: latent MSE, image PSNR (decoded,
[-1, 1] range) against the baseline, and model calls. The last line printed is one JSON object.
"""

import argparse
import json
import math
import os
import tempfile

import torch

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.calibrate import specialize_t2i
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.pipeline import Showo2Pipeline
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise

BASE_GUIDANCE = 10.0
OFF = dict(guidance_schedule=None, ffn_prune_ratio=0.0, layer_skip_ratio=0.0, head_cache_interval=None)
ABLATIONS = {
    "steps 35 + guidance schedule": dict(OFF, num_inference_steps=35,
                                         guidance_schedule=((24, 7.5), (11, BASE_GUIDANCE))),
    "FFN pruning 0.2 (hybrid)": dict(OFF, num_inference_steps=50, ffn_prune_ratio=0.2),
    "layer skipping 0.2 / 10": dict(OFF, num_inference_steps=50, layer_skip_ratio=0.2),
    "head cache 5": dict(OFF, num_inference_steps=50, head_cache_interval=5),
    "all (defaults)": {},
}
DEFAULT_PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle",
                   "a yellow circle and a purple square", "a fox in the snow at sunset", "two red squares"]


def load(checkpoint: str | None) -> tuple[str, Showo2Pipeline]:
    if checkpoint is None:
        from flashu_batch.showo2.tiny import build_tiny_checkpoint

        checkpoint = build_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny"))
    return checkpoint, Showo2Pipeline.from_pretrained(checkpoint)


VQA_ABLATIONS = {
    "FFN pruning 0.2": dict(ffn_prune_ratio=0.2, token_prune_ratio=0.0, layer_skip_ratio=0.0),
    "token pruning 0.25": dict(ffn_prune_ratio=0.0, token_prune_ratio=0.25, token_prune_min_kept=0,
                              layer_skip_ratio=0.0),
    "token pruning 0.5": dict(ffn_prune_ratio=0.0, token_prune_ratio=0.5, token_prune_min_kept=0,
                              layer_skip_ratio=0.0),
    "token pruning 0.75": dict(ffn_prune_ratio=0.0, token_prune_ratio=0.75, token_prune_min_kept=0,
                              layer_skip_ratio=0.0),
    "layer skipping 0.2 / 4": dict(ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.2),
    "defaults": {},
}


def vqa_ablations(model, rows, latents, pad_id: int, answer_tokens: int) -> dict:
    """Per VQA technique: agreement with the baseline's greedy tokens and the first answer token's KL."""
    from flashu_batch.flashu.config import FlashUUnderstandingConfig
    from flashu_batch.flashu.ffn_prune import importance_order, reorder_ffn_
    from flashu_batch.flashu.understanding import UnderstandingSpecialist, calibrate_understanding, understanding_widths
    from flashu_batch.showo2.vqa import greedy_answers

    reorder_ffn_(model, importance_order(calibrate_understanding(model, rows, latents, pad_id)))  # exact
    kwargs = dict(max_new_tokens=answer_tokens, eos_id=-1, pad_id=pad_id, return_logits=True)
    base_ids, base_logits = greedy_answers(model, rows, latents, **kwargs)
    results = {}
    for name, knobs in VQA_ABLATIONS.items():
        config = FlashUUnderstandingConfig(**knobs)
        specialist = UnderstandingSpecialist(model, understanding_widths(model, config), config)
        ids, logits = specialist.greedy_answers(model, rows, latents, **kwargs)
        p = base_logits[:, 0].log_softmax(-1)
        kl = float((p.exp() * (p - logits[:, 0].log_softmax(-1))).sum(-1).mean())
        agree = sum(a == b for x, y in zip(ids, base_ids) for a, b in zip(x, y)) / sum(len(y) for y in base_ids)
        results[name] = dict(token_agreement=round(agree, 4),
                             answer_agreement=round(sum(x == y for x, y in zip(ids, base_ids)) / len(ids), 4),
                             first_token_kl=round(max(kl, 0.0), 6))
    return results


def run_vqa(checkpoint: str | None, num_samples: int, answer_tokens: int = 16) -> dict:
    """A checkpoint with tokenizer and VAE: its own generations of the built-in prompts, built-in questions."""
    from flashu_batch.flashu.calibrate import vqa_calibration_set
    from flashu_batch.flashu.config import FlashUUnderstandingConfig

    checkpoint, pipe = load(checkpoint)
    rows, latents = vqa_calibration_set(pipe, FlashUUnderstandingConfig(calibration_samples=num_samples))
    return dict(checkpoint=os.path.basename(os.path.normpath(checkpoint)), samples=len(rows),
                answer_tokens=answer_tokens,
                ablations=vqa_ablations(pipe.model, rows, latents, pipe.tokens.pad, answer_tokens))


def run_vqa_golden(golden_dir: str, num_samples: int, answer_tokens: int = 16) -> dict:
    """A golden set (no tokenizer): its MMU prompt layout with random question ids, its image plus noise images."""
    import json as _json

    from safetensors.torch import load_file

    from flashu_batch.showo2.layouts import vqa_sequence
    from flashu_batch.showo2.loading import VAE_FILE, load_showo2
    from flashu_batch.showo2.vae import load_vae

    with open(os.path.join(golden_dir, "cases.json")) as f:
        meta = _json.load(f)
    ids = meta["tokenizer"]["showo_token_ids"]
    tokens = type("Tokens", (), dict(bos=ids["bos_id"], boi=ids["boi_id"], eoi=ids["eoi_id"],
                                     img_pad=ids["img_pad_id"], pad=meta["tokenizer"]["pad_id"]))
    model = load_showo2(os.path.join(golden_dir, "checkpoint"))
    vae = load_vae(os.path.join(golden_dir, "checkpoint", VAE_FILE))
    data = load_file(os.path.join(golden_dir, "cases.safetensors"))
    prompt = data["mmu.input_ids"][0].tolist()
    text_a_len = meta["cases"]["mmu"]["settings"]["text_a_length"]
    g = torch.Generator().manual_seed(0)
    n_regular = meta["tokenizer"]["n_regular"]
    rows = [vqa_sequence(torch.randint(0, n_regular, (int(torch.randint(3, 20, (1,), generator=g)),),
                                       generator=g).tolist(), prompt[:text_a_len], prompt[-4:], tokens,
                         model.config.num_image_slots) for _ in range(num_samples)]
    image = data["mmu.image"]
    images = torch.cat([image, (image + 0.3 * torch.randn(num_samples - 1, *image.shape[1:], generator=g))
                        .clamp(-1, 1)])
    with torch.no_grad():
        latents = vae.encode(images)
    return dict(checkpoint=os.path.basename(os.path.normpath(golden_dir)), samples=num_samples,
                answer_tokens=answer_tokens, ablations=vqa_ablations(model, rows, latents, tokens.pad, answer_tokens))


def run(checkpoint: str | None, num_prompts: int) -> dict:
    checkpoint, pipe = load(checkpoint)
    model, c = pipe.model, pipe.model.config
    prompts = (DEFAULT_PROMPTS * 4)[:num_prompts]
    prompt_ids = pipe.encode_prompts(prompts, c.default_max_seq_len, truncate=True)
    seqs = t2i_sequences(prompt_ids, pipe.tokens, c.num_image_slots, c.default_max_seq_len)
    noise = seeded_noise(list(range(len(prompts))), (c.image_latent_dim, *c.latent_size))
    specialize_t2i(model, pipe.tokenizer, pipe.tokens, prompts=prompts)  # reorders in place; exact for the baseline

    with torch.no_grad():
        base = generate_latents(PrefixCachedVelocity(model, seqs, True), noise, num_inference_steps=50,
                                guidance_scale=BASE_GUIDANCE)
        base_pixels = pipe.vae.decode(base)
        rows = {}
        for name, knobs in ABLATIONS.items():
            config = FlashUGenerationConfig(**knobs)
            specialist = GenerationSpecialist(model, pruned_widths(model, config), config)  # already reordered
            latents = generate_latents(specialist.velocity_fn(seqs, True), noise,
                                       num_inference_steps=config.num_inference_steps,
                                       guidance_scale=specialist.guidance_scales(BASE_GUIDANCE))
            mse = float((latents - base).pow(2).mean())
            pixel_mse = float((pipe.vae.decode(latents) - base_pixels).pow(2).mean())
            rows[name] = dict(latent_mse=round(mse, 5), latent_rel_mse=round(mse / float(base.pow(2).mean()), 5),
                              image_psnr_db=round(10 * math.log10(4 / max(pixel_mse, 1e-12)), 2),
                              model_calls=config.num_model_calls)
    return dict(checkpoint=os.path.basename(os.path.normpath(checkpoint)), prompts=len(prompts),
                baseline="50 steps, guidance 10", ablations=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["t2i", "vqa"], default="t2i")
    parser.add_argument("--checkpoint", help="checkpoint folder with VAE and tokenizer (default: tiny random)")
    parser.add_argument("--golden", help="vqa: a golden set folder (its checkpoint, no tokenizer needed)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts (t2i) or image-question samples (vqa)")
    args = parser.parse_args(argv)
    if args.task == "vqa":
        result = run_vqa_golden(args.golden, args.prompts) if args.golden else run_vqa(args.checkpoint, args.prompts)
        print(f"{'technique':<26} {'token agree':>11} {'answer agree':>12} {'first-token KL':>14}")
        for name, row in result["ablations"].items():
            print(f"{name:<26} {row['token_agreement']:>11} {row['answer_agreement']:>12} "
                  f"{row['first_token_kl']:>14}")
        print(json.dumps(result))
        return
    result = run(args.checkpoint, args.prompts)
    print(f"{'technique':<32} {'calls':>5} {'latent MSE':>11} {'rel MSE':>8} {'PSNR dB':>8}")
    for name, row in result["ablations"].items():
        print(f"{name:<32} {row['model_calls']:>5} {row['latent_mse']:>11} {row['latent_rel_mse']:>8} "
              f"{row['image_psnr_db']:>8}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
