"""Fidelity yardstick: T2I correctness and VQA accuracy of a tiny-shapes Show-o2, checked by program, for the
unaccelerated model and for the FlashU specialists (all techniques, then each alone).

    python -m bench.quality --model tiny-shapes [--n-t2i 100] [--n-vqa 300] [--variants ...] [--json]

Held-out split of `train.tiny_world` (scenes with a (color, shape, position) triple never seen in training):

- T2I: one image per held-out caption (seed = its index), scored GenEval-style by `tiny_world.score_t2i`;
  `t2i_correctness` is the overall score (the image holds exactly the requested objects, each with the right
  color, shape and position), and the per-attribute scores come with it.
- VQA: one question per held-out image (the generator's own rendering), greedy answer through
  `Showo2Pipeline.answer` (its default layout unless --layout), exact match after normalisation.

The baseline is the exact pipeline at the official 50 steps and the model's guidance scale (--guidance, 1.5 for
tiny-shapes: chosen on training-split captions, where 1.25-1.5 draw 100% right and 3 draws 95%). "flashu" is both
specialists at their defaults (flashu/config.py); the only translation is the guidance
schedule, which the paper states for a base scale s0 = 10 ((24 calls at 0.75 s0, 11 at s0)) and which is scaled here
to the model's s0. Calibration uses training-split scenes only: captions for generation, (image, question) pairs for
understanding. Every variant runs the same sets with the same seeds; a single-technique variant is scored on its
task only. With --json the last line printed is one JSON object {variant: {...}, ..., "fidelity": {...}}, where
fidelity is flashu / baseline per task (the goal: >= 0.97 on each).
"""

import argparse
import json
import os
import random
import time
from collections import defaultdict

from flashu_batch.showo2.tiny import CHECKPOINTS
from flashu_batch.train import tiny_world as world

PAPER_BASE_GUIDANCE = 10.0  # the s0 that FlashU's default schedule is written for (design/flashu.md 2.5)
DEFAULTS = dict(n_t2i=100, n_vqa=300, steps=50, guidance=1.5, layout="demo", t2i_seed=1, vqa_seed=2, batch=50,
                calibration=20)

GEN_OFF = dict(num_inference_steps=50, guidance_schedule=None, ffn_prune_ratio=0.0, layer_skip_ratio=0.0,
               head_cache_interval=None)
UND_OFF = dict(ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.0)
SKIP = "skip"  # the variant is not scored on this task
# name -> (generation knobs, understanding knobs): None = the exact baseline, {} = FlashU defaults, a dict = defaults
# with these overrides, SKIP = not run. "guidance_schedule": "default" stands for the scaled default schedule.
VARIANTS = {
    "baseline": (None, None),
    "flashu": ({}, {}),
    "t2i: 35 steps + guidance schedule": (dict(GEN_OFF, num_inference_steps=35, guidance_schedule="default"), SKIP),
    "t2i: FFN pruning": (dict(GEN_OFF, ffn_prune_ratio=0.2), SKIP),
    "t2i: layer skipping": (dict(GEN_OFF, layer_skip_ratio=0.2), SKIP),
    "t2i: head cache": (dict(GEN_OFF, head_cache_interval=5), SKIP),
    "vqa: FFN pruning": (SKIP, dict(UND_OFF, ffn_prune_ratio=0.2)),
    # the technique itself: without the default floor of kept tokens, which leaves a 16-token grid unpruned
    "vqa: token pruning": (SKIP, dict(UND_OFF, token_prune_ratio=0.75, token_prune_min_kept=0)),
    "vqa: layer skipping": (SKIP, dict(UND_OFF, layer_skip_ratio=0.2)),
}


def resolve_model(name: str) -> str:
    """A known model name (e.g. "tiny-shapes") or a checkpoint folder."""
    if name in CHECKPOINTS:
        return CHECKPOINTS[name]
    if os.path.isdir(name) or name.startswith("s3://"):
        return name
    raise SystemExit(f"--model {name!r}: not a known model ({sorted(CHECKPOINTS)}) nor a folder.")


def scaled_schedule(guidance: float) -> tuple[tuple[int, float], ...]:
    from flashu_batch.flashu.config import DEFAULT_GUIDANCE_SCHEDULE

    return tuple((n, round(s * guidance / PAPER_BASE_GUIDANCE, 4)) for n, s in DEFAULT_GUIDANCE_SCHEDULE)


