"""GPU throughput of the exact baseline on the real-size model with random weights.

    python -m bench.gpu                 # Show-o2 1.5B, bf16, 432x432, 50 steps
    python -m bench.gpu --model 7b
    python -m bench.gpu --model tiny --device cpu --steps 3 --t2i-batches 1 2 --vqa-batches 1 2   # smoke run

Reports, as the last printed line, one JSON object (also written to --out, default bench/results/): T2I images/s
at each batch (prefix-cached step, 50 steps, guidance on, VAE decode included; and the FlashU generation specialist
at its defaults, 34 model calls; random weights, so its neuron order is arbitrary, which changes no cost), VQA
answers/s at each batch (image encode + prefill + 16 greedy tokens; and the FlashU understanding specialist at its
defaults), the official-style loops at batch 1 in the same process (T2I: the whole 1024-token sequence and the
logits at every position recomputed at every step, inference_t2i.py; VQA: the whole growing sequence recomputed for
every token, inference_mmu.py, in fp32 as upstream and in bf16), peak memory, and achieved TFLOP/s (FLOPs counted
by bench.flops on the meta device) against a bf16 matmul probe run in the same process. Every time is the median of
--repeats timed runs after one warm-up; compile_s is the warm-up run's excess over that median (with --compile,
every variant compiled as the workers compile it, showo2/compile.py; the VQA image path is compiled in place, so the
official loops, which run last, use it too). `summary` holds the headline numbers. Needs only torch, transformers,
safetensors (no ray, boto3 or pydantic).

With --worker-spec SPEC (a job spec, YAML or JSON) it also times the workers' own code path: each task's
T2IWorker / VQAWorker built as the pipeline builds it (scheduler.pipeline.worker_kwargs from the spec's model and the
task's params; a real checkpoint folder with its tokenizer) and called on a pyarrow batch, without Ray (tokenization,
image decoding and encoding, batching around the same model calls). That path imports the job spec, so it needs
pydantic, pyyaml and pyarrow as well (carry their wheels to a machine without them).
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

from flashu_batch.bench.flops import MODELS, t2i_flops, vqa_flops
from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.flashu.understanding import UnderstandingSpecialist, understanding_widths
from flashu_batch.showo2.compile import compiler_for
from flashu_batch.showo2.config import Showo2Config
from flashu_batch.showo2.layouts import t2i_sequences, vqa_sequence
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import QWEN2_5, SpecialTokens
from flashu_batch.showo2.vae import VAEConfig, WanVAE
from flashu_batch.showo2.vqa import greedy_answer_recompute, greedy_answers


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


def timed(fn, device, repeats: int = 3) -> float:
    """Median wall time of `repeats` runs of fn after one warm-up run (kernels, allocator, autotuning)."""
    return first_and_timed(fn, device, repeats)[1]


def first_and_timed(fn, device, repeats: int = 3) -> tuple[float, float]:
    """(wall time of the first, warm-up run, median of the `repeats` runs after it). The first run's excess over the
    median is what compiling (and one-time allocation) cost: reported as compile_s."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def sig(x: float) -> float:
    """Three significant digits (tiny CPU smoke runs achieve well under 0.1 TFLOP/s)."""
    return float(f"{x:.3g}")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


