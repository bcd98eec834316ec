"""The per-call FlashU plan (flashu/plan.py) against design/flashu.md 2.2-2.7, and the `plan` command."""

import itertools
import json
import random
import subprocess
import sys

import pytest

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.plan import format_plan, generation_plan
from flashu_testkit import OFF

# design/flashu.md 2.7, row by row: (NFE calls, FFN, layers skipped, diffusion head, s(t)).
# "0 (recalc)" -> recalc; "5" -> skip; "0" in the full phase -> all; "compute + store" -> store.
SPEC_TABLE = [
    ([1], "pruned", "recalc", "compute", 7.5),
    ([2, 3, 4], "pruned", "skip", "compute", 7.5),
    ([5], "pruned", "skip", "store", 7.5),
    ([6, 7, 8, 9], "pruned", "skip", "reuse", 7.5),
    ([10, 15, 20], "pruned", "skip", "store", 7.5),
    ([11, 21], "pruned", "recalc", "reuse", 7.5),
    ([12, 13, 14, 16, 17, 18, 19, 22, 23, 24], "pruned", "skip", "reuse", 7.5),
    (list(range(25, 35)), "full", "all", "compute", 10.0),
]


def expected_default_rows():
    rows = {}
    for calls, ffn, layers, head, guidance in SPEC_TABLE:
        for k in calls:
            assert k not in rows
            rows[k] = (k, ffn, layers, head, guidance)
    assert sorted(rows) == list(range(1, 35))
    return [rows[k] for k in range(1, 35)]


def as_rows(plan):
    return [(p.call, p.ffn, p.layers, p.head, p.guidance) for p in plan]


def test_default_plan_equals_the_spec_table():
    plan = generation_plan(FlashUGenerationConfig())
    assert len(plan) == 34
    assert as_rows(plan) == expected_default_rows()


def test_default_plan_counts():
    plan = generation_plan(FlashUGenerationConfig())
    assert [p.call for p in plan if not p.runs_llm] == [6, 7, 8, 9, 12, 13, 14, 16, 17, 18, 19, 22, 23, 24]
    assert sum(p.head == "reuse" for p in plan) == 16  # 6-9, 11-14, 16-19, 21-24
    assert [p.call for p in plan if p.layers == "recalc"] == [1, 11, 21]  # 31 is a full call
    assert [p.call for p in plan if p.head == "store"] == [5, 10, 15, 20]
    assert sum(p.layers == "skip" for p in plan) == 21  # layers skipped on 21 of 34 calls
    assert sum(p.ffn == "pruned" for p in plan) == 24


def calls_where(plan, **fields):
    return [p.call for p in plan if all(getattr(p, k) == v for k, v in fields.items())]


def test_pruning_alone():
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "ffn_prune_ratio": 0.2}))
    assert len(plan) == 34
    assert all((p.ffn, p.layers, p.head, p.guidance, p.runs_llm) == ("pruned", "all", "compute", None, True)
               for p in plan)


def test_pruning_with_the_hybrid_switch():
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "ffn_prune_ratio": 0.2, "full_network_calls": 10}))
    assert calls_where(plan, ffn="pruned") == list(range(1, 25))
    assert calls_where(plan, ffn="full") == list(range(25, 35))
    # The hybrid switch means nothing without pruning: every call runs the full network anyway.
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "full_network_calls": 10}))
    assert all(p.ffn == "full" and p.layers == "all" and p.head == "compute" for p in plan)


def test_layer_skipping_alone():
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "layer_skip_ratio": 0.2}))
    assert calls_where(plan, layers="recalc") == [1, 11, 21, 31]
    assert calls_where(plan, layers="skip") == [k for k in range(1, 35) if k not in (1, 11, 21, 31)]
    assert all(p.ffn == "full" and p.head == "compute" and p.runs_llm and p.guidance is None for p in plan)


def test_head_cache_alone():
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "head_cache_interval": 5}))
    assert calls_where(plan, head="store") == [5, 10, 15, 20, 25, 30]
    assert calls_where(plan, head="compute") == [1, 2, 3, 4]
    reuse = [k for k in range(6, 35) if k % 5]
    assert calls_where(plan, head="reuse") == reuse
    # Without layer skipping a reuse call runs nothing upstream of the final layer.
    assert [p.call for p in plan if not p.runs_llm] == reuse
    assert all(p.ffn == "full" and p.layers == "all" for p in plan)


def test_guidance_schedule_alone():
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "guidance_schedule": ((24, 7.5), (11, 10.0))}))
    assert [p.guidance for p in plan] == [7.5] * 24 + [10.0] * 10
    assert all((p.ffn, p.layers, p.head, p.runs_llm) == ("full", "all", "compute", True) for p in plan)
    plan = generation_plan(FlashUGenerationConfig(**{**OFF, "num_inference_steps": 11,
                                                     "guidance_schedule": ((2, 1.0), (3, 2.0), (9, 3.0))}))
    assert [p.guidance for p in plan] == [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0]


def test_everything_off_is_the_baseline():
    plan = generation_plan(FlashUGenerationConfig.off(50))
    assert len(plan) == 49
    assert all((p.ffn, p.layers, p.head, p.guidance, p.runs_llm) == ("full", "all", "compute", None, True)
               for p in plan)


