"""The tiny-shapes world: a synthetic image world where correctness can be checked by a program.

An image (64x64, black background) holds one to three flat shapes; each object is a (color, shape, position)
triple, at most one object per named position:

    colors     red green blue yellow purple white
    shapes     circle square triangle (pointing up)
    positions  left right top bottom center       (a plus-shaped layout, 23.5 px apart, 7+ px gaps between shapes)

Every object is drawn with a small seeded jitter (centre +-0.5 px, half-size 7 +- 0.5 px), anti-aliased (4x
supersampling). Captions come from one template ("a red circle on the left and a blue square at the bottom");
questions have one-word answers about color, shape, position and count (see `questions`).

Splits are disjoint by combination: a fixed set of HELD_OUT_TRIPLES (15 of the 90 (color, shape, position)
triples, every color, shape and position still seen in training) never occurs in a "train" scene, and every
"heldout" scene holds at least one of them. Held-out scores therefore measure generalisation to unseen
combinations, not memorisation. Everything is deterministic from a seed (`sample_scenes(split, n, seed)`).

Checkers: `detect` finds the objects of an image (foreground connected components, majority color, shape by
template IoU, nearest named position); `score_image` / `score_t2i` score an image against a caption GenEval-style
(count, color, shape, position, object binding, and overall = exactly the requested objects); `vqa_accuracy` is
exact match on normalised answers. On the generator's own images they score 100% (tests/train/test_tiny_world.py).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (x, y) centres in pixels. Aligned with the model's 4x4 grid of 16-pixel image tokens: an object at the left,
# right, top or bottom lies in one column / row of tokens, the centre one in the middle 2x2 block; no token holds
# parts of two objects.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.5, 32.0), "right": (55.5, 32.0), "top": (32.0, 8.5), "bottom": (32.0, 55.5), "center": (32.0, 32.0),
}
PREPOSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                "center": "in the center"}
HALF_SIZE = 7.0  # half the extent of a shape in pixels (circle radius, half the square side)
SIZE_JITTER = 0.5
POS_JITTER = 0.5
SUPERSAMPLE = 4
NUMBERS = ("zero", "one", "two", "three")
PLURALS = {s: s + "s" for s in SHAPES}

ALL_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    (c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)


def _held_out_triples(n: int = 15, seed: int = 8) -> frozenset:
    """n triples drawn with a fixed seed, redrawn until every color-shape, color-position and shape-position pair
    still occurs among the training triples (so the held-out split tests recombination of seen parts)."""
    rng = random.Random(seed)
    while True:
        held = frozenset(rng.sample(ALL_TRIPLES, n))
        train = [t for t in ALL_TRIPLES if t not in held]
        pairs_ok = all({(t[i], t[j]) for t in train} == {(t[i], t[j]) for t in ALL_TRIPLES}
                       for i, j in ((0, 1), (0, 2), (1, 2)))
        if pairs_ok:
            return held


HELD_OUT_TRIPLES: frozenset = _held_out_triples()
TRAIN_TRIPLES: tuple = tuple(t for t in ALL_TRIPLES if t not in HELD_OUT_TRIPLES)

# Words the tiny tokenizer holds as single tokens: the world's vocabulary plus the chat-template words of the
# VQA prompt (showo2.layouts); anything else still tokenizes, byte by byte.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    [*COLORS, *SHAPES, *PLURALS.values(), *POSITIONS, *NUMBERS, "yes", "no",
     "a", "and", "on", "at", "in", "the", "what", "color", "is", "shape", "where", "how", "many", "shapes", "are",
     "there", "system", "You", "are", "helpful", "assistant", "user"]))


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    position: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.position


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in caption order
    # per object (dx, dy, half_size): the rendering jitter; ground truth never depends on it
    placement: tuple[tuple[float, float, float], ...] = field(default=(), compare=False)

    @property
    def caption(self) -> str:
        return caption(self.objects)


def caption(objects) -> str:
    """'a red circle on the left and a blue square at the bottom' (objects in the given order)."""
    return " and ".join(f"a {o.color} {o.shape} {PREPOSITIONS[o.position]}" for o in objects)


_OBJ_RE = re.compile(r"an? (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)")


def parse_caption(text: str) -> tuple[Obj, ...]:
    """The requested objects of a world caption (inverse of `caption`); ValueError for text outside the grammar."""
    by_phrase = {v: k for k, v in PREPOSITIONS.items()}
    parts = text.strip().rstrip(".").lower().split(" and ")
    objects = []
    for part in parts:
        m = _OBJ_RE.fullmatch(part.strip())
        if not m or m[1] not in COLORS or m[2] not in SHAPES:
            raise ValueError(f"Caption {text!r}: {part!r} is not 'a <color> <shape> <where>' of the tiny world.")
        objects.append(Obj(m[1], m[2], by_phrase[m[3]]))
    if len({o.position for o in objects}) != len(objects):
        raise ValueError(f"Caption {text!r} puts two objects at one position.")
    return tuple(objects)


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """One scene of 1-3 objects (25% / 35% / 40%) at distinct positions.

    split "train": only TRAIN_TRIPLES; "heldout": at least one HELD_OUT_TRIPLES member, others any triple;
    "any": unrestricted.
    """
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}.")
    n = rng.choices((1, 2, 3), weights=(25, 35, 40))[0]
    objects: list[Obj] = []
    if split == "heldout":
        objects.append(Obj(*rng.choice(sorted(HELD_OUT_TRIPLES))))
    pool = TRAIN_TRIPLES if split == "train" else ALL_TRIPLES
    while len(objects) < n:
        t = rng.choice(pool)
        if t[2] not in {o.position for o in objects}:
            objects.append(Obj(*t))
    rng.shuffle(objects)
    placement = tuple((rng.uniform(-POS_JITTER, POS_JITTER), rng.uniform(-POS_JITTER, POS_JITTER),
                       HALF_SIZE + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) for _ in objects)
    return Scene(tuple(objects), placement)


def sample_scenes(split: str, n: int, seed: int) -> list[Scene]:
    """n scenes of a split, deterministic from seed (scene i depends only on split, seed and i)."""
    return [sample_scene(random.Random(f"{split}/{seed}/{i}"), split) for i in range(n)]


def _shape_polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image (anti-aliased by 4x supersampling and box reduction)."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    placement = scene.placement or tuple((0.0, 0.0, HALF_SIZE) for _ in scene.objects)
    for obj, (dx, dy, r) in zip(scene.objects, placement):
        cx, cy = POSITIONS[obj.position]
        cx, cy, r = (cx + dx) * k, (cy + dy) * k, r * k
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    return canvas.reduce(k)


# ---------------------------------------------------------------------------------------------------------------
# Questions


def _where(position: str) -> str:
    return PREPOSITIONS[position]


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs about a scene; every answer is one word and every question unambiguous.

    Kinds: color / shape at a position, color of a shape (when it is the only one of its shape), position of a
    color-shape (when unique), number of shapes, number of one kind of shape (zero..three), and existence of a
    color-shape (yes, plus one "no" question drawn with rng, or a fixed choice without).
    """
    objs = scene.objects
    qa = []
    for o in objs:
        qa.append((f"what color is the shape {_where(o.position)}?", o.color))
        qa.append((f"what shape is {_where(o.position)}?", o.shape))
    shape_counts = Counter(o.shape for o in objs)
    pair_counts = Counter((o.color, o.shape) for o in objs)
    for o in objs:
        if shape_counts[o.shape] == 1:
            qa.append((f"what color is the {o.shape}?", o.color))
        if pair_counts[(o.color, o.shape)] == 1:
            qa.append((f"where is the {o.color} {o.shape}?", o.position))
            qa.append((f"is there a {o.color} {o.shape}?", "yes"))
    qa.append(("how many shapes are there?", NUMBERS[len(objs)]))
    for s in SHAPES:
        qa.append((f"how many {PLURALS[s]} are there?", NUMBERS[shape_counts[s]]))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pair_counts]
    c, s = rng.choice(absent) if rng is not None else absent[0]
    qa.append((f"is there a {c} {s}?", "no"))
    return list(dict.fromkeys(qa))  # dedupe, keep order