def summarize(result: dict) -> dict:
    """The headline numbers: best batch per variant, FlashU speed-up at batch 1, the official loops."""
    def best(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return max(values) if values else None

    def at_batch_1(rows, key):
        return next((r.get(key) for r in rows if r["batch"] == 1), None)

    t2i, vqa, official = result["t2i"], result["vqa"], result["official"]
    best_t2i = max(t2i, key=lambda r: r["images_per_s"]) if t2i else {}
    return dict(t2i_exact_images_per_s=best(t2i, "images_per_s"),
                t2i_flashu_images_per_s=best(t2i, "flashu_images_per_s"),
                t2i_flashu_speedup_bs1=at_batch_1(t2i, "flashu_speedup"),
                t2i_exact_probe_fraction=best_t2i.get("fraction_of_probe"),
                vqa_exact_answers_per_s=best(vqa, "answers_per_s"),
                vqa_flashu_answers_per_s=best(vqa, "flashu_answers_per_s"),
                vqa_flashu_speedup_bs1=at_batch_1(vqa, "flashu_speedup"),
                official_t2i_images_per_s=official.get("t2i", {}).get("images_per_s"),
                official_vqa_answers_per_s=official.get("vqa_fp32", {}).get("answers_per_s"))


def write_result(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    device = result["device"].replace(" ", "_").replace("/", "_")
    path = os.path.join(out_dir, f"gpu-{result['model']}-{device}-{time.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--t2i-batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--vqa-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--compile", action="store_true", help="compile every variant as the workers do with "
                        "model.compile 'on' (showo2/compile.py; on CPU with dynamo's eager backend)")
    parser.add_argument("--no-flashu", action="store_true", help="skip the FlashU timings")
    parser.add_argument("--no-official", action="store_true", help="skip the official-style loops")
    parser.add_argument("--worker-spec", help="also time the workers of this job spec's tasks (needs pydantic)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder the JSON result is written to")
    args = parser.parse_args(argv)
    command = "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    device, dtype = torch.device(args.device), torch.bfloat16

    config = Showo2Config.from_name(MODELS[args.model])
    sync(device)
    start = time.perf_counter()
    with torch.device("meta"):
        model = Showo2(config).to(dtype)
        vae = WanVAE(VAEConfig(dim=8 if args.model == "tiny" else 96)).to(dtype)
    model = random_init_(model, device).eval()
    model.init_buffers(device)
    vae = random_init_(vae, device).eval()
    sync(device)
    load_s = time.perf_counter() - start  # random weights: allocation and init, not reading a checkpoint
    tokens = QWEN2_5 if args.model != "tiny" else SpecialTokens.from_layout(config.llm_vocab_size - 26)
    flashu = FlashUGenerationConfig()
    specialist = GenerationSpecialist(model, pruned_widths(model, flashu), flashu)
    vqa_flashu = FlashUUnderstandingConfig()
    vqa_specialist = UnderstandingSpecialist(model, understanding_widths(model, vqa_flashu), vqa_flashu)
    compiler = compiler_for("on", device) if args.compile else None
    exact_decode = partial(greedy_answers, static=compiler.static_decoder()) if compiler else greedy_answers
    flashu_decode = vqa_specialist.pipeline_kwargs(compiler)["decode_fn"]  # as a VQA worker decodes
    probe = matmul_probe_tflops(device, dtype)
    # FLOPs per image / answer grow linearly with the batch: count once (meta device, seconds on the CPU)
    t2i_per_image = t2i_flops(args.model, 1, args.steps)
    vqa_per_answer = vqa_flops(args.model, 20, args.answer_tokens)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, command=command, model=args.model, dtype="bfloat16", steps=args.steps,
                  repeats=args.repeats, compile=args.compile, load_s=round(load_s, 3),
                  matmul_probe_tflops=round(probe, 4), t2i=[], vqa=[], official={})

    def t2i_inputs(batch):
        seqs = t2i_sequences([[100 + i] * 20 for i in range(batch)], tokens, config.num_image_slots,
                             config.default_max_seq_len)
        noise = seeded_noise(list(range(batch)), (config.image_latent_dim, *config.latent_size)).to(device)
        return seqs, noise

    for batch in args.t2i_batches:
        seqs, noise = t2i_inputs(batch)

        def generate():
            with torch.no_grad():
                latents = generate_latents(PrefixCachedVelocity(model, seqs, use_cfg=True, compiler=compiler), noise,
                                           num_inference_steps=args.steps, guidance_scale=args.guidance,
                                           model_dtype=dtype)
                return vae.decode(latents.to(dtype))

        def generate_flashu():
            with torch.no_grad():
                latents = generate_latents(specialist.velocity_fn(seqs, use_cfg=True, compiler=compiler), noise,
                                           num_inference_steps=flashu.num_inference_steps,
                                           guidance_scale=specialist.guidance_scales(args.guidance),
                                           model_dtype=dtype)
                return vae.decode(latents.to(dtype))

        reset_peak(device)
        first, seconds = first_and_timed(generate, device, args.repeats)
        tflop = t2i_per_image["baseline_tflop_per_image"] * batch
        row = dict(batch=batch, seconds=round(seconds, 3), images_per_s=round(batch / seconds, 3),
                   compile_s=round(max(first - seconds, 0.0), 3),
                   achieved_tflops=sig(tflop / seconds), fraction_of_probe=sig(tflop / seconds / probe),
                   peak_gib=peak_gib(device))
        if not args.no_flashu:
            reset_peak(device)
            first, flashu_seconds = first_and_timed(generate_flashu, device, args.repeats)
            row.update(flashu_seconds=round(flashu_seconds, 3), flashu_images_per_s=round(batch / flashu_seconds, 3),
                       flashu_compile_s=round(max(first - flashu_seconds, 0.0), 3),
                       flashu_speedup=round(seconds / flashu_seconds, 2),
                       flashu_achieved_tflops=sig(t2i_per_image["flashu_tflop_per_image"] * batch / flashu_seconds),
                       flashu_peak_gib=peak_gib(device))
        result["t2i"].append(row)
        print(json.dumps(row), flush=True)

    side = config.latent_size[0] * 8

    def vqa_inputs(batch, pixel_dtype):
        rows = [vqa_sequence([200 + (i % 7)] * (20 - i % 5), [tokens.bos] + [300] * 13, [400] * 4, tokens,
                             config.num_image_slots) for i in range(batch)]
        pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        return rows, pixels.to(device, pixel_dtype)

    if compiler is not None:  # as the VQA workers do; in place, so the official loops below reuse it (conservative)
        compiler.compile_image_path(vae, model)
    for batch in args.vqa_batches:
        rows, pixels = vqa_inputs(batch, dtype)

        def answer(decode=exact_decode):
            with torch.no_grad():
                latents = vae.encode(pixels).to(dtype)
                return decode(model, rows, latents, max_new_tokens=args.answer_tokens, eos_id=-1, pad_id=tokens.pad)

        reset_peak(device)
        first, seconds = first_and_timed(answer, device, args.repeats)
        tflop = vqa_per_answer["baseline_tflop_per_answer"] * batch
        row = dict(batch=batch, seconds=round(seconds, 3), answers_per_s=round(batch / seconds, 2),
                   compile_s=round(max(first - seconds, 0.0), 3),
                   achieved_tflops=sig(tflop / seconds), fraction_of_probe=sig(tflop / seconds / probe),
                   peak_gib=peak_gib(device))
        if not args.no_flashu:
            reset_peak(device)
            first, flashu_seconds = first_and_timed(lambda: answer(flashu_decode), device,
                                                    args.repeats)
            row.update(flashu_seconds=round(flashu_seconds, 3), flashu_answers_per_s=round(batch / flashu_seconds, 2),
                       flashu_compile_s=round(max(first - flashu_seconds, 0.0), 3),
                       flashu_speedup=round(seconds / flashu_seconds, 2),
                       flashu_achieved_tflops=sig(vqa_per_answer["flashu_tflop_per_answer"] * batch / flashu_seconds),
                       flashu_peak_gib=peak_gib(device))
        result["vqa"].append(row)
        print(json.dumps(row), flush=True)

    if not args.no_official:
        result["official"] = official_loops(model, vae, args, device, t2i_inputs, vqa_inputs, tokens,
                                            t2i_per_image, vqa_per_answer, probe)
    if args.worker_spec:
        del model, vae, specialist, vqa_specialist  # the workers load their own
        result["workers"] = worker_timings(args.worker_spec, args.t2i_batches, args.vqa_batches, args.repeats, device)
    # functions whose compilation failed and which ran eager (showo2/compile.py CompiledOrEager): their figures are
    # not the compiled path's
    result["compile_failures"] = list(compiler.failures) if compiler is not None else []
    result["summary"] = summarize(result)
    path = write_result(result, args.out)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result))


