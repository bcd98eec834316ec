"""The tiny-shapes world (train/tiny_world.py): deterministic scenes, disjoint splits, captions and questions, and
the checkers validated on the generator's own images (they must score 100% there, and catch wrong images)."""

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flashu_batch.train import tiny_world as w


@pytest.fixture(scope="module")
def scenes():
    return w.sample_scenes("train", 60, seed=5) + w.sample_scenes("heldout", 60, seed=5)


@pytest.fixture(scope="module")
def images(scenes):
    return [w.render(s) for s in scenes]


# ------------------------------------------------------------------------------------------------ generator


def test_scenes_are_deterministic_from_the_seed():
    a, b = w.sample_scenes("train", 20, seed=3), w.sample_scenes("train", 20, seed=3)
    assert a == b and [s.placement for s in a] == [s.placement for s in b]
    assert np.array_equal(np.asarray(w.render(a[7])), np.asarray(w.render(b[7])))
    assert a != w.sample_scenes("train", 20, seed=4)
    # scene i depends only on (split, seed, i): a longer list starts with the shorter one
    assert w.sample_scenes("train", 30, seed=3)[:20] == a


def test_scene_structure(scenes, images):
    counts = {1: 0, 2: 0, 3: 0}
    for scene, image in zip(scenes, images):
        counts[len(scene.objects)] += 1
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert image.size == (w.IMAGE_SIZE, w.IMAGE_SIZE) and image.mode == "RGB"
    assert all(n > 10 for n in counts.values())
    seen = {o.triple for s in scenes for o in s.objects}
    assert {c for c, _, _ in seen} == set(w.COLORS) and {s for _, s, _ in seen} == set(w.SHAPES)
    assert {p for _, _, p in seen} == set(w.POSITIONS)


def test_splits_are_disjoint_by_combination():
    assert len(w.HELD_OUT_TRIPLES) == 15 and len(w.TRAIN_TRIPLES) == 75
    train = w.sample_scenes("train", 2000, seed=0)
    heldout = w.sample_scenes("heldout", 500, seed=0)
    assert not any(o.triple in w.HELD_OUT_TRIPLES for s in train for o in s.objects)
    assert all(any(o.triple in w.HELD_OUT_TRIPLES for o in s.objects) for s in heldout)
    # every pair of attributes of a held-out triple is still seen in training: held-out scenes recombine known parts
    train_triples = {o.triple for s in train for o in s.objects}
    assert train_triples == set(w.TRAIN_TRIPLES)
    for c, s, p in w.HELD_OUT_TRIPLES:
        assert any(t[:2] == (c, s) for t in train_triples)
        assert any((t[0], t[2]) == (c, p) for t in train_triples)
        assert any(t[1:] == (s, p) for t in train_triples)
    with pytest.raises(ValueError, match="split"):
        w.sample_scenes("test", 1, seed=0)


def test_captions_round_trip(scenes):
    for scene in scenes:
        assert w.parse_caption(scene.caption) == scene.objects
    assert w.caption([w.Obj("red", "circle", "left"), w.Obj("blue", "square", "bottom")]) == \
        "a red circle on the left and a blue square at the bottom"
    for bad in ("a red fox on the left", "a red circle somewhere", "a red circle on the left and a blue square on "
                "the left", ""):
        with pytest.raises(ValueError):
            w.parse_caption(bad)


def test_questions_have_one_word_answers_and_cover_every_kind(scenes):
    kinds = set()
    for scene in scenes:
        qa = w.questions(scene, random.Random(0))
        assert len(qa) == len(set(qa))
        for q, a in qa:
            assert q.endswith("?") and len(a.split()) == 1
            kinds.add(w.question_kind(q))
    assert kinds == set(w.QUESTION_KINDS)