def reference_plan(c: FlashUGenerationConfig):
    """The rules of design/flashu.md 2.2-2.5, written out step by step (k 1-based, T the grid size)."""
    T = c.num_inference_steps
    tau = c.full_network_calls + 1 if c.full_network_calls else 0  # 2.2: use_full = tau > 0 and step > T - tau
    rows, cache = [], False
    for k in range(1, T):
        use_full = tau > 0 and k > T - tau
        if c.layer_skip_ratio == 0 or use_full:
            layers = "all"
        elif (k - 1) % c.layer_skip_interval == 0:
            layers = "recalc"
        else:
            layers = "skip"
        if c.head_cache_interval is None or use_full:
            head, cache = "compute", False
        elif k % c.head_cache_interval == 0:
            head, cache = "store", True
        elif cache:
            head = "reuse"
        else:
            head = "compute"
        if c.guidance_schedule is None:
            guidance = None
        else:
            bounds = list(itertools.accumulate(n for n, _ in c.guidance_schedule))
            guidance = c.guidance_schedule[next(i for i, b in enumerate(bounds) if b >= k)][1]
        ffn = "pruned" if c.ffn_prune_ratio > 0 and not use_full else "full"
        rows.append((k, ffn, layers, head, guidance))
    return rows


def random_configs(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        steps = rng.randint(2, 40)
        calls = steps - 1
        phases, left = [], calls
        while left > 0:
            take = rng.randint(1, left + 2)
            phases.append((take, rng.choice([0.0, 1.5, 4.0, 7.5])))
            left -= take
        yield FlashUGenerationConfig(
            num_inference_steps=steps,
            guidance_schedule=rng.choice([None, tuple(phases)]),
            ffn_prune_ratio=rng.choice([0.0, 0.2, 0.5]),
            full_network_calls=rng.randint(0, calls),
            layer_skip_ratio=rng.choice([0.0, 0.2]),
            layer_skip_interval=rng.randint(1, 12),
            head_cache_interval=rng.choice([None, 1, 2, 3, 5, 7]))


def test_plan_follows_the_spec_rules_on_random_configs():
    for c in random_configs(300):
        plan = generation_plan(c)
        assert as_rows(plan) == reference_plan(c), c
        for p in plan:
            # invariants: a reuse call never runs the LLM unless it recalculates the skip list
            assert p.runs_llm == (p.head != "reuse" or p.layers == "recalc")


def test_reference_plan_reproduces_the_spec_table():
    assert reference_plan(FlashUGenerationConfig()) == expected_default_rows()


def parse_table(text):
    lines = text.strip("\n").split("\n")
    assert lines[0].split() == ["calls", "ffn", "layers", "head", "llm", "guidance"]
    rows = []
    for line in lines[1:]:
        calls, ffn, layers, head, llm, guidance = line.split()
        first, _, last = calls.partition("-")
        rows.append((int(first), int(last or first), ffn, layers, head, llm, guidance))
    return rows


def check_table(text, plan):
    rows = parse_table(text)
    expanded = [(k, ffn, layers, head, llm, guidance)
                for first, last, ffn, layers, head, llm, guidance in rows for k in range(first, last + 1)]
    assert [r[0] for r in expanded] == [p.call for p in plan]  # every call once, in order
    for (k, ffn, layers, head, llm, guidance), p in zip(expanded, plan):
        assert (ffn, layers, head) == (p.ffn, p.layers, p.head)
        assert llm == ("yes" if p.runs_llm else "no")
        assert guidance == ("request" if p.guidance is None else f"{p.guidance:g}")
    for a, b in zip(rows, rows[1:]):  # runs of identical calls are merged
        assert a[2:] != b[2:]
    return rows


def test_format_plan_rows_of_the_default_plan():
    rows = check_table(format_plan(generation_plan(FlashUGenerationConfig())), generation_plan(
        FlashUGenerationConfig()))
    assert [(r[0], r[1]) for r in rows] == [(1, 1), (2, 4), (5, 5), (6, 9), (10, 10), (11, 11), (12, 14), (15, 15),
                                            (16, 19), (20, 20), (21, 21), (22, 24), (25, 34)]
    assert rows[-1][2:] == ("full", "all", "compute", "yes", "10")


def test_format_plan_on_random_configs():
    for c in random_configs(50, seed=1):
        check_table(format_plan(generation_plan(c)), generation_plan(c))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", *args], capture_output=True, text=True, timeout=120)


def test_plan_command_prints_the_default_table():
    result = run_cli("plan")
    assert result.returncode == 0, result.stderr
    assert result.stdout == format_plan(generation_plan(FlashUGenerationConfig())) + "\n"
    check_table(result.stdout, generation_plan(FlashUGenerationConfig()))


def test_plan_command_reads_a_config_file(tmp_path):
    knobs = {"num_inference_steps": 11, "guidance_schedule": [[6, 3.0], [4, 5.0]], "full_network_calls": 3,
             "layer_skip_interval": 4, "head_cache_interval": 2}
    path = tmp_path / "flashu.json"
    path.write_text(json.dumps(knobs))
    result = run_cli("plan", "--task", "t2i", "--config", str(path))
    assert result.returncode == 0, result.stderr
    plan = generation_plan(FlashUGenerationConfig(**knobs))
    assert len(plan) == 10
    rows = check_table(result.stdout, plan)
    # calls 8-10 are the full phase at guidance 5; 3, 5, 7 reuse; 5 is also a recalculation
    assert rows[-1] == (8, 10, "full", "all", "compute", "yes", "5")
    assert [p.call for p in plan if p.head == "reuse"] == [3, 5, 7]
    assert [p.call for p in plan if not p.runs_llm] == [3, 7]


def test_plan_command_refuses_a_bad_config_without_a_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"ffn_prune_ratio": 1.5}))
    result = run_cli("plan", "--config", str(path))
    assert result.returncode != 0
    assert "ffn_prune_ratio" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(__import__("shutil").which("flashu-batch") is None, reason="flashu-batch not installed")
def test_installed_entry_point_prints_the_plan():
    result = subprocess.run(["flashu-batch", "plan"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == format_plan(generation_plan(FlashUGenerationConfig())) + "\n"