def worker_timings(spec_path: str, t2i_batches: list[int], vqa_batches: list[int], repeats: int, device) -> dict:
    """Each task of the spec: its worker's load time, then images/s or answers/s of worker(batch) per batch size."""
    import io

    import pyarrow as pa
    from PIL import Image

    from flashu_batch.jobs.spec import load_spec  # pydantic: only on this path
    from flashu_batch.scheduler.pipeline import worker_kwargs
    from flashu_batch.workers import T2IWorker, VQAWorker

    spec = load_spec(spec_path)
    image = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 140, 200)).save(image, format="JPEG")
    timings = {}
    for task in spec.tasks:
        t2i = task.kind == "t2i"
        sync(device)
        start = time.perf_counter()
        worker = (T2IWorker if t2i else VQAWorker)(**worker_kwargs(spec.model, task.params, task.resources,
                                                                   spec.storage, spec.job_id))
        sync(device)
        built = time.perf_counter() - start
        # load_s: the pipeline's load; compile_s: compiling and warming up at load (model.compile), where the worker
        # reports them (seconds to build the worker otherwise)
        compile_s = getattr(worker, "compile_seconds", None)
        compiler = getattr(worker, "compiler", None)
        entry = dict(kind=task.kind, load_s=round(getattr(worker, "load_seconds", built), 3),
                     compile_s=None if compile_s is None else round(compile_s, 3), rows=[],
                     compile_failures=list(compiler.failures) if compiler is not None else [])
        for batch in (t2i_batches if t2i else vqa_batches):
            ids = [f"r{i}" for i in range(batch)]
            if t2i:
                table = pa.table(dict(id=ids, prompt=[f"a photo of object {i}" for i in range(batch)],
                                      seed=pa.array([i for i in range(batch)], pa.int64()), error=[None] * batch))
            else:
                table = pa.table(dict(id=ids, question=[f"what is in picture {i}?" for i in range(batch)],
                                      image_bytes=[image.getvalue()] * batch, image_path=[None] * batch,
                                      image_sha256=[None] * batch, error=[None] * batch))

            def call():
                errors = [e for e in worker(table).column("error").to_pylist() if e is not None]
                assert not errors, f"the {task.kind} worker failed rows: {errors[:3]}"

            reset_peak(device)
            seconds = timed(call, device, repeats)
            rate = "images_per_s" if t2i else "answers_per_s"
            entry["rows"].append({"batch": batch, "seconds": round(seconds, 3), rate: round(batch / seconds, 3),
                                  "peak_gib": peak_gib(device)})
            print(json.dumps({f"worker_{task.task_name}": entry["rows"][-1]}), flush=True)
        timings[task.task_name] = entry
    return timings