class Runner:
    """`text_to_image` / `answer` of one variant: the plain pipeline for the baseline, else a specialist calibrated
    on a fresh copy of the model (specializing reorders FFN neurons in place, each task its own way)."""

    def __init__(self, checkpoint: str, gen, und, *, guidance: float, calibration: int):
        self.checkpoint, self.guidance = checkpoint, guidance
        self.gen = self.und = None
        if gen not in (None, SKIP):
            self.gen_pipe = self.load()
            self.gen = specialize_t2i(self.gen_pipe, gen, guidance, calibration)
        if und not in (None, SKIP):
            self.und_pipe = self.load()
            self.und = specialize_vqa(self.und_pipe, und, calibration)
        self.pipe = self.load() if None in (gen, und) else None

    def load(self):
        import torch

        from flashu_batch.showo2.pipeline import Showo2Pipeline

        return Showo2Pipeline.from_pretrained(self.checkpoint, dtype=torch.float32, device="cpu")

    def text_to_image(self, prompts, *, seeds, num_inference_steps, guidance_scale):
        if self.gen is None:
            return self.pipe.text_to_image(prompts, seeds=seeds, num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale)
        return self.gen_pipe.text_to_image(prompts, seeds=seeds, **self.gen.pipeline_kwargs(guidance_scale))

    def answer(self, images, questions, *, max_new_tokens, layout="demo"):
        if self.und is None:
            return self.pipe.answer(images, questions, max_new_tokens=max_new_tokens, layout=layout)
        return self.und_pipe.answer(images, questions, max_new_tokens=max_new_tokens, layout=layout,
                                    **self.und.pipeline_kwargs())


def specialize_t2i(pipe, overrides: dict, guidance: float, calibration: int):
    from flashu_batch.flashu.calibrate import specialize_t2i
    from flashu_batch.flashu.config import FlashUGenerationConfig

    knobs = {**overrides}
    if knobs.get("guidance_schedule", "default") == "default":
        knobs["guidance_schedule"] = scaled_schedule(guidance)
    captions = tuple(s.caption for s in world.sample_scenes("train", calibration, seed=123))
    config = FlashUGenerationConfig(**knobs, calibration_prompts=captions, calibration_guidance=guidance)
    return specialize_t2i(pipe.model, pipe.tokenizer, pipe.tokens, config)[0]


def specialize_vqa(pipe, overrides: dict, calibration: int):
    from flashu_batch.flashu.calibrate import specialize_vqa
    from flashu_batch.flashu.config import FlashUUnderstandingConfig

    rng = random.Random(124)  # training-split scenes, one question each
    samples = [(world.render(scene), rng.choice(world.questions(scene, rng))[0])
               for scene in world.sample_scenes("train", calibration, seed=124)]
    return specialize_vqa(pipe, FlashUUnderstandingConfig(**overrides), samples)[0]


def evaluate_t2i(runner, scenes, *, steps: int, guidance: float, batch: int = 50) -> tuple[dict, list]:
    """Scores (per attribute, means over images) and the generated PIL images."""
    images = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        images += runner.text_to_image([s.caption for s in chunk], seeds=list(range(i, i + len(chunk))),
                                       num_inference_steps=steps, guidance_scale=guidance)
    return world.score_t2i(images, [s.objects for s in scenes]), images


def evaluate_vqa(runner, items, *, layout: str = "demo", batch: int = 100) -> tuple[dict, list]:
    """Accuracy overall and per question kind, and the predicted answers."""
    predictions = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        predictions += runner.answer([im for im, _, _ in chunk], [q for _, q, _ in chunk], max_new_tokens=4,
                                     layout=layout)
    right = defaultdict(list)
    for (_, q, a), p in zip(items, predictions):
        right[world.question_kind(q)].append(world.normalize_answer(p) == a)
    by_kind = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    return dict(accuracy=world.vqa_accuracy(predictions, [a for _, _, a in items]), by_kind=by_kind), predictions


def run(model: str, variants=None, **settings) -> dict:
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    checkpoint = resolve_model(model)
    scenes = world.heldout_t2i_set(s["n_t2i"], seed=s["t2i_seed"])
    items = world.heldout_vqa_set(s["n_vqa"], seed=s["vqa_seed"])
    results = {}
    for name in variants or list(VARIANTS):
        gen, und = VARIANTS[name]
        start = time.perf_counter()
        runner = Runner(checkpoint, gen, und, guidance=s["guidance"], calibration=s["calibration"])
        r = dict(calibration_seconds=round(time.perf_counter() - start, 2))
        if gen != SKIP:
            start = time.perf_counter()
            t2i, _ = evaluate_t2i(runner, scenes, steps=s["steps"], guidance=s["guidance"], batch=s["batch"])
            r.update(t2i_correctness=round(t2i["overall"], 4), t2i_attributes={k: round(v, 4) for k, v in t2i.items()},
                     n_t2i=len(scenes), t2i_seconds=round(time.perf_counter() - start, 2))
            if runner.gen is not None:
                r["t2i_model_calls"] = runner.gen.config.num_inference_steps - 1
        if und != SKIP:
            start = time.perf_counter()
            vqa, _ = evaluate_vqa(runner, items, layout=s["layout"])
            r.update(vqa_accuracy=round(vqa["accuracy"], 4), vqa_by_kind={k: round(v, 4) for k, v in vqa["by_kind"].items()},
                     n_vqa=len(items), vqa_seconds=round(time.perf_counter() - start, 2))
        r["settings"] = dict(model=model, split="heldout", steps=s["steps"], guidance=s["guidance"], layout=s["layout"])
        results[name] = r
    base, fast = results.get("baseline"), results.get("flashu")
    if base and fast:
        results["fidelity"] = {
            key: round(fast[key] / base[key], 4) if base[key] else None for key in ("vqa_accuracy", "t2i_correctness")}
    return results


