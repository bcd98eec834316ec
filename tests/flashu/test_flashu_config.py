"""FlashU knobs (flashu/config.py): paper defaults, validation on construction and at the JSON edge (`from_dict`),
immutability, `off()`.

(Named test_flashu_config.py, not test_config.py: tests/showo2/test_config.py exists and the test folders have no
__init__.py, so two test_config modules would clash in one pytest run.)
"""

import dataclasses
import json
import math

import pytest

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_testkit import config_from_dict

# Bad values are ValueErrors whose message names the field, whether the config is built directly (the dataclass's
# own checks) or read from JSON at the edge (pydantic's ValidationError, itself a ValueError).


def test_defaults_are_the_papers_1_5b_configuration():
    c = FlashUGenerationConfig()
    assert c.num_inference_steps == 35 and c.num_model_calls == 34
    assert c.guidance_schedule == ((24, 7.5), (11, 10.0))
    assert c.ffn_prune_ratio == 0.2 and c.ffn_width_multiple == 64
    assert c.full_network_calls == 10  # tau = 11 on the 35-point grid: calls 25-34
    assert c.layer_skip_ratio == 0.2 and c.layer_skip_interval == 10
    assert c.head_cache_interval == 5
    assert c.calibration_prompts is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(ffn_prune_ratio=1.0), "ffn_prune_ratio"),
    (dict(ffn_prune_ratio=-0.1), "ffn_prune_ratio"),
    (dict(layer_skip_ratio=1.0), "layer_skip_ratio"),
    (dict(layer_skip_ratio=-0.1), "layer_skip_ratio"),
    (dict(layer_skip_interval=0), "layer_skip_interval"),
    (dict(head_cache_interval=0), "head_cache_interval"),
    (dict(ffn_width_multiple=0), "ffn_width_multiple"),
    (dict(num_inference_steps=1), "num_inference_steps"),
    (dict(full_network_calls=-1), "full_network_calls"),
    (dict(calibration_steps=1), "calibration_steps"),
    (dict(calibration_guidance=-1.0), "calibration_guidance"),
    # the schedule must cover every model call (34 with 35 steps)
    (dict(guidance_schedule=((24, 7.5), (9, 10.0))), "guidance_schedule"),
    (dict(num_inference_steps=50), "guidance_schedule"),  # 49 calls, the default schedule covers 35
    (dict(guidance_schedule=((0, 7.5), (34, 10.0))), "guidance_schedule"),
    (dict(guidance_schedule=((-1, 7.5), (35, 10.0))), "guidance_schedule"),
    (dict(guidance_schedule=((24, -7.5), (11, 10.0))), "guidance_schedule"),
    (dict(guidance_schedule=((24, math.nan), (11, 10.0))), "guidance_schedule"),
    (dict(guidance_schedule=((24, math.inf), (11, 10.0))), "guidance_schedule"),
    (dict(full_network_calls=35), "full_network_calls"),  # only 34 calls
    (dict(num_inference_steps=11, guidance_schedule=None, full_network_calls=11), "full_network_calls"),
])
def test_bad_configs_raise_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        FlashUGenerationConfig(**kwargs)
    assert field in str(info.value)
    raw = json.loads(json.dumps(kwargs))  # as it arrives from a JSON file (lists; NaN/inf as JSON extensions)
    with pytest.raises(ValueError) as info:
        config_from_dict(raw)
    assert field in str(info.value)


@pytest.mark.parametrize("raw, field", [
    ({"ffn_prune_ratio": 0.1, "bogus_knob": 1}, "bogus_knob"),
    ({"ffn_prune_ratio": "high"}, "ffn_prune_ratio"),
    ({"head_cache_interval": 2.5}, "head_cache_interval"),
    ({"guidance_schedule": [[6]]}, "guidance_schedule"),
    ({"calibration_prompts": []}, "calibration_prompts"),
    ({"calibration_prompts": "a fox"}, "calibration_prompts"),
])
def test_the_json_edge_refuses_unknown_fields_and_wrong_types(raw, field):
    with pytest.raises(ValueError) as info:
        config_from_dict(raw)
    assert field in str(info.value)


def test_the_json_edge_needs_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        config_from_dict([["ffn_prune_ratio", 0.1]])
    with pytest.raises(TypeError):
        FlashUGenerationConfig(bogus_knob=1)


def test_boundary_values_are_accepted():
    c = FlashUGenerationConfig(num_inference_steps=11, guidance_schedule=((10, 0.0),), ffn_prune_ratio=0.0,
                               full_network_calls=10, layer_skip_ratio=0.0, head_cache_interval=None)
    assert c.num_model_calls == 10
    # A schedule longer than the calls is fine (the tail is never reached).
    assert FlashUGenerationConfig(guidance_schedule=((100, 4.0),)).guidance_schedule == ((100, 4.0),)


def test_config_is_frozen_and_hashable():
    c = FlashUGenerationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ffn_prune_ratio = 0.5
    assert c.ffn_prune_ratio == 0.2
    assert hash(c) == hash(FlashUGenerationConfig())


def test_json_round_trip():
    c = FlashUGenerationConfig(num_inference_steps=11, guidance_schedule=((6, 3.0), (4, 5.0)),
                               calibration_prompts=("a", "b"))
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    assert back.guidance_schedule == ((6, 3.0), (4, 5.0)) and isinstance(back.guidance_schedule, tuple)
    assert config_from_dict({}) == FlashUGenerationConfig()
    # lists from JSON become tuples on direct construction too (the config stays hashable)
    direct = FlashUGenerationConfig(num_inference_steps=11, guidance_schedule=[[6, 3.0], [4, 5.0]],
                                    calibration_prompts=["a", "b"])
    assert direct == c and hash(direct) == hash(c)


def test_off_turns_every_technique_off():
    c = FlashUGenerationConfig.off(50)
    assert c.num_inference_steps == 50 and c.num_model_calls == 49
    assert c.guidance_schedule is None
    assert c.ffn_prune_ratio == 0 and c.layer_skip_ratio == 0
    assert c.full_network_calls == 0 and c.head_cache_interval is None
    assert FlashUGenerationConfig.off(7).num_inference_steps == 7
    assert FlashUGenerationConfig.off() == c
