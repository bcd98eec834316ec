"""Parameter-specialization report: do generation and understanding use the same neurons and layers?

Per LLM layer: the overlap of the top-k FFN neurons (k = the kept width at the given pruning ratio) under the two
tasks' Wanda scores, next to what two random choices would share (k / I); and each task's layer importance
(1 - cosine of a layer's input and output: generation over the image span of a mid-trajectory call, cond and
uncond rows; understanding at the prompt's last token, the position that decodes). This is FlashU's core finding
made visible for any checkpoint. Written as report.json and report.png (drawn with PIL, no plotting dependency).
"""

import json
import os

import torch.nn.functional as F
from PIL import Image, ImageDraw

from flashu_batch.flashu.ffn_prune import kept_width


def top_k_overlap(gen_scores, und_scores, ratio: float, multiple: int) -> list[dict]:
    rows = []
    for g, u in zip(gen_scores, und_scores):
        k = kept_width(len(g), ratio, multiple)
        shared = len(set(g.topk(k).indices.tolist()) & set(u.topk(k).indices.tolist()))
        rows.append(dict(kept=k, neurons=len(g), overlap=round(shared / k, 4), random_overlap=round(k / len(g), 4)))
    return rows


def layer_importance_by_hooks(model, run, last_token_only: bool) -> list[float]:
    """1 - mean cos(input, output) of every LLM decoder layer during the first forward that `run()` triggers."""
    layers = model.showo.model.layers
    values = [None] * len(layers)

    def hook_for(i):
        def hook(module, args, kwargs, output):
            if values[i] is None:
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                if last_token_only:
                    x, y = x[:, -1], y[:, -1]
                values[i] = float(1 - F.cosine_similarity(x.float(), y.float(), dim=-1).mean())
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return values


def draw_report(report: dict, path: str) -> None:
    """Two panels: top-k neuron overlap per layer (with the random level), and both tasks' layer importance."""
    W, H, margin = 900, 640, 60
    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    layers = report["layers"]
    n = len(layers)

    def panel(top, title, series, y_max, y_label):
        bottom, left, right = top + 230, margin, W - 20
        d.text((left, top - 22), title, fill="black")
        d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        d.text((5, top), f"{y_max:.2g}", fill="black")
        d.text((5, bottom - 10), "0", fill="black")
        d.text((5, (top + bottom) // 2), y_label, fill="black")
        step = (right - left) / max(n, 1)
        for name, values, color in series:
            points = [(left + step * (i + 0.5), bottom - (bottom - top) * min(v / y_max, 1)) for i, v in
                      enumerate(values)]
            if len(points) > 1:
                d.line(points, fill=color, width=3)
            for x, y in points:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        for i in range(0, n, max(1, n // 14)):
            d.text((left + step * (i + 0.5) - 4, bottom + 4), str(i), fill="black")
        d.text((right - 60, bottom + 18), "LLM layer", fill="black")
        for j, (name, _, color) in enumerate(series):
            d.rectangle([right - 260, top + 6 + 16 * j, right - 250, top + 16 + 16 * j], fill=color)
            d.text((right - 244, top + 4 + 16 * j), name, fill="black")

    overlap = [row["overlap"] for row in layers]
    random_level = [row["random_overlap"] for row in layers]
    panel(50, f"Top-k FFN neurons shared by generation and understanding (k = kept width at "
              f"r_p={report['ffn_prune_ratio']})",
          [("shared fraction", overlap, (200, 60, 40)), ("two random choices", random_level, (150, 150, 150))],
          1.0, "share")
    imp = report["layer_importance"]
    y_max = max(max(imp["t2i"]), max(imp["vqa"]), 1e-6) * 1.1
    panel(370, "Layer importance: 1 - cos(input, output)",
          [("generation (image span)", imp["t2i"], (40, 90, 200)), ("understanding (last token)", imp["vqa"],
                                                                     (40, 160, 80))], y_max, "importance")
    image.save(path)


def write_report(out_dir: str, gen_scores, und_scores, gen_importance, und_importance, ratio: float,
                 multiple: int, checkpoint: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    layers = top_k_overlap(gen_scores, und_scores, ratio, multiple)
    report = dict(checkpoint=checkpoint, ffn_prune_ratio=ratio, layers=layers,
                  mean_overlap=round(sum(r["overlap"] for r in layers) / len(layers), 4),
                  mean_random_overlap=round(sum(r["random_overlap"] for r in layers) / len(layers), 4),
                  layer_importance=dict(t2i=[round(v, 6) for v in gen_importance],
                                        vqa=[round(v, 6) for v in und_importance]))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    draw_report(report, os.path.join(out_dir, "report.png"))
    return report