def showcase(runner, n: int = 8, *, steps: int = DEFAULTS["steps"], guidance: float = DEFAULTS["guidance"],
             seed: int = DEFAULTS["t2i_seed"]):
    """n held-out captions drawn, then one question per drawn image (the kinds cycle) answered by the model.

    Returns (rows, contact sheet): per row the caption, whether the drawing is right (checker), what the checker
    found, the question, the model's answer, and the checker's answer about the drawn image (what the model
    should say); the sheet has the generator's rendering of each caption above the model's drawing.
    """
    scenes = world.heldout_t2i_set(n, seed=seed)
    images = runner.text_to_image([s.caption for s in scenes], seeds=list(range(n)), num_inference_steps=steps,
                                  guidance_scale=guidance)
    questions = []
    for i, scene in enumerate(scenes):
        qa = world.questions(scene, random.Random(i))
        kind = world.QUESTION_KINDS[i % len(world.QUESTION_KINDS)]
        questions.append(next((q for q, _ in qa if world.question_kind(q) == kind), qa[0][0]))
    answers = runner.answer(images, questions, max_new_tokens=4)
    rows = []
    for scene, image, question, answer in zip(scenes, images, questions, answers):
        detections = world.detect(image)
        rows.append(dict(caption=scene.caption, drawn_right=world.score_image(image, scene.objects)["overall"] == 1.0,
                         drawn=world.caption([world.Obj(*d.triple) for d in detections]) or "nothing",
                         question=question, answer=answer, checker_answer=world.oracle_answer(detections, question)))
    return rows, world.contact_sheet([[world.render(s) for s in scenes], images])


def percent(r: dict, key: str, n_key: str) -> str:
    return f"{r[key]:.1%} (n={r[n_key]})" if key in r else "-"


def table(results: dict) -> str:
    variants = {k: v for k, v in results.items() if k != "fidelity"}
    lines = ["| variant | VQA accuracy | T2I correctness | count | color | shape | position | object |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in variants.items():
        a = r.get("t2i_attributes")
        attributes = " | ".join(f"{a[k]:.1%}" if a else "-" for k in ("count", "color", "shape", "position", "object"))
        lines.append(f"| {name} | {percent(r, 'vqa_accuracy', 'n_vqa')} | {percent(r, 't2i_correctness', 'n_t2i')} | "
                     f"{attributes} |")
    kinds = sorted({k for r in variants.values() for k in r.get("vqa_by_kind", {})})
    if kinds:
        lines += ["", "| variant | " + " | ".join(f"VQA {k}" for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for name, r in variants.items():
            if "vqa_by_kind" in r:
                lines.append(f"| {name} | " + " | ".join(f"{r['vqa_by_kind'].get(k, float('nan')):.1%}" for k in kinds)
                             + " |")
    if "fidelity" in results:
        f = results["fidelity"]
        lines += ["", "FlashU / baseline: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -"
                                                         for k, v in f.items()) + " (goal >= 0.97)"]
    return "\n".join(lines)


def showcase_table(rows: list[dict]) -> str:
    lines = ["| # | caption | drawn right | question about the drawing | answer | checker's answer |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['caption']} | {'yes' if r['drawn_right'] else 'no: ' + r['drawn']} | "
                     f"{r['question']} | {r['answer']} | {r['checker_answer']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-shapes", help="known model name or checkpoint folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, metavar="VARIANT",
                        help=f"which to run (default all): {', '.join(repr(v) for v in VARIANTS)}")
    parser.add_argument("--n-t2i", type=int, default=DEFAULTS["n_t2i"], help="held-out captions (images)")
    parser.add_argument("--n-vqa", type=int, default=DEFAULTS["n_vqa"], help="held-out questions")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="baseline T2I sampling steps")
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance"], help="T2I guidance scale (s0)")
    parser.add_argument("--calibration", type=int, default=DEFAULTS["calibration"],
                        help="training-split samples for each FlashU calibration")
    parser.add_argument("--layout", choices=("demo", "training"), default=DEFAULTS["layout"], help="VQA layout")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    parser.add_argument("--contact-sheet", metavar="PNG", default=None,
                        help="also draw 8 held-out captions (generator's rendering above the model's drawing) into "
                             "this PNG and print the drawings' checks and one answer per drawing")
    args = parser.parse_args(argv)
    if args.contact_sheet:
        runner = Runner(resolve_model(args.model), None, None, guidance=args.guidance, calibration=0)
        rows, sheet = showcase(runner, steps=args.steps, guidance=args.guidance)
        sheet.save(args.contact_sheet)
        print(showcase_table(rows))
    results = run(args.model, args.variants, n_t2i=args.n_t2i, n_vqa=args.n_vqa, steps=args.steps,
                  guidance=args.guidance, layout=args.layout, calibration=args.calibration)
    print(f"model {args.model}: held-out split, baseline T2I {args.steps} steps guidance {args.guidance}, "
          f"VQA layout {args.layout}")
    print(table(results))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