QUESTION_KINDS = ("color_at", "shape_at", "color_of", "where", "exists", "count", "count_shape")


def question_kind(question: str) -> str:
    """The template a world question comes from (one of QUESTION_KINDS)."""
    q = question.strip().lower()
    if q.startswith("what color is the shape"):
        return "color_at"
    if q.startswith("what shape is"):
        return "shape_at"
    if q.startswith("what color is the"):
        return "color_of"
    if q.startswith("where is"):
        return "where"
    if q.startswith("is there"):
        return "exists"
    if q.startswith("how many shapes"):
        return "count"
    if q.startswith("how many"):
        return "count_shape"
    raise ValueError(f"{question!r} is not a tiny-world question.")


def normalize_answer(text: str) -> str:
    return text.strip().lower().rstrip(".!").strip()


def vqa_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Exact match after normalisation (strip, lower case, no trailing period)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers.")
    if not answers:
        raise ValueError("No answers to score.")
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / len(answers)


# ---------------------------------------------------------------------------------------------------------------
# Detection and T2I scoring

FOREGROUND_MIN = 110  # a pixel is foreground when its brightest channel reaches this (palette colors are >= 220)
MIN_AREA = 24  # components smaller than this are noise (a shape covers ~100-200 pixels)
SOFT_FULL = 200.0  # brightness that counts as fully inside a shape for the soft template match
SOFT_BOX = 0.4  # the fitted templates fill the box where brightness / SOFT_FULL reaches this
_PALETTE_NAMES = tuple(COLORS)
_PALETTE_DIRS = np.array([np.array(c, dtype=np.float32) / max(c) for c in COLORS.values()])  # (K, 3)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    position: str
    area: int
    centroid: tuple[float, float]  # (x, y)
    shape_iou: float  # IoU of the component with the best-fitting shape template

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.position