def test_world_words_are_single_tokens():
    from flashu_batch.train.tiny_shapes import build_world_tokenizer

    plain, glued = build_world_tokenizer(glue_spaces=0), build_world_tokenizer(glue_spaces=1)
    for word in w.WORDS:  # glued: also with the leading space Qwen's tokenizer glues to a word
        assert len(plain(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(plain(" " + word, add_special_tokens=False)["input_ids"]) == 2, word
        assert len(glued(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(glued(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


# ------------------------------------------------------------------------------------------------- checkers


def test_t2i_checker_scores_ground_truth_100_percent(scenes, images):
    scores = w.score_t2i(images, [s.caption for s in scenes])
    assert scores == {k: 1.0 for k in w.ATTRIBUTES}
    # also from tensors in [-1, 1], as the pipeline returns with output_type="pt"
    import torch

    pixels = torch.from_numpy(np.asarray(images[0], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert w.score_image(pixels, scenes[0].objects)["overall"] == 1.0


def test_vqa_oracle_agrees_with_every_generated_answer(scenes, images):
    predictions, answers = [], []
    for scene, image in zip(scenes, images):
        detections = w.detect(image)
        for q, a in w.questions(scene, random.Random(1)):
            predictions.append(w.oracle_answer(detections, q))
            answers.append(a)
    assert len(answers) > 1000
    assert w.vqa_accuracy(predictions, answers) == 1.0


def test_heldout_eval_sets(scenes):
    items = w.heldout_vqa_set(70, seed=2)
    assert {w.question_kind(q) for _, q, _ in items} == set(w.QUESTION_KINDS)
    assert w.vqa_accuracy([w.oracle_answer(im, q) for im, q, _ in items], [a for _, _, a in items]) == 1.0
    t2i = w.heldout_t2i_set(10, seed=1)
    assert t2i == w.heldout_t2i_set(10, seed=1) and t2i != w.heldout_t2i_set(10, seed=3)


def _draw(objects, size=7.0):
    scene = w.Scene(tuple(objects), tuple((0.0, 0.0, size) for _ in objects))
    return w.render(scene)


def test_t2i_checker_catches_wrong_images():
    red_circle_left = w.Obj("red", "circle", "left")
    blue_square_top = w.Obj("blue", "square", "top")
    want = [red_circle_left, blue_square_top]
    assert w.score_image(_draw(want), want)["overall"] == 1.0
    # wrong color of one object
    s = w.score_image(_draw([w.Obj("green", "circle", "left"), blue_square_top]), want)
    assert s["color"] == 0.5 and s["shape"] == 1.0 and s["position"] == 1.0 and s["overall"] == 0.0
    # wrong shape
    s = w.score_image(_draw([w.Obj("red", "triangle", "left"), blue_square_top]), want)
    assert s["shape"] == 0.5 and s["color"] == 1.0 and s["object"] == 0.5 and s["overall"] == 0.0
    # swapped positions
    s = w.score_image(_draw([w.Obj("red", "circle", "top"), w.Obj("blue", "square", "left")]), want)
    assert s["position"] == 1.0 and s["object"] == 0.0 and s["overall"] == 0.0
    # missing and extra objects
    s = w.score_image(_draw([red_circle_left]), want)
    assert s["count"] == 0.0 and s["object"] == 0.5 and s["overall"] == 0.0
    s = w.score_image(_draw(want + [w.Obj("red", "circle", "center")]), want)
    assert s["count"] == 0.0 and s["object"] == 1.0 and s["overall"] == 0.0
    # an empty (black) image and noise find nothing
    assert w.detect(Image.new("RGB", (64, 64))) == []
    noise = np.random.default_rng(0).integers(0, 90, (64, 64, 3), dtype=np.uint8)
    assert w.detect(noise) == []


def test_checker_tolerates_blur_and_colour_shift():
    from PIL import ImageFilter

    want = [w.Obj("yellow", "triangle", "bottom"), w.Obj("purple", "circle", "right"), w.Obj("white", "square", "center")]
    image = _draw(want).filter(ImageFilter.GaussianBlur(1.0))
    shifted = np.clip(np.asarray(image, dtype=np.int16) + np.array([-15, 10, -10]), 0, 255).astype(np.uint8)
    assert w.score_image(Image.fromarray(shifted), want)["overall"] == 1.0


def test_shape_classifier_on_hand_drawn_shapes():
    image = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(image)
    draw.rectangle([3, 24, 18, 39], fill=w.COLORS["green"])  # left square
    draw.ellipse([24, 24, 39, 39], fill=w.COLORS["red"])  # center circle
    draw.polygon([(53, 3), (61, 19), (45, 19)], fill=w.COLORS["blue"])  # a triangle near the top right
    found = {d.color: d for d in w.detect(image)}
    assert found["green"].shape == "square" and found["green"].position == "left"
    assert found["red"].shape == "circle" and found["red"].position == "center"
    assert found["blue"].shape == "triangle"


def test_vqa_accuracy_normalises():
    assert w.vqa_accuracy(["Red.", " blue", "three"], ["red", "blue", "two"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        w.vqa_accuracy(["red"], ["red", "blue"])
