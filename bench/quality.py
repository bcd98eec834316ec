"""Fidelity yardstick: T2I correctness and VQA accuracy of a tiny-shapes Show-o2, checked by program.

    python -m bench.quality --model tiny-shapes [--n-t2i 100] [--n-vqa 300] [--json]

Held-out split of `showo2.tiny_world` (scenes with a (color, shape, position) triple never seen in training):

- T2I: one image per held-out caption (seed = its index), scored GenEval-style by `tiny_world.score_t2i`;
  `t2i_correctness` is the overall score (the image holds exactly the requested objects, each with the right
  color, shape and position), and the per-attribute scores come with it.
- VQA: one question per held-out image (the generator's own rendering), greedy answer through
  `Showo2Pipeline.answer` (its default layout unless --layout), exact match after normalisation.

Every variant runs the same sets with the same seeds. Only "baseline" (the unaccelerated pipeline) exists now;
FlashU specialists are added to VARIANTS as functions pipe -> an object with `text_to_image` and `answer`.
The table is markdown; with --json the last line printed is one JSON object {variant: {...}, ...}.
"""

import argparse
import json
import os
import time
from collections import defaultdict

from showo2 import tiny_world as world

# name -> (pipeline -> object with text_to_image(prompts, seeds=, num_inference_steps=, guidance_scale=) and
# answer(images, questions, max_new_tokens=, layout=)); a FlashU specialist registers here.
VARIANTS = {"baseline": lambda pipe: pipe}

DEFAULTS = dict(n_t2i=100, n_vqa=300, steps=20, guidance=4.0, layout="demo", t2i_seed=1, vqa_seed=2, batch=50)


def resolve_model(name: str) -> str:
    """A known model name (e.g. "tiny-shapes") or a checkpoint folder."""
    if name in world.CHECKPOINTS:
        return world.CHECKPOINTS[name]
    if os.path.isdir(name) or name.startswith("s3://"):
        return name
    raise SystemExit(f"--model {name!r}: not a known model ({sorted(world.CHECKPOINTS)}) nor a folder.")


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
    import torch

    from showo2.pipeline import Showo2Pipeline

    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    pipe = Showo2Pipeline.from_pretrained(resolve_model(model), dtype=torch.float32, device="cpu")
    scenes = world.heldout_t2i_set(s["n_t2i"], seed=s["t2i_seed"])
    items = world.heldout_vqa_set(s["n_vqa"], seed=s["vqa_seed"])
    results = {}
    for name in variants or list(VARIANTS):
        runner = VARIANTS[name](pipe)
        start = time.perf_counter()
        t2i, _ = evaluate_t2i(runner, scenes, steps=s["steps"], guidance=s["guidance"], batch=s["batch"])
        t2i_s = time.perf_counter() - start
        vqa, _ = evaluate_vqa(runner, items, layout=s["layout"])
        results[name] = dict(
            vqa_accuracy=round(vqa["accuracy"], 4), t2i_correctness=round(t2i["overall"], 4),
            t2i_attributes={k: round(v, 4) for k, v in t2i.items()},
            vqa_by_kind={k: round(v, 4) for k, v in vqa["by_kind"].items()},
            n_t2i=len(scenes), n_vqa=len(items), t2i_seconds=round(t2i_s, 2),
            vqa_seconds=round(time.perf_counter() - start - t2i_s, 2),
            settings=dict(model=model, split="heldout", steps=s["steps"], guidance=s["guidance"],
                          layout=s["layout"]))
    return results


def table(results: dict) -> str:
    lines = ["| variant | VQA accuracy | T2I correctness | count | color | shape | position | object |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r["t2i_attributes"]
        lines.append(f"| {name} | {r['vqa_accuracy']:.1%} (n={r['n_vqa']}) | {r['t2i_correctness']:.1%} "
                     f"(n={r['n_t2i']}) | " + " | ".join(f"{a[k]:.1%}" for k in
                                                          ("count", "color", "shape", "position", "object")) + " |")
    kinds = sorted({k for r in results.values() for k in r["vqa_by_kind"]})
    lines += ["", "| variant | " + " | ".join(f"VQA {k}" for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['vqa_by_kind'].get(k, float('nan')):.1%}" for k in kinds)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-shapes", help="known model name or checkpoint folder")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--n-t2i", type=int, default=DEFAULTS["n_t2i"], help="held-out captions (images)")
    parser.add_argument("--n-vqa", type=int, default=DEFAULTS["n_vqa"], help="held-out questions")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="T2I sampling steps")
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance"], help="T2I guidance scale")
    parser.add_argument("--layout", choices=("demo", "training"), default=DEFAULTS["layout"], help="VQA layout")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    args = parser.parse_args(argv)
    results = run(args.model, args.variants, n_t2i=args.n_t2i, n_vqa=args.n_vqa, steps=args.steps,
                  guidance=args.guidance, layout=args.layout)
    first = next(iter(results.values()))["settings"]
    print(f"model {args.model}: held-out split, T2I {first['steps']} steps guidance {first['guidance']}, "
          f"VQA layout {first['layout']}")
    print(table(results))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