def _to_array(image) -> np.ndarray:
    """PIL image, HxWx3 uint8 array, or (3, H, W) tensor in [-1, 1] -> (H, W, 3) float32 in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor (3, H, W) in [-1, 1]
        arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        return arr.astype(np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"Expected an RGB image, got array shape {arr.shape}.")
    return arr


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask -> list of (n, 2) (y, x) index arrays."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def _template(shape: str, cx: float, cy: float, rx: float, ry: float, H: int, W: int) -> np.ndarray:
    """Boolean mask (H, W) of a shape filling the box of centre (cx, cy) and half-extents (rx, ry) (pixel centres
    at +0.5): an ellipse, the box itself, or an upward triangle with its base on the box's bottom edge."""
    if (H, W) not in _GRIDS:
        _GRIDS[(H, W)] = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    ys, xs = _GRIDS[(H, W)]
    if shape == "circle":
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    if shape == "square":
        return (np.abs(xs - cx) < rx) & (np.abs(ys - cy) < ry)
    frac = (ys - (cy - ry)) / (2 * ry)  # 0 at the apex, 1 at the base
    return (frac >= 0) & (frac <= 1) & (np.abs(xs - cx) <= frac * rx)


def detect(image) -> list[Detection]:
    """The objects in an image: foreground components (brightest channel >= FOREGROUND_MIN, area >= MIN_AREA),
    each with the majority palette color of its pixels (by chromaticity: the pixel divided by its brightest channel,
    so dim anti-aliased edges keep their hue), the shape whose template (fitted to the component's bounding box)
    best overlaps the brightness around it (soft IoU), and the named position nearest to the centre of its bounding
    box. Sorted by position name."""
    arr = _to_array(image)
    H, W, _ = arr.shape
    bright = arr.max(axis=2)
    mask = bright >= FOREGROUND_MIN
    dirs = arr / np.maximum(bright, 1.0)[..., None]  # (H, W, 3)
    nearest = ((dirs[:, :, None, :] - _PALETTE_DIRS[None, None]) ** 2).sum(-1).argmin(-1)  # (H, W)
    found = []
    for pix in _components(mask):
        if len(pix) < MIN_AREA:
            continue
        ys, xs = pix[:, 0], pix[:, 1]
        color = _PALETTE_NAMES[Counter(nearest[ys, xs].tolist()).most_common(1)[0][0]]
        # Soft IoU with each template: the brightness (not the thresholded mask) near the component, so the dim,
        # blurred corners of a decoded square still count as corners. The templates fill the box where that
        # brightness reaches half the full level (a blurred triangle's dim apex included).
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        soft = np.zeros((H, W), dtype=np.float32)
        window = (slice(max(0, y0 - 2), y1 + 2), slice(max(0, x0 - 2), x1 + 2))
        soft[window] = np.clip(bright[window] / SOFT_FULL, 0.0, 1.0)
        box_ys, box_xs = np.nonzero(soft >= SOFT_BOX)
        x0, x1, y0, y1 = box_xs.min(), box_xs.max() + 1, box_ys.min(), box_ys.max() + 1
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        ious = {}
        for s in SHAPES:
            t = _template(s, cx, cy, rx, ry, H, W).astype(np.float32)
            ious[s] = float(np.minimum(soft, t).sum() / max(np.maximum(soft, t).sum(), 1e-6))
        shape = max(ious, key=ious.get)
        # position from the centre of the shape's extent (a triangle's centroid sits low; its box centre does not)
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * W / IMAGE_SIZE - cx) ** 2
                       + (POSITIONS[p][1] * H / IMAGE_SIZE - cy) ** 2)
        found.append(Detection(color, shape, position, len(pix), (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                               float(ious[shape])))
    return sorted(found, key=lambda d: d.position)


ATTRIBUTES = ("count", "color", "shape", "position", "object", "overall")


def score_image(image, requested) -> dict[str, float]:
    """GenEval-style scores of one image for a caption (string) or requested objects.

    count: as many objects as requested; color / shape / position: fraction of the requested colors / shapes /
    positions that the detections cover (multiset match); object: fraction of requested objects found with color,
    shape and position all right; overall: 1 when the detected objects are exactly the requested ones, else 0.
    """
    req = parse_caption(requested) if isinstance(requested, str) else tuple(requested)
    det = detect(image)

    def covered(key) -> float:
        want, got = Counter(key(o) for o in req), Counter(key(d) for d in det)
        return sum(min(n, got[k]) for k, n in want.items()) / len(req)

    return {
        "count": float(len(det) == len(req)),
        "color": covered(lambda o: o.color),
        "shape": covered(lambda o: o.shape),
        "position": covered(lambda o: o.position),
        "object": covered(lambda o: o.triple),
        "overall": float(Counter(d.triple for d in det) == Counter(o.triple for o in req)),
    }


def score_t2i(images, requested: list) -> dict[str, float]:
    """Mean of `score_image` over images (one caption or object list per image); every value in [0, 1]."""
    if len(images) != len(requested):
        raise ValueError(f"{len(images)} images for {len(requested)} captions.")
    if not images:
        raise ValueError("No images to score.")
    scores = [score_image(im, r) for im, r in zip(images, requested)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in ATTRIBUTES}


_WHERE_RE = {v: k for k, v in PREPOSITIONS.items()}


def oracle_answer(image, question: str) -> str:
    """Answer a world question from the objects `detect` finds in the image (or from a list of detections):
    a program, not a model. On the generator's own images it agrees with every generated answer (tests), which
    validates the detector and the question templates together."""
    dets = image if isinstance(image, list) else detect(image)
    q = question.strip().lower().rstrip("?")
    kind = question_kind(q)
    if kind in ("color_at", "shape_at"):
        phrase = q.split(" is ", 1)[1].removeprefix("the shape ")
        at = [d for d in dets if d.position == _WHERE_RE.get(phrase)]
        return (at[0].color if kind == "color_at" else at[0].shape) if at else "none"
    words = q.split()
    if kind == "color_of":
        found = [d for d in dets if d.shape == words[-1]]
        return found[0].color if len(found) == 1 else "none"
    if kind in ("where", "exists"):
        color, shape = words[-2], words[-1]
        found = [d for d in dets if (d.color, d.shape) == (color, shape)]
        if kind == "exists":
            return "yes" if found else "no"
        return found[0].position if len(found) == 1 else "none"
    if kind == "count":
        return NUMBERS[len(dets)] if len(dets) < len(NUMBERS) else str(len(dets))
    shape = {v: k for k, v in PLURALS.items()}[words[2]]
    n = sum(d.shape == shape for d in dets)
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation sets


def heldout_t2i_set(n: int, seed: int = 1) -> list[Scene]:
    """n held-out scenes for T2I scoring (their captions are the prompts)."""
    return sample_scenes("heldout", n, seed)


def heldout_vqa_set(n: int, seed: int = 2) -> list[tuple[Image.Image, str, str]]:
    """n (image, question, answer) triples on held-out scenes, one question per scene, the question kind cycling
    so every kind is represented."""
    out = []
    for i, scene in enumerate(sample_scenes("heldout", n, seed)):
        rng = random.Random(f"q/{seed}/{i}")
        qa = questions(scene, rng)
        q, a = qa[rng.randrange(len(qa))]
        out.append((render(scene), q, a))
    return out


def contact_sheet(rows: list[list[Image.Image]], scale: int = 2, pad: int = 4) -> Image.Image:
    """Grid of images (row by row), each upscaled `scale` times with nearest neighbour, on a white ground."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    side = IMAGE_SIZE * scale
    sheet = Image.new("RGB", (n_cols * (side + pad) + pad, n_rows * (side + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            sheet.paste(im.resize((side, side), Image.NEAREST), (pad + j * (side + pad), pad + i * (side + pad)))
    return sheet
