"""jobs/spec.py: the t2i params negative_prompt, num_images_per_prompt, image_format, image_quality and the vqa
sampling params: defaults that reproduce the official outputs, bounds, cross-checks, and the new input columns."""

import pytest

from flashu_batch.jobs.spec import SpecError, T2IParams, VQAParams, parse_spec


def spec(t2i_params=None, vqa_params=None, t2i_columns=None, vqa_columns=None):
    return dict(job_id="job-1", model=dict(checkpoint="ckpt"), tasks=[
        dict(kind="t2i", input=dict(uris="p.jsonl", format="jsonl", columns=t2i_columns or {}), output="out",
             params=t2i_params or {}),
        dict(kind="vqa", input=dict(uris="q.parquet", format="parquet", columns=vqa_columns or {}), output="out",
             params=vqa_params or {})])


def error_of(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "/base")
    return str(info.value)


def test_defaults_are_the_official_behaviour():
    t2i, vqa = T2IParams(), VQAParams()
    assert (t2i.negative_prompt, t2i.num_images_per_prompt, t2i.image_format, t2i.image_quality) == (None, 1, "png", 90)
    assert (vqa.temperature, vqa.top_p) == (0.0, 1.0)


def test_values_and_bounds():
    parsed = parse_spec(spec(dict(negative_prompt="blurry", num_images_per_prompt=4, image_format="webp",
                                  image_quality=100), dict(temperature=0.7, top_p=0.9)), "/base")
    t2i, vqa = parsed.tasks
    assert t2i.params.num_images_per_prompt == 4 and t2i.params.image_format == "webp"
    assert vqa.params.temperature == 0.7 and vqa.params.top_p == 0.9
    assert "tasks[0].params.num_images_per_prompt: Input should be greater than or equal to 1" in error_of(
        spec(dict(num_images_per_prompt=0)))
    assert "tasks[0].params.num_images_per_prompt: Input should be less than or equal to 64" in error_of(
        spec(dict(num_images_per_prompt=65)))
    assert "tasks[0].params.image_format: Input should be 'png', 'webp' or 'jpeg'" in error_of(
        spec(dict(image_format="gif")))
    assert "tasks[0].params.image_quality" in error_of(spec(dict(image_quality=0)))
    assert "tasks[1].params.temperature" in error_of(spec(vqa_params=dict(temperature=-0.1)))
    assert "tasks[1].params.top_p" in error_of(spec(vqa_params=dict(top_p=0)))


def test_a_negative_prompt_without_guidance_is_refused():
    message = error_of(spec(dict(negative_prompt="blurry", guidance_scale=0)))
    assert "negative_prompt: got 'blurry' with guidance_scale 0" in message and "guidance_scale > 0" in message
    parse_spec(spec(dict(negative_prompt="", guidance_scale=0)), "/base")  # the empty caption: nothing to refuse


def test_the_new_columns_can_be_renamed():
    parsed = parse_spec(spec(t2i_columns=dict(negative_prompt="neg"), vqa_columns=dict(seed="s")), "/base")
    assert parsed.tasks[0].input.columns == {"negative_prompt": "neg"}
    assert parsed.tasks[1].input.columns == {"seed": "s"}
