"""FLOPs per image (T2I) and per answer (VQA): the official code's loops vs our baseline.

Counted by running the real modules on the meta device under torch's FlopCounterMode: no weights, no compute,
the exact matmul/attention shapes of each path (2 FLOPs per multiply-add; attention counted as dense).

    python -m bench.flops --task t2i --model 1.5b
    python -m bench.flops --task vqa --model 7b

The last line printed is one JSON object (the contract other tools read).
"""

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.layer_skip import layers_to_skip
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.flashu.understanding import UnderstandingSpecialist, understanding_widths
from flashu_batch.showo2.config import Showo2Config
from flashu_batch.showo2.layouts import t2i_sequences, vqa_sequence
from flashu_batch.showo2.modeling import Showo2, additive_mask, omni_attention_mask
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.tokenizer import QWEN2_5
from flashu_batch.showo2.vae import VAEConfig, WanVAE

MODELS = {"1.5b": "1.5B", "7b": "7B", "tiny": "tiny"}
META = torch.device("meta")


def count_tflop(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12


def build(model_name: str) -> tuple[Showo2, WanVAE]:
    config = Showo2Config.from_name(MODELS[model_name])
    with META:
        model = Showo2(config).to(torch.bfloat16).eval()
        vae = WanVAE(VAEConfig(dim=96 if model_name != "tiny" else 8)).eval()
    return model, vae


def t2i_flops(model_name: str, batch: int = 1, num_inference_steps: int = 50, prompt_tokens: int = 20,
              flashu: FlashUGenerationConfig | None = None) -> dict:
    model, vae = build(model_name)
    c = model.config
    calls = num_inference_steps - 1
    seqs = t2i_sequences([[0] * prompt_tokens] * batch, QWEN2_5, c.num_image_slots, c.default_max_seq_len)
    R, L = seqs.input_ids.shape
    x = torch.empty(batch, c.image_latent_dim, *c.latent_size, device=META, dtype=torch.bfloat16)
    t = torch.empty(batch, device=META)

    def official_call():  # inference_t2i.py: both CFG rows, the whole sequence, logits at every position
        meta_seqs = seqs.to(META)
        mask = additive_mask(omni_attention_mask(meta_seqs.modality_positions, L), torch.bfloat16)
        model.velocity(meta_seqs.input_ids, meta_seqs.image_offsets, meta_seqs.modality_positions, mask,
                       torch.cat([x, x]), torch.cat([t, t]))
        model.showo.lm_head(torch.empty(R, L, c.hidden_size, device=META, dtype=torch.bfloat16))

    step = {}
    setup = count_tflop(lambda: step.setdefault("fn", PrefixCachedVelocity(model, seqs, use_cfg=True)))
    per_call = count_tflop(lambda: step["fn"](x, t))
    official_per_call = count_tflop(official_call)
    vae_decode = count_tflop(lambda: vae.decode(torch.empty(batch, c.image_latent_dim, *c.latent_size, device=META)))
    official = official_per_call * calls / batch
    baseline = (setup + per_call * calls) / batch

    # FlashU: the specialist's own step count and plan; prefix refills and recalculation calls are counted too.
    flashu = flashu or FlashUGenerationConfig()
    specialist = GenerationSpecialist(model, pruned_widths(model, flashu), flashu)

    def flashu_run():
        velocity_fn = specialist.velocity_fn(seqs, use_cfg=True)
        for i in range(flashu.num_model_calls):
            velocity_fn(x, t, i)

    flashu_total = count_tflop(flashu_run) / batch
    return dict(task="t2i", model=model_name, batch=batch, num_inference_steps=num_inference_steps,
                model_calls=calls, prompt_tokens=prompt_tokens,
                official_tflop_per_call=round(official_per_call, 3), baseline_tflop_per_call=round(per_call, 3),
                baseline_setup_tflop=round(setup, 3),
                official_tflop_per_image=round(official, 2), baseline_tflop_per_image=round(baseline, 2),
                baseline_over_official=round(baseline / official, 4),
                flashu_tflop_per_image=round(flashu_total, 2), flashu_model_calls=flashu.num_model_calls,
                ratio=round(flashu_total / baseline, 4), flashu_over_official=round(flashu_total / official, 4),
                vae_decode_tflop_per_image=round(vae_decode / batch, 3))


def vqa_flops(model_name: str, question_tokens: int = 20, answer_tokens: int = 16,
              flashu: FlashUUnderstandingConfig | None = None) -> dict:
    model, vae = build(model_name)
    c = model.config
    seqs = vqa_sequence([0] * question_tokens, [0] * 14, [0] * 4, QWEN2_5, c.num_image_slots).to(META)
    L, H = seqs.input_ids.shape[1], c.hidden_size
    side = c.latent_size[0] * 8
    pixels = torch.empty(1, 3, side, side, device=META)
    latents = torch.empty(1, c.image_latent_dim, *c.latent_size, device=META, dtype=torch.bfloat16)

    def image_path():  # both loops encode the image once (VAE encoder, semantic path, fusion, time token)
        vae.encode(pixels)
        model.embed_image(latents)
        model.time_embedding(torch.ones(1, device=META))

    def official_answer():  # mmu_generate: the whole sequence again for every token, logits everywhere
        for k in range(answer_tokens):
            embeds = torch.empty(1, L + k, H, device=META, dtype=torch.bfloat16)
            mask = torch.zeros(1, 1, L + k, L + k, device=META, dtype=torch.bfloat16)
            model.showo.lm_head(model.llm_hidden(embeds, mask))

    def baseline_answer():  # greedy_answers: prefill with the last logit only, then one cached token per step
        cache = DynamicCache(config=model.showo.config)
        embeds = torch.empty(1, L, H, device=META, dtype=torch.bfloat16)
        mask = torch.zeros(1, 1, L, L, device=META, dtype=torch.bfloat16)
        model.showo(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        for k in range(answer_tokens - 1):
            token = torch.zeros(1, 1, dtype=torch.long, device=META)
            model.showo(input_ids=token, cache=cache, use_cache=True,
                        attention_mask=torch.zeros(1, 1, 1, L + k + 1, device=META, dtype=torch.bfloat16),
                        position_ids=torch.full((1, 1), L + k, device=META))

    flashu = flashu or FlashUUnderstandingConfig()
    specialist = UnderstandingSpecialist(model, understanding_widths(model, flashu), flashu)

    def flashu_answer():  # the specialist's prefill (token pruning at layer K) and its cached decode steps
        cache = DynamicCache(config=model.showo.config)
        embeds = torch.empty(1, L, H, device=META, dtype=torch.bfloat16)
        col = torch.arange(L, device=META)[None]
        first = seqs.image_offsets[:, None] + 1
        image = (col >= first) & (col < first + c.num_image_tokens)
        allowed = torch.ones(1, 1, L, L, dtype=torch.bool, device=META)
        real = torch.ones(1, L, dtype=torch.bool, device=META)
        skipping = flashu.layer_skip_ratio > 0
        _, layer_real, importance = specialist.prefill(embeds, col.expand(1, L), allowed, real, image, cache,
                                                       score=skipping)
        skip = layers_to_skip(importance, flashu.layer_skip_ratio) if skipping else frozenset()  # as greedy_answers
        key_masks = specialist.decode_masks(layer_real, answer_tokens, torch.bfloat16)
        for k in range(answer_tokens - 1):
            model.showo.lm_head(torch.empty(1, H, device=META, dtype=torch.bfloat16))
            recalc = skipping and (k + 1) % flashu.layer_skip_interval == 0
            _, importance = specialist.decode_step(torch.zeros(1, dtype=torch.long, device=META),
                                                   torch.full((1,), L + k, device=META), key_masks,
                                                   frozenset() if recalc else skip, cache, score=recalc)
            if recalc:
                skip = layers_to_skip(importance, flashu.layer_skip_ratio)
        model.showo.lm_head(torch.empty(1, H, device=META, dtype=torch.bfloat16))

    encode = count_tflop(image_path)
    official = encode + count_tflop(official_answer)
    baseline = encode + count_tflop(baseline_answer)
    flashu_total = encode + count_tflop(flashu_answer)
    return dict(task="vqa", model=model_name, prompt_tokens=L, question_tokens=question_tokens,
                answer_tokens=answer_tokens, image_encode_tflop=round(encode, 3),
                official_tflop_per_answer=round(official, 3), baseline_tflop_per_answer=round(baseline, 3),
                baseline_over_official=round(baseline / official, 4),
                flashu_tflop_per_answer=round(flashu_total, 3), ratio=round(flashu_total / baseline, 4),
                flashu_over_official=round(flashu_total / official, 4))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["t2i", "vqa"], required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    parser.add_argument("--batch", type=int, default=1, help="T2I prompts per batch")
    parser.add_argument("--steps", type=int, default=50, help="T2I num_inference_steps (model calls = steps - 1)")
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--answer-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.task == "t2i":
        result = t2i_flops(args.model, args.batch, args.steps, args.prompt_tokens)
        print(f"T2I {args.model}: official {result['official_tflop_per_image']} TFLOP/image, "
              f"baseline {result['baseline_tflop_per_image']} ({result['baseline_over_official']:.1%}), "
              f"FlashU {result['flashu_tflop_per_image']} ({result['ratio']:.1%} of the baseline, "
              f"{result['flashu_over_official']:.1%} of the official)")
    else:
        result = vqa_flops(args.model, args.question_tokens, args.answer_tokens)
        print(f"VQA {args.model}: official {result['official_tflop_per_answer']} TFLOP/answer, "
              f"baseline {result['baseline_tflop_per_answer']} ({result['baseline_over_official']:.1%}), "
              f"FlashU {result['flashu_tflop_per_answer']} ({result['ratio']:.1%} of the baseline)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