def official_loops(model, vae, args, device, t2i_inputs, vqa_inputs, tokens, t2i_per_image, vqa_per_answer,
                   probe) -> dict:
    """Batch 1 as upstream runs it. T2I (bf16): every step the whole sequence through the LLM, the language head
    at every position and the flow head (inference_t2i.py, no cache). VQA: every token the whole growing sequence
    (inference_mmu.py), in bf16, then fp32 (upstream's dtype; the model is cast in place, so this comes last)."""
    official = {}
    seqs, noise = t2i_inputs(1)
    seqs = seqs.to(device)
    c = model.config

    def t2i():
        with torch.no_grad():
            full = full_sequence_velocity_fn(model, seqs)

            def with_logits(x, t, step):  # upstream also computes logits at every position each step
                v = full(x, t, step)
                model.showo.lm_head(torch.zeros(*seqs.input_ids.shape, c.hidden_size, device=device,
                                                dtype=torch.bfloat16))
                return v

            latents = generate_latents(with_logits, noise, num_inference_steps=args.steps,
                                       guidance_scale=args.guidance, model_dtype=torch.bfloat16)
            return vae.decode(latents.to(torch.bfloat16))

    reset_peak(device)
    seconds = timed(t2i, device, args.repeats)
    tflop = t2i_per_image["official_tflop_per_image"]
    official["t2i"] = dict(batch=1, seconds=round(seconds, 3), images_per_s=round(1 / seconds, 4),
                           achieved_tflops=sig(tflop / seconds),
                           fraction_of_probe=sig(tflop / seconds / probe), peak_gib=peak_gib(device))
    print(json.dumps(dict(official_t2i=official["t2i"])), flush=True)

    for name, dtype in (("vqa_bf16", torch.bfloat16), ("vqa_fp32", torch.float32)):
        model.to(dtype)
        vae.to(dtype)
        (row,), pixels = vqa_inputs(1, dtype)
        row = row.to(device)

        def answer():
            with torch.no_grad():
                latents = vae.encode(pixels).to(dtype)
                return greedy_answer_recompute(model, row, latents, max_new_tokens=args.answer_tokens, eos_id=-1)

        reset_peak(device)
        seconds = timed(answer, device, args.repeats)
        tflop = vqa_per_answer["official_tflop_per_answer"]
        official[name] = dict(batch=1, seconds=round(seconds, 3), answers_per_s=round(1 / seconds, 3),
                              achieved_tflops=sig(tflop / seconds), peak_gib=peak_gib(device))
        print(json.dumps({f"official_{name}": official[name]}), flush=True)
    model.to(torch.bfloat16)
    vae.to(torch.bfloat16)
    return official


if __name__ == "__main__":
    main()
