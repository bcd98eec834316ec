"""GPU throughput of the exact baseline on the real-size model with random weights.

    python -m bench.gpu                 # Show-o2 1.5B, bf16, 432x432, 50 steps
    python -m bench.gpu --model 7b
    python -m bench.gpu --model tiny --device cpu --steps 3 --t2i-batches 1 2 --vqa-batches 1 2   # smoke run

Reports, as the last printed line, one JSON object: T2I images/s at each batch (prefix-cached step, 50 steps,
guidance on, VAE decode included; and the FlashU generation specialist at its defaults, 34 model calls; random
weights, so its neuron order is arbitrary, which changes no cost), VQA answers/s at each batch (image encode +
prefill + 16 greedy tokens; and the FlashU understanding specialist at its defaults), peak
memory, and achieved TFLOP/s (FLOPs counted by bench.flops on the meta device) against a bf16 matmul probe run in
the same process. Needs only torch, transformers, safetensors (no ray, boto3 or pydantic).
"""

import argparse
import json
import time

import torch

from flashu_batch.bench.flops import MODELS, t2i_flops, vqa_flops
from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.flashu.understanding import UnderstandingSpecialist, understanding_widths
from flashu_batch.showo2.config import Showo2Config
from flashu_batch.showo2.layouts import t2i_sequences, vqa_sequence
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import QWEN2_5, SpecialTokens
from flashu_batch.showo2.vae import VAEConfig, WanVAE
from flashu_batch.showo2.vqa import greedy_answers


def random_init_(module: torch.nn.Module, device) -> torch.nn.Module:
    """Materialise a meta-built module on `device` with small random weights (norm scales 1)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("gamma"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return module


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_probe_tflops(device, dtype, n: int = 8192, iters: int = 20) -> float:
    """Best bf16 n^3 matmul rate: the ceiling the model's numbers are compared against."""
    if device.type != "cuda":
        n, iters = 512, 3
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def timed(fn, device, repeats: int = 2) -> float:
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--t2i-batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--vqa-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--compile", action="store_true", help="torch.compile the T2I step (fullgraph)")
    parser.add_argument("--no-flashu", action="store_true", help="skip the FlashU timings")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16

    config = Showo2Config.from_name(MODELS[args.model])
    with torch.device("meta"):
        model = Showo2(config).to(dtype)
        vae = WanVAE(VAEConfig(dim=8 if args.model == "tiny" else 96)).to(dtype)
    model = random_init_(model, device).eval()
    model.init_buffers(device)
    vae = random_init_(vae, device).eval()
    tokens = QWEN2_5 if args.model != "tiny" else SpecialTokens.from_layout(config.llm_vocab_size - 26)
    flashu = FlashUGenerationConfig()
    specialist = GenerationSpecialist(model, pruned_widths(model, flashu), flashu)
    vqa_flashu = FlashUUnderstandingConfig()
    vqa_specialist = UnderstandingSpecialist(model, understanding_widths(model, vqa_flashu), vqa_flashu)
    probe = matmul_probe_tflops(device, dtype)
    # FLOPs per image / answer grow linearly with the batch: count once (meta device, seconds on the CPU)
    t2i_per_image = t2i_flops(args.model, 1, args.steps)
    vqa_per_answer = vqa_flops(args.model, 20, args.answer_tokens)
    result = dict(model=args.model, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  dtype="bfloat16", steps=args.steps, compile=args.compile, matmul_probe_tflops=round(probe, 4), t2i=[], vqa=[])

    for batch in args.t2i_batches:
        seqs = t2i_sequences([[100 + i] * 20 for i in range(batch)], tokens, config.num_image_slots,
                             config.default_max_seq_len)
        noise = seeded_noise(list(range(batch)), (config.image_latent_dim, *config.latent_size)).to(device)

        def generate():
            with torch.no_grad():
                step = PrefixCachedVelocity(model, seqs, use_cfg=True)
                velocity_fn = torch.compile(step.__call__, fullgraph=True) if args.compile else step
                latents = generate_latents(velocity_fn, noise,
                                           num_inference_steps=args.steps, guidance_scale=args.guidance,
                                           model_dtype=dtype)
                return vae.decode(latents.to(dtype))

        def generate_flashu():
            with torch.no_grad():
                latents = generate_latents(specialist.velocity_fn(seqs, use_cfg=True), noise,
                                           num_inference_steps=flashu.num_inference_steps,
                                           guidance_scale=specialist.guidance_scales(args.guidance),
                                           model_dtype=dtype)
                return vae.decode(latents.to(dtype))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(generate, device, repeats=1)
        tflop = t2i_per_image["baseline_tflop_per_image"] * batch
        row = dict(batch=batch, seconds=round(seconds, 3), images_per_s=round(batch / seconds, 3),
                   achieved_tflops=round(tflop / seconds, 1), fraction_of_probe=round(tflop / seconds / probe, 3),
                   peak_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                   if device.type == "cuda" else None)
        if not args.no_flashu:
            flashu_seconds = timed(generate_flashu, device, repeats=1)
            row.update(flashu_seconds=round(flashu_seconds, 3), flashu_images_per_s=round(batch / flashu_seconds, 3),
                       flashu_speedup=round(seconds / flashu_seconds, 2),
                       flashu_achieved_tflops=round(t2i_per_image["flashu_tflop_per_image"] * batch / flashu_seconds,
                                                    1))
        result["t2i"].append(row)
        print(json.dumps(row), flush=True)

    side = config.latent_size[0] * 8
    for batch in args.vqa_batches:
        rows = [vqa_sequence([200 + (i % 7)] * (20 - i % 5), [tokens.bos] + [300] * 13, [400] * 4, tokens,
                             config.num_image_slots) for i in range(batch)]
        pixels = torch.rand(batch, 3, side, side, device=device, dtype=dtype) * 2 - 1

        def answer(decode=greedy_answers):
            with torch.no_grad():
                latents = vae.encode(pixels).to(dtype)
                return decode(model, rows, latents, max_new_tokens=args.answer_tokens, eos_id=-1, pad_id=tokens.pad)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(answer, device)
        tflop = vqa_per_answer["baseline_tflop_per_answer"] * batch
        row = dict(batch=batch, seconds=round(seconds, 3), answers_per_s=round(batch / seconds, 2),
                   achieved_tflops=round(tflop / seconds, 1), fraction_of_probe=round(tflop / seconds / probe, 3),
                   peak_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                   if device.type == "cuda" else None)
        if not args.no_flashu:
            flashu_seconds = timed(lambda: answer(vqa_specialist.greedy_answers), device)
            row.update(flashu_seconds=round(flashu_seconds, 3), flashu_answers_per_s=round(batch / flashu_seconds, 2),
                       flashu_speedup=round(seconds / flashu_seconds, 2),
                       flashu_achieved_tflops=round(vqa_per_answer["flashu_tflop_per_answer"] * batch / flashu_seconds,
                                                    1))
        result["vqa"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
