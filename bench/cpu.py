"""CPU wall time of our exact baseline vs a faithful recompute-style path (the official loops), side by side.

    python -m bench.cpu [--repeats 3]

A small random Show-o2 (same code, small widths) runs both paths for each task in one process, alternating, and
the best time of each is compared. The last line printed is one JSON object.
T2I: the prefix-cached image-span step vs the full sequence with logits at every position (inference_t2i.py),
and the FlashU generation specialist at its defaults (35 steps) vs our baseline at the official 50 steps.
VQA: batched prefill + KV-cached decoding vs one question at a time, the whole sequence re-run for every token
(inference_mmu.py). Answers are forced to full length (no eos) so both paths do the same number of tokens.
"""

import argparse
import json
import time

import torch

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.generation import calibrate_generation, specialize_generation
from flashu_batch.showo2.config import FlowHeadConfig, Showo2Config
from flashu_batch.showo2.layouts import t2i_sequences, vqa_sequence
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents
from flashu_batch.showo2.tokenizer import SpecialTokens
from flashu_batch.showo2.vqa import greedy_answer_recompute, greedy_answers


def small_config() -> Showo2Config:
    llm = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
               vocab_size=2048, tie_word_embeddings=True, hidden_act="silu")
    siglip = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=112, patch_size=14)
    head = FlowHeadConfig(hidden_size=256, head_dim=64, intermediate_size=704, num_attention_heads=4,
                          num_key_value_heads=2)
    return Showo2Config(llm=llm, siglip=siglip, llm_vocab_size=2048, hidden_size=256, clip_latent_dim=128,
                        image_latent_height=8, image_latent_width=8, num_diffusion_layers=3, head=head)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(repeats: int = 3, batch: int = 4, steps: int = 10, answer_tokens: int = 16) -> dict:
    """Timings of the official-style loops vs our baseline (both tasks), and FlashU T2I vs our baseline."""
    torch.manual_seed(0)
    model = Showo2(small_config()).eval()
    c = model.config
    tokens = SpecialTokens.from_layout(2048 - 26)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 12, 20, 31)][:batch]
    seqs = t2i_sequences(prompts, tokens, c.num_image_slots, c.num_image_slots + 4 + 32)
    noise = torch.randn(len(prompts), c.image_latent_dim, *c.latent_size, generator=g)

    def t2i_official():
        full = full_sequence_velocity_fn(model, seqs)

        def with_logits(x, t, step):  # upstream also computes logits at every position each step
            v = full(x, t, step)
            model.showo.lm_head(torch.zeros(*seqs.input_ids.shape, c.hidden_size))
            return v

        return generate_latents(with_logits, noise, num_inference_steps=steps, guidance_scale=5.0)

    def t2i_baseline():
        return generate_latents(PrefixCachedVelocity(model, seqs, use_cfg=True), noise,
                                num_inference_steps=steps, guidance_scale=5.0)

    questions = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 20, 13, 25)][:batch]
    rows = [vqa_sequence(q, [tokens.bos] + [11] * 13, [12] * 4, tokens, c.num_image_slots) for q in questions]
    latents = torch.randn(len(rows), c.image_latent_dim, *c.latent_size, generator=g)

    def vqa_official():
        return [greedy_answer_recompute(model, r, latents[i:i + 1], max_new_tokens=answer_tokens, eos_id=-1)[0]
                for i, r in enumerate(rows)]

    def vqa_baseline():
        return greedy_answers(model, rows, latents, max_new_tokens=answer_tokens, eos_id=-1, pad_id=tokens.pad)

    # FlashU at its defaults against our baseline at the official 50 steps and guidance 10 (the specialist's
    # schedule ends at the base scale 10). Calibrated on a few prompts; the baseline runs on the same reordered
    # weights (reordering is exact).
    flashu = FlashUGenerationConfig(calibration_steps=4)
    specialist = specialize_generation(model, calibrate_generation(model, prompts, tokens, flashu,
                                                                   max_seq_len=seqs.input_ids.shape[1]), flashu)

    def t2i_baseline_50():
        return generate_latents(PrefixCachedVelocity(model, seqs, use_cfg=True), noise, num_inference_steps=50,
                                guidance_scale=10.0)

    def t2i_flashu():
        return generate_latents(specialist.velocity_fn(seqs, use_cfg=True), noise,
                                num_inference_steps=flashu.num_inference_steps,
                                guidance_scale=specialist.guidance_scales(10.0))

    with torch.no_grad():
        assert vqa_official() == vqa_baseline(), "baseline answers differ from the recompute loop"
        timings = {name: best_time(fn, repeats) for name, fn in
                   (("t2i_official_s", t2i_official), ("t2i_baseline_s", t2i_baseline),
                    ("vqa_official_s", vqa_official), ("vqa_baseline_s", vqa_baseline),
                    ("t2i_baseline_50_steps_s", t2i_baseline_50), ("t2i_flashu_s", t2i_flashu))}
    return dict(config="small (LLM 6x256, semantic 3x128, head 3x256, 8x8 image tokens)", batch=batch,
                t2i_steps=steps, answer_tokens=answer_tokens, threads=torch.get_num_threads(),
                **{k: round(v, 4) for k, v in timings.items()},
                t2i_speedup=round(timings["t2i_official_s"] / timings["t2i_baseline_s"], 2),
                vqa_speedup=round(timings["vqa_official_s"] / timings["vqa_baseline_s"], 2),
                flashu_t2i_speedup=round(timings["t2i_baseline_50_steps_s"] / timings["t2i_flashu_s"], 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args.repeats)
    print(f"T2I baseline {result['t2i_speedup']}x faster than the official loop, VQA {result['vqa_speedup']}x; "
          f"FlashU T2I {result['flashu_t2i_speedup']}x faster than the baseline (35 vs 50 steps)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
